"""Data of the pipeline: the stage loaders (every format of :mod:`rlhf_fast.pipeline.formats`, with errors
that name the source, the row and the field); tokenization with prompt truncation; and the padded batches
the trainers consume.

Our own JSONL (one JSON object per line; blank lines are skipped) is one of those formats:
  SFT        {"prompt": str, "response": str}  (read as prompt-completion)
  ranked     {"prompt": str, "responses": [str, ...] (K >= 2), "ranking": [int, ...]}
             ``ranking[i]`` is the rank of ``responses[i]``, 0 = best; ties share a rank
  prompts    {"prompt": str}
  ptx        {"text": str} (every token counts) or {"prompt": str, "response": str} (response tokens count)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlhf_fast.pipeline.formats import IndexedRows, Rows, load_examples
from rlhf_fast.pipeline.jsonl import DataError, iter_jsonl, read_jsonl  # noqa: F401  (re-exported)

IGNORE = -100


# The stage loaders read every format of rlhf_fast.pipeline.formats (TRL's standard formats, plain or
# conversational, from JSONL / Parquet / CSV / Arrow / save_to_disk folders / hub ids / datasets objects /
# lists) and return its canonical rows. Keyword options: format, split, subset, columns (the config fields
# data_format, data_split, data_subset, data_columns, data_lazy), streaming.

def _with_legacy_response(rows, legacy_response: bool):
    """Plain prompt-completion rows also carry the completion as "response" (the key the SFT and ptx code
    read before the canonical "completion"), unless `legacy_response` is False."""
    if not legacy_response:
        return rows

    def add(r):
        if isinstance(r.get("completion"), str):
            r = dict(r)
            r["response"] = r["completion"]
        return r

    if isinstance(rows, Rows):
        inner = rows
        return Rows(lambda: (add(r) for r in inner), inner.where)
    if isinstance(rows, IndexedRows):
        inner = rows
        return IndexedRows(len(inner), lambda i: add(inner[i]), inner.where)
    return [add(r) for r in rows]


def load_sft(path, *, format=None, split=None, subset=None, columns=None, streaming=False, lazy=False,
             legacy_response=True):
    """SFT rows: language modeling ({"text"} / {"messages"}) or prompt-completion ({"prompt", "completion"})."""
    rows = load_examples(path, stage="sft", format=format, split=split, subset=subset, columns=columns,
                         streaming=streaming, lazy=lazy)
    return _with_legacy_response(rows, legacy_response)


def load_prompts(path, *, format=None, split=None, subset=None, columns=None, streaming=False, lazy=False):
    """PPO prompts ({"prompt"}): prompt-only data, or the prompt of any other format."""
    return load_examples(path, stage="ppo", format=format, split=split, subset=subset, columns=columns,
                         streaming=streaming, lazy=lazy)


def load_ranked(path, *, format=None, split=None, subset=None, columns=None, merge_pairs=False, lazy=False):
    """Reward-model rows {"prompt", "responses", "ranking", "margin"}: ranked data (K >= 2, ties allowed,
    ``ranking[i]`` the rank of ``responses[i]``, 0 = best) or preference pairs (K = 2; ``merge_pairs=True``
    merges consistent pairs of a prompt into one ranking)."""
    return load_examples(path, stage="rm", format=format, split=split, subset=subset, columns=columns,
                         merge_pairs=merge_pairs, lazy=lazy)


def load_ptx(path, *, format=None, split=None, subset=None, columns=None, streaming=False, lazy=False,
             legacy_response=True):
    """ptx rows: {"text"} / {"messages"} (every token / every assistant token counts) or
    {"prompt", "completion"} (the completion's tokens count)."""
    rows = load_examples(path, stage="ptx", format=format, split=split, subset=subset, columns=columns,
                         streaming=streaming, lazy=lazy)
    return _with_legacy_response(rows, legacy_response)


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
