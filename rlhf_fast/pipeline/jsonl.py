"""JSON Lines in and out of the pipeline, with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """Bad user data: the message names the file, the line and the field."""


def iter_jsonl(path: str | Path):
    """(where, object) of each JSON line of `path`, read lazily; `where` is ``file:line``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    seen = False
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            seen = True
            yield f"{p}:{lineno}", obj
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
