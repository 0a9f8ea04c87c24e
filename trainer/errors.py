"""The one exception type the trainer raises for user-facing problems.

The CLI turns it into a single line, ``tensorwire <command>: error: ...``, and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TrainerError(Exception):
    """A problem the user can fix: a missing file, bad shapes or labels, an unknown name."""
