"""The one error type of the data layer, and the UTF-8 line reader every text file of the data layer uses."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from imgalign.errors import UserError


class DataError(UserError):
    """Bad input data (a `UserError`, so a `ValueError`). The message names the file, the row (or line) and the fix.

    `reason` is a short tag a loader counts skipped rows under (e.g. "image_too_small"), or None.
    """

    def __init__(self, message: str = "", *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def short(text: object, limit: int = 60) -> str:
    """A caption or value shortened for an error message."""
    s = repr(text) if not isinstance(text, str) else text
    s = s.replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def not_utf8(where: str, error: UnicodeDecodeError) -> str:
    """The message for text that is not UTF-8: the byte, its position and the fix."""
    byte = error.object[error.start : error.start + 1].hex()
    return (
        f"{where}: not UTF-8 (byte 0x{byte} at position {error.start}); re-save the file as UTF-8, "
        f"e.g. iconv -f latin1 -t utf-8 in > out"
    )


def utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, UnicodeDecodeError | None]]:
    """(line number from 1, text, None) for each line of a UTF-8 file (a leading BOM is dropped).

    A line that is not UTF-8 comes as (number, text decoded with U+FFFD replacements, the UnicodeDecodeError),
    so one bad byte costs one line, named, instead of the whole file. Line ends are kept ('\\n' only; a lone
    '\\r' does not end a line).
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield number, raw.decode("utf-8", errors="replace"), e


def row_failure(on_error: str, stats) -> Callable[[str, str], None]:
    """fail(reason, message) for a loader: raise a DataError naming the row (on_error="raise"), or count the skipped
    row in `stats` (its n_skipped, skipped[reason], and the first five messages in examples)."""

    def fail(reason: str, message: str) -> None:
        if on_error == "raise":
            raise DataError(message, reason=reason)
        stats.n_skipped += 1
        stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
        if len(stats.examples) < 5:
            stats.examples.append(message)

    return fail


def skipped_text(stats, unit: str = "rows") -> str:
    """", N rows skipped (reason: count, ...)" for a loader's summary line, or "" when nothing was skipped."""
    if not stats.n_skipped:
        return ""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items()))
    return f", {stats.n_skipped} {unit} skipped ({reasons})"
