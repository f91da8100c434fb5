"""Prompt sets: one prompt per line (.txt), per JSON object (.jsonl) or per CSV row (.csv).

    prompts = load_prompt_file("prompts.txt")                          # list[str]
    records = load_prompt_records("UniGenBench/test_prompts_en.csv")  # prompt + the other columns

- .txt: one prompt per line; blank lines and lines starting with '#' are skipped.
- .jsonl: one JSON object per line with a `prompt` or `caption` field (or `column=`); a bare JSON
  string is also a prompt.
- .csv: a header row and a `prompt`, `caption` or `prompt_en` column (UniGenBench), or `column=`.

Files are UTF-8. A bad line (not UTF-8, not JSON, no prompt, an empty prompt) raises a DataError naming the
file and line; with `on_error="skip"` it is skipped and counted in `stats` (a `PromptStats`), and a warning
says how many were skipped when no `stats` is passed.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imgalign.data.errors import DataError, not_utf8, row_failure, short, skipped_text, utf8_lines

__all__ = ["PROMPT_COLUMNS", "PromptRecord", "PromptStats", "load_prompt_file", "load_prompt_records"]

PROMPT_COLUMNS = ("prompt", "caption", "prompt_en")  # looked for in this order
_SKIP_HINT = 'or pass on_error="skip" to skip such lines'


@dataclass
class PromptRecord:
    """One prompt, the line it starts on, and the record's other fields (e.g. UniGenBench test points)."""

    prompt: str
    line: int
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptStats:
    """What loading a prompt file kept and skipped; `summary()` is the line to log."""

    source: str = ""
    n_prompts: int = 0
    n_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first few skip messages

    def summary(self) -> str:
        text = f"{self.source}: {self.n_prompts} prompts"
        return text + skipped_text(self, "lines")


def _pick_column(available: list[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in available:
            raise DataError(
                f"{where}: no column {column!r}; the columns are {', '.join(available) or '(none)'}"
            )
        return column
    for name in PROMPT_COLUMNS:
        if name in available:
            return name
    raise DataError(
        f"{where}: no prompt column; looked for {', '.join(PROMPT_COLUMNS)} and found "
        f"{', '.join(available) or '(none)'}; rename the column or pass column=<name>"
    )


def _read_txt(path: Path, fail) -> list[PromptRecord]:
    out = []
    for line_no, line, bad in utf8_lines(path):
        if bad is not None:
            fail("bad_encoding", f"{not_utf8(f'{path} line {line_no}', bad)}, {_SKIP_HINT}")
            continue
        text = line.strip()
        if text and not text.startswith("#"):
            out.append(PromptRecord(text, line_no))
    return out


def _read_jsonl(path: Path, column: str | None, fail) -> list[PromptRecord]:
    out = []
    for line_no, line, bad in utf8_lines(path):
        where = f"{path} line {line_no}"
        if bad is not None:
            fail("bad_encoding", f"{not_utf8(where, bad)}, {_SKIP_HINT}")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            fail("bad_json", f"{where}: not valid JSON ({e}); write one JSON object per line, {_SKIP_HINT}")
            continue
        if isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, dict):
            fail("bad_record", f"{where}: expected a JSON object with a prompt field, got {short(rec)}, {_SKIP_HINT}")
            continue
        try:
            key = _pick_column(list(rec), column, where)
        except DataError as e:
            fail("missing_prompt", f"{e}, {_SKIP_HINT}")
            continue
        text = rec[key]
        if not isinstance(text, str) or not text.strip():
            fail("empty_prompt", f"{where}: field {key!r} must be a non-empty string, got {short(text)!r}, {_SKIP_HINT}")
            continue
        out.append(PromptRecord(text.strip(), line_no, {k: v for k, v in rec.items() if k != key}))
    return out


def _read_csv(path: Path, column: str | None, fail) -> list[PromptRecord]:
    bad_lines: dict[int, str] = {}  # line number -> the not-UTF-8 message

    def lines():
        for line_no, line, bad in utf8_lines(path):
            if bad is not None:
                bad_lines[line_no] = not_utf8(f"{path} line {line_no}", bad)
            yield line

    out = []
    reader = csv.DictReader(lines())
    if reader.fieldnames is None:
        raise DataError(f"{path}: empty CSV file; the first row must name the columns")
    if bad_lines:  # the header: nothing can be read without it
        raise DataError(next(iter(bad_lines.values())))
    key = _pick_column([c.strip() for c in reader.fieldnames], column, f"{path} line 1 (header)")
    raw_key = next(c for c in reader.fieldnames if c.strip() == key)
    start = reader.line_num + 1
    for rec in reader:
        end = reader.line_num
        bad = [bad_lines[n] for n in range(start, end + 1) if n in bad_lines]
        text = rec.get(raw_key)
        if bad:
            fail("bad_encoding", f"{bad[0]}, {_SKIP_HINT}")
        elif text is None or not text.strip():
            fail("empty_prompt", f"{path} line {start}: empty {key!r} value; give every row a prompt or delete "
                                 f"the row, {_SKIP_HINT}")
        else:
            out.append(PromptRecord(text.strip(), start, {k: v for k, v in rec.items() if k != raw_key}))
        start = end + 1  # quoted fields may span lines
    return out


def load_prompt_records(
    path: str | os.PathLike,
    column: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    stats: PromptStats | None = None,
) -> list[PromptRecord]:
    """Prompts with their line numbers and the other fields of each record (CSV columns, JSON keys).

    Args:
        path: a .txt, .jsonl or .csv file (UTF-8).
        column: the prompt field or column (default: the first of prompt, caption, prompt_en).
        on_error: "raise" a DataError naming the file and line at the first bad line, or "skip" bad lines
            and count them by reason in `stats` (a warning says how many when `stats` is None).
        stats: a `PromptStats` filled with the counts.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    report = stats if stats is not None else PromptStats()
    report.source = str(path)

    fail = row_failure(on_error, report)

    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ""):
            records = _read_txt(path, fail)
        elif suffix == ".jsonl":
            records = _read_jsonl(path, column, fail)
        elif suffix == ".csv":
            records = _read_csv(path, column, fail)
        else:
            raise DataError(f"{path}: unsupported prompt file type {suffix!r}; use .txt, .jsonl or .csv")
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    report.n_prompts = len(records)
    if not records:
        raise DataError(f"{path}: no prompts found" + (f" ({report.summary()})" if report.n_skipped else ""))
    if report.n_skipped and stats is None:
        warnings.warn(f"{report.summary()}; first: {report.examples[0]}", stacklevel=2)
    return records


def load_prompt_file(
    path: str | os.PathLike,
    column: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    stats: PromptStats | None = None,
) -> list[str]:
    """The prompts of a .txt, .jsonl or .csv file, in file order (see `load_prompt_records`)."""
    return [r.prompt for r in load_prompt_records(path, column, on_error, stats)]
