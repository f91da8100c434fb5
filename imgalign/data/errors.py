"""The one error type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file, the row (or line) and the fix."""


def short(text: object, limit: int = 60) -> str:
    """A caption or value shortened for an error message."""
    s = repr(text) if not isinstance(text, str) else text
    s = s.replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."
