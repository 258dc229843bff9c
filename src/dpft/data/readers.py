"""Small per-format file readers. Parsed files are cached by path, so a test session (or a sweep
in one process) parses e.g. the 30 MB SQuAD train file once. Callers must not mutate the results."""

from __future__ import annotations

import csv
import json
from functools import cache
from pathlib import Path
from typing import Any

Column = str | int  # a header name, or a position (-1 = last column)


@cache
def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@cache
def read_jsonl(path: Path) -> tuple[dict, ...]:
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


@cache
def read_table(path: Path, columns: tuple[Column, Column | None, Column],
               strip: bool = True) -> tuple[tuple[str, str | None, str], ...]:
    """(text_a, text_b or None, label) per row of a .tsv or .csv file, whitespace-stripped (the texts as written
    with `strip=False`; labels are always stripped).

    Columns given by name mean the file has a header line. ``.tsv`` lines are split on tabs with no
    quote handling (GLUE/LM-BFF tsv files contain bare quote characters); ``.csv`` goes through the
    csv module (LM-BFF's SST-5/TREC files quote sentences that contain commas).
    """
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            rows = [r for r in csv.reader(f) if r]
        else:
            rows = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    if any(isinstance(c, str) for c in columns):
        header, rows = rows[0], rows[1:]
        columns = tuple(header.index(c) if isinstance(c, str) else c for c in columns)  # type: ignore[assignment]
    a, b, y = columns
    text = str.strip if strip else str
    return tuple((text(r[a]), None if b is None else text(r[b]), r[y].strip()) for r in rows)  # type: ignore[index]
