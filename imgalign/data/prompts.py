"""Prompt sets: one prompt per line (.txt), per JSON object (.jsonl) or per CSV row (.csv).

    prompts = load_prompt_file("prompts.txt")                          # list[str]
    records = load_prompt_records("UniGenBench/test_prompts_en.csv")  # prompt + the other columns

- .txt: one prompt per line; blank lines and lines starting with '#' are skipped.
- .jsonl: one JSON object per line with a `prompt` or `caption` field (or `column=`); a bare JSON
  string is also a prompt.
- .csv: a header row and a `prompt`, `caption` or `prompt_en` column (UniGenBench), or `column=`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgalign.data.errors import DataError, short

__all__ = ["PROMPT_COLUMNS", "PromptRecord", "load_prompt_file", "load_prompt_records"]

PROMPT_COLUMNS = ("prompt", "caption", "prompt_en")  # looked for in this order


@dataclass
class PromptRecord:
    """One prompt, the line it starts on, and the record's other fields (e.g. UniGenBench test points)."""

    prompt: str
    line: int
    fields: dict[str, Any] = field(default_factory=dict)


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


def _read_txt(path: Path) -> list[PromptRecord]:
    out = []
    with open(path, encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            text = line.strip()
            if text and not text.startswith("#"):
                out.append(PromptRecord(text, line_no))
    return out


def _read_jsonl(path: Path, column: str | None) -> list[PromptRecord]:
    out = []
    with open(path, encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e}); write one JSON object per line") from None
            if isinstance(rec, str):
                rec = {"prompt": rec}
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object with a prompt field, got {short(rec)}")
            key = _pick_column(list(rec), column, where)
            text = rec[key]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string, got {short(text)!r}")
            out.append(PromptRecord(text.strip(), line_no, {k: v for k, v in rec.items() if k != key}))
    return out


def _read_csv(path: Path, column: str | None) -> list[PromptRecord]:
    out = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV file; the first row must name the columns")
        key = _pick_column([c.strip() for c in reader.fieldnames], column, f"{path} line 1 (header)")
        raw_key = next(c for c in reader.fieldnames if c.strip() == key)
        start = reader.line_num + 1
        for rec in reader:
            text = rec.get(raw_key)
            if text is None or not text.strip():
                raise DataError(
                    f"{path} line {start}: empty {key!r} value; give every row a prompt or delete the row"
                )
            out.append(PromptRecord(text.strip(), start, {k: v for k, v in rec.items() if k != raw_key}))
            start = reader.line_num + 1  # quoted fields may span lines
    return out


def load_prompt_records(path: str | os.PathLike, column: str | None = None) -> list[PromptRecord]:
    """Prompts with their line numbers and the other fields of each record (CSV columns, JSON keys)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ""):
            records = _read_txt(path)
        elif suffix == ".jsonl":
            records = _read_jsonl(path, column)
        elif suffix == ".csv":
            records = _read_csv(path, column)
        else:
            raise DataError(f"{path}: unsupported prompt file type {suffix!r}; use .txt, .jsonl or .csv")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    if not records:
        raise DataError(f"{path}: no prompts found")
    return records


def load_prompt_file(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """The prompts of a .txt, .jsonl or .csv file, in file order."""
    return [r.prompt for r in load_prompt_records(path, column)]
