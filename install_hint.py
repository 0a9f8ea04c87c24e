"""How to install an extra: tensorwire is installed from a clone (it is not on a package index)."""

from __future__ import annotations


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` (``server``, ``torch``, ``train``, ``loadtest``...), as README's
    Install section gives it: from the root of a clone, with the tested versions of ``constraints.txt``.
    ``pip install 'tensorwire[extra]'`` would find nothing, tensorwire being on no package index."""
    return f"python -m pip install -c constraints.txt '.[{extra}]' (from a clone of tensorwire, see README: Install)"
