"""Command-line pieces shared by the load-test tools: list arguments and a help text that states each default once."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> list[int]:
    """``"1,8,64"`` -> [1, 8, 64]; an argparse type (raises ArgumentTypeError unless all are integers >= 1)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def names(text: str) -> list[str]:
    """``"a, b,,c"`` -> ["a", "b", "c"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already speaks of its default.

    argparse's ArgumentDefaultsHelpFormatter appends it always, so options whose help explains the
    default ("default: from metadata") printed it twice, and options without one printed "(default: None)".
    Nothing is appended for None, False or an empty list; lists print as ``1,2,4``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default in (None, False, [], (), argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        if isinstance(default, list | tuple):
            shown = ",".join(str(v) for v in default)
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"
