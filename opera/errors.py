"""User-facing errors.

Every bad input (a path, a config key, a hierarchy string, an image, a checkpoint) raises
:class:`OperaError` with a one-line message that names the problem and the fix. The CLI prints
that line and exits with code 2; it never shows a traceback for an ``OperaError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OperaError(ValueError):
    """A problem with the user's input, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean a, b?)"`` for close matches of ``name`` among ``choices``."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""
