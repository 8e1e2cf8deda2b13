"""Seed data: IFT and EFT JSONL files, checked line by line.

IFT rows: {"instruction": str, "response": str}
EFT rows: {"instruction": str, "response": str, "justification": str, "score": int 0..5}
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Iterator

from selfreward.errors import SelfRewardError

IFT_FIELDS = {"instruction": str, "response": str}
EFT_FIELDS = {"instruction": str, "response": str, "justification": str, "score": int}


def iter_jsonl(path: str | Path, what: str = "data file") -> Iterator[tuple[str, dict]]:
    """(file:line, object) for each non-blank line of a JSONL (or .jsonl.gz) file.

    Every problem raises SelfRewardError naming the file, and the line where there is one.
    """
    path = Path(path)
    if not path.is_file():
        raise SelfRewardError(f"{what} not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SelfRewardError(f"{where}: malformed JSON ({e.msg})") from None
                except ValueError as e:  # an integer of more than 4300 digits
                    raise SelfRewardError(f"{where}: malformed JSON ({str(e).split(':')[0]})") from None
                except RecursionError:
                    raise SelfRewardError(f"{where}: malformed JSON (nested too deeply)") from None
                if not isinstance(row, dict):
                    raise SelfRewardError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
    except (OSError, UnicodeDecodeError, EOFError) as e:
        # A truncated .gz or a binary file passed as JSONL: say which file, not a traceback.
        kind = "gzipped JSONL" if opener is gzip.open else "JSONL"
        raise SelfRewardError(f"{path}: cannot read as {kind} ({e})") from None


def read_jsonl(path: str | Path, fields: dict[str, type]) -> list[dict]:
    """Rows of a JSONL file; any bad line raises with the file and line number."""
    path = Path(path)
    rows = []
    for where, row in iter_jsonl(path):
        for name, kind in fields.items():
            if name not in row:
                raise SelfRewardError(f"{where}: missing field '{name}'")
            value = row[name]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise SelfRewardError(f"{where}: field '{name}' must be an integer, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise SelfRewardError(f"{where}: field '{name}' must be a string")
            if kind is str and not value.strip():
                raise SelfRewardError(f"{where}: field '{name}' is empty")
        if "score" in fields and not 0 <= row["score"] <= 5:
            raise SelfRewardError(f"{where}: score {row['score']} is outside 0..5")
        rows.append({name: row[name] for name in fields})
    if not rows:
        raise SelfRewardError(f"{path}: no rows")
    return rows


def read_ift(path) -> list[dict]:
    return read_jsonl(path, IFT_FIELDS)


def read_eft(path) -> list[dict]:
    return read_jsonl(path, EFT_FIELDS)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def eft_target(row: dict) -> str:
    """What the judge should write for an EFT row: its justification, then the score line."""
    return f"{row['justification'].strip()}\n\nScore: {row['score']}"
