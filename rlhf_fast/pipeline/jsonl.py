"""JSON Lines in and out of the pipeline, with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """Bad user data: the message names the file, the line and the field."""


def iter_jsonl(path: str | Path):
    """(where, object) of each JSON line of `path`, read lazily; `where` is ``file:line``."""
    for where, obj, _, _ in iter_jsonl_at(path):
        yield where, obj


def iter_jsonl_at(path: str | Path):
    """(where, object, byte offset of the line, line number) of each JSON line of `path`, read lazily. Blank
    lines are skipped; malformed JSON, invalid UTF-8, a line that is not an object or a file without any
    object raise DataError naming ``file:line``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    seen = False
    with p.open("rb") as fh:
        offset = 0
        for lineno, raw in enumerate(fh, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            seen = True
            yield f"{p}:{lineno}", obj, start, lineno
    if not seen:
        raise DataError(f"{p}: the file is empty (no JSON lines)")


def read_jsonl(path: str | Path, required: dict[str, type]) -> list[dict]:
    """Objects of a JSONL file, each checked to have the `required` fields of the given types."""
    rows = []
    for where, obj in iter_jsonl(path):
        for name, tp in required.items():
            if name not in obj:
                raise DataError(f"{where}: field {name!r} is missing")
            if not isinstance(obj[name], tp):
                raise DataError(f"{where}: field {name!r} must be {tp.__name__}, got {type(obj[name]).__name__}")
        obj["_where"] = where
        rows.append(obj)
    return rows
