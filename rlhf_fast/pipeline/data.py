"""Data of the pipeline: JSONL loading with errors that name the file, line and field; tokenization
with prompt truncation; and the padded batches the trainers consume.

Formats (one JSON object per line; blank lines are skipped):
  SFT        {"prompt": str, "response": str}
  ranked     {"prompt": str, "responses": [str, ...] (K >= 2), "ranking": [int, ...]}
             ``ranking[i]`` is the rank of ``responses[i]``, 0 = best, a permutation of 0..K-1
  prompts    {"prompt": str}
  ptx        {"text": str} (every token counts) or {"prompt": str, "response": str} (response tokens count)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

IGNORE = -100


class DataError(ValueError):
    """Bad user data: the message names the file, the line and the field."""


def read_jsonl(path: str | Path, required: dict[str, type]) -> list[dict]:
    """Objects of a JSONL file, each checked to have the `required` fields of the given types."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    rows = []
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
            for name, tp in required.items():
                if name not in obj:
                    raise DataError(f"{p}:{lineno}: field {name!r} is missing")
                if not isinstance(obj[name], tp):
                    raise DataError(f"{p}:{lineno}: field {name!r} must be {tp.__name__}, "
                                    f"got {type(obj[name]).__name__}")
            obj["_where"] = f"{p}:{lineno}"
            rows.append(obj)
    if not rows:
        raise DataError(f"{p}: the file is empty (no JSON lines)")
    return rows


def load_sft(path) -> list[dict]:
    return read_jsonl(path, {"prompt": str, "response": str})


def load_prompts(path) -> list[dict]:
    return read_jsonl(path, {"prompt": str})


def load_ranked(path) -> list[dict]:
    """Ranked answers; checks K >= 2, strings, and that `ranking` is a permutation of 0..K-1."""
    rows = read_jsonl(path, {"prompt": str, "responses": list, "ranking": list})
    for r in rows:
        where, k = r["_where"], len(r["responses"])
        if k < 2:
            raise DataError(f"{where}: field 'responses' needs K >= 2 answers, got {k}")
        for i, a in enumerate(r["responses"]):
            if not isinstance(a, str):
                raise DataError(f"{where}: field 'responses'[{i}] must be str, got {type(a).__name__}")
        ranking = r["ranking"]
        if len(ranking) != k or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking) \
                or sorted(ranking) != list(range(k)):
            raise DataError(f"{where}: field 'ranking' must be a permutation of 0..{k - 1} (one rank per "
                            f"response, 0 = best), got {ranking}")
    return rows


def load_ptx(path) -> list[dict]:
    p = Path(path)
    rows = read_jsonl(p, {})
    for r in rows:
        if "text" in r:
            if not isinstance(r["text"], str):
                raise DataError(f"{r['_where']}: field 'text' must be str, got {type(r['text']).__name__}")
        elif "prompt" in r and "response" in r:
            for f in ("prompt", "response"):
                if not isinstance(r[f], str):
                    raise DataError(f"{r['_where']}: field {f!r} must be str, got {type(r[f]).__name__}")
        else:
            raise DataError(f"{r['_where']}: field 'text' is missing (or give 'prompt' and 'response')")
    return rows


def write_jsonl(path, rows) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------

def pad_right(seqs: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """(ids (B, T), mask (B, T)) right-padded."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """(ids (B, T), mask (B, T)) left-padded (what generation wants)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, t - len(s):] = 1
    return ids, mask


@dataclass
class LMBatch:
    """Prompt + response sequences, right-padded, with next-token labels on the response tokens only.

    Example: prompt [1, 7], response [9, 2] and prompt [1], response [5, 6, 2], pad 0:
        input_ids [[1, 7, 9, 2], [1, 5, 6, 2]]   attention_mask all ones
        labels    [[-100, 9, 2], [5, 6, 2]]      (B, T - 1): labels[:, t] is predicted from position t
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device):
        return LMBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def rows(self, index) -> LMBatch:
        """The sub-batch of rows `index` (a slice or an index tensor), e.g. one micro-batch."""
        return LMBatch(self.input_ids[index], self.attention_mask[index], self.labels[index])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def lm_batch_masked(seqs: list[list[int]], train: list[list[bool]], pad: int) -> LMBatch:
    """An :class:`LMBatch` of whole token sequences whose next-token labels count where `train` is True
    (e.g. the assistant turns of a conversation)."""
    ids, mask = pad_right(seqs, pad)
    labels = torch.full_like(ids, IGNORE)
    for i, (s, t) in enumerate(zip(seqs, train, strict=True)):
        keep = torch.tensor(t, dtype=torch.bool)
        labels[i, : len(s)] = torch.where(keep, torch.tensor(s, dtype=torch.long), IGNORE)
    return LMBatch(ids, mask, labels[:, 1:].contiguous())


def lm_batch(prompts: list[list[int]], responses: list[list[int]], pad: int) -> LMBatch:
    """An :class:`LMBatch` of (prompt ids, response ids) pairs (a prompt may be empty: plain text)."""
    ids, mask = pad_right([p + r for p, r in zip(prompts, responses, strict=True)], pad)
    labels = torch.full_like(ids, IGNORE)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
    return LMBatch(ids, mask, labels[:, 1:].contiguous())
