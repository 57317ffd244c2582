"""attention, varlen_attention, shared_prefix_attention: fused softmax(q k^T * scale) v with causal masks,
key padding, grouped-query heads, packed sequences, and one prompt shared by K answers.

Flow, per entry point: public function (validates, documents shapes) -> custom op
``rlhf_fast::attention`` / ``rlhf_fast::varlen_attention`` / ``rlhf_fast::shared_prefix_attention``
(fake impl + registered autograd whose backward is a second custom op, so all three trace under
torch.compile and pass opcheck) -> the backend chosen by rlhf_fast.backends:

  triton  kernels/attention.py: flash-attention-2 (tiled online softmax, logsumexp saved, backward by
          recomputation), one kernel family for all three entry points, driven by segment tables
  cpu     PyTorch's fused flash-attention CPU kernel (the one F.scaled_dot_product_attention runs),
          composed: bottom-right causal alignment and shared prefixes are split into calls whose
          results are merged by their logsumexps; no (T, S) mask and no copy of a prompt's K/V per
          answer is ever built (registered with native=False: it needs no rlhf_fast._C kernel)
  torch   rlhf_fast/reference.py: the plain math, for tests and as the fallback of last resort

Cost model: see kernels/attention.py. In short, eager attention writes and reads (T, S) fp32 scores and
probabilities several times per head; the fused kernels keep them on chip, save one fp32 logsumexp per
query row, and recompute the probabilities in the backward.

Layouts returned by every backend (the fake impls promise them):
  attention         out (B, Hq, T, D) stored as (B, T, Hq, D) (what transformers wants next: its
                    ``transpose(1, 2).contiguous()`` is then free); lse (B, Hq, T) fp32; dq/dk/dv in the
                    same (B, T, H, D) storage
  varlen / shared   out (total_q, Hq, D) contiguous; lse (Hq, total_q) fp32; dq/dk/dv contiguous
The saved lse is +inf for query rows that see no key, so that exp(s - lse) is exactly 0 for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.reference import (
    attention_ref,
    causal_mask_ref,
    masked_attention_backward_ref,
    shared_prefix_attention_ref,
    shared_prefix_mask_ref,
    varlen_attention_ref,
)

OP = op_registry("attention")
VARLEN_OP = op_registry("varlen_attention")
SHARED_OP = op_registry("shared_prefix_attention")

MAX_HEAD_DIM = 256
QKV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_INF = float("inf")


# ---------------------------------------------------------------------------------------------
# Segment tables (the Triton kernels' description of who attends to whom; see kernels/attention.py).
# Query segments [batch, q_lo, q_hi, ka_lo, ka_hi, kb_lo, kb_hi, diag]: queries i in [q_lo, q_hi) see
# all keys of [ka_lo, ka_hi) and the keys j in [kb_lo, kb_hi) with j <= i + diag (causal). Key segments
# [batch, k_lo, k_hi, qa_lo, qa_hi, qb_lo, qb_hi, diag]: the same relation seen from the keys.
# Built with device-side torch ops only (no host synchronisation), int32.
# ---------------------------------------------------------------------------------------------

def dense_segments(batch: int, t: int, s: int, key_mask: Tensor | None, device) -> tuple[Tensor, Tensor]:
    """Segments of a (B, T) x (B, S) batch: one per batch element. With a key mask, the key range is
    narrowed to [first kept key, last kept key + 1), so leading and trailing padding is never visited."""
    b = torch.arange(batch, device=device)
    zero = torch.zeros_like(b)
    if key_mask is None:
        lo, hi = zero, torch.full_like(b, s)
    else:
        idx = torch.arange(s, device=device)
        lo = torch.where(key_mask, idx, s).amin(dim=1) if s else zero
        hi = torch.where(key_mask, idx + 1, 0).amax(dim=1) if s else zero
        lo = torch.minimum(lo, hi)  # an all-padding row: the empty range [0, 0)
    tt, diag = torch.full_like(b, t), torch.full_like(b, s - t)
    q_seg = torch.stack([b, zero, tt, zero, zero, lo, hi, diag], dim=1).to(torch.int32)
    k_seg = torch.stack([b, lo, hi, zero, zero, zero, tt, diag], dim=1).to(torch.int32)
    return q_seg.contiguous(), k_seg.contiguous()


def varlen_segments(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
    """Segments of packed sequences: sequence i is queries [cu_q[i], cu_q[i+1]) and keys
    [cu_k[i], cu_k[i+1]), causal diagonal aligned to the ends of both (diag = k_hi - q_hi)."""
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    qlo, qhi, klo, khi = cq[:-1], cq[1:], ck[:-1], ck[1:]
    zero = torch.zeros_like(qlo)
    diag = khi - qhi
    q_seg = torch.stack([zero, qlo, qhi, zero, zero, klo, khi, diag], dim=1).to(torch.int32)
    k_seg = torch.stack([zero, klo, khi, zero, zero, qlo, qhi, diag], dim=1).to(torch.int32)
    return q_seg.contiguous(), k_seg.contiguous()


# ---------------------------------------------------------------------------------------------
# Shared-prefix layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SharedPrefixLayout:
    """Where every token of a shared-prefix packed batch sits, and what the model must be told.

    G groups are packed one after the other along one token axis; group g is
    ``[prompt_g, answer_g1, ..., answer_gK]`` (K may differ per group). Build it with
    :func:`shared_prefix_layout`; every tensor lives on ``device``. Answers are numbered globally,
    group by group (answer a of all ``num_answers``). Fields:

      prompt_lens, answer_lens   the lengths it was built from (host tuples)
      total                      tokens in the packed batch
      group_starts               (G,) host tuple: packed index of each group's first prompt token
      position_ids               (total,) int64: 0..P-1 on the prompt, P..P+L-1 on every answer (each
                                 answer continues the prompt, as if it were the only one)
      answer_ids                 (total,) int64: the global answer of each token, -1 on prompt tokens
      group_ids                  (total,) int64: the group of each token
      answer_starts/answer_ends  (A,) int64: packed range of each answer
      last_token_index           (A,) int64: packed index of each answer's last token (reward models
                                 read their scalar head there)
      answer_group               (A,) int64: group of each answer
      target_index               (N,) int64: packed index of every answer token, answer by answer
      source_index               (N,) int64: the token whose logits predict it: the prompt's last token
                                 for an answer's first token, the previous answer token otherwise
      target_answer              (N,) int64: answer of each of those tokens
      q_segments, k_segments     (n, 8) int32 segment tables of the Triton kernels
      max_q_len, max_k_len       longest prompt or answer (launch grid of the kernels)
    """

    prompt_lens: tuple[int, ...]
    answer_lens: tuple[tuple[int, ...], ...]
    total: int
    group_starts: tuple[int, ...]
    position_ids: Tensor
    answer_ids: Tensor
    group_ids: Tensor
    answer_starts: Tensor
    answer_ends: Tensor
    last_token_index: Tensor
    answer_group: Tensor
    target_index: Tensor
    source_index: Tensor
    target_answer: Tensor
    q_segments: Tensor
    k_segments: Tensor
    max_q_len: int
    max_k_len: int

    @property
    def num_groups(self) -> int:
        return len(self.prompt_lens)

    @property
    def num_answers(self) -> int:
        return sum(len(a) for a in self.answer_lens)

    @property
    def device(self) -> torch.device:
        return self.position_ids.device

    def to(self, device) -> SharedPrefixLayout:
        return shared_prefix_layout(self.prompt_lens, self.answer_lens, device=device)

    def pack(self, prompts: Sequence[Tensor], answers: Sequence[Sequence[Tensor]]) -> Tensor:
        """Concatenate per-token tensors (e.g. token ids, each (len, ...)) into the packed order."""
        if len(prompts) != self.num_groups or len(answers) != self.num_groups:
            raise ValueError(f"prompts/answers: expected {self.num_groups} groups, got {len(prompts)} and "
                             f"{len(answers)}")
        parts = []
        for g, (p, ans) in enumerate(zip(prompts, answers, strict=True)):
            if p.shape[0] != self.prompt_lens[g] or tuple(a.shape[0] for a in ans) != self.answer_lens[g]:
                raise ValueError(f"prompts/answers: group {g} has lengths {p.shape[0]} / "
                                 f"{[a.shape[0] for a in ans]}, the layout {self.prompt_lens[g]} / "
                                 f"{list(self.answer_lens[g])}")
            parts.append(p)
            parts.extend(ans)
        return torch.cat(parts)

    def split_answers(self, x: Tensor, dim: int = 0) -> list[Tensor]:
        """Per-answer views of a packed tensor (answers in global order)."""
        return [x.narrow(dim, s, e - s) for s, e in self._host_answer_ranges()]

    def _host_answer_ranges(self) -> list[tuple[int, int]]:
        out = []
        for start, p, answers in zip(self.group_starts, self.prompt_lens, self.answer_lens, strict=True):
            s = start + p
            for n in answers:
                out.append((s, s + n))
                s += n
        return out


def shared_prefix_layout(prompt_lens, answer_lens, device=None) -> SharedPrefixLayout:
    """Layout of G groups ``[prompt_g, answer_g1, ..., answer_gK_g]`` packed along one token axis.

    Args:
        prompt_lens: G prompt lengths, each >= 1 (ints, or a 1-D integer tensor).
        answer_lens: G sequences of answer lengths, each answer >= 1 token and each group >= 1 answer.
        device: where the layout's tensors live (that of q/k/v).

    Example (one prompt of 3 tokens, two answers of 2 and 1 tokens)::

        layout = shared_prefix_layout([3], [[2, 1]])
        # packed tokens      p0 p1 p2 a0 a1 b0
        # layout.position_ids  0  1  2  3  4  3     (b0 continues the prompt, like a0)
        # layout.answer_ids   -1 -1 -1  0  0  1
        # layout.last_token_index = [4, 5]; source_index = [2, 3, 2] predicts target_index = [3, 4, 5]
    """
    if isinstance(prompt_lens, Tensor):
        prompt_lens = prompt_lens.tolist()
    prompt_lens = tuple(int(p) for p in prompt_lens)
    answer_lens = tuple(tuple(int(n) for n in (a.tolist() if isinstance(a, Tensor) else a)) for a in answer_lens)
    if len(prompt_lens) != len(answer_lens):
        raise ValueError(f"answer_lens: expected one list of answer lengths per prompt ({len(prompt_lens)}), "
                         f"got {len(answer_lens)}")
    if len(prompt_lens) == 0:
        raise ValueError("prompt_lens: expected at least one group, got none")
    for g, (p, answers) in enumerate(zip(prompt_lens, answer_lens, strict=True)):
        if p < 1:
            raise ValueError(f"prompt_lens: expected every prompt length >= 1, got {p} for group {g}")
        if len(answers) == 0 or min(answers) < 1:
            raise ValueError(f"answer_lens: expected >= 1 answers of >= 1 tokens per group, got {list(answers)} "
                             f"for group {g}")

    positions, answer_ids, group_ids, starts, ends, agroup, tgt, src, tans = [], [], [], [], [], [], [], [], []
    q_seg, k_seg, group_starts = [], [], []
    offset, a_id = 0, 0
    for g, (p, answers) in enumerate(zip(prompt_lens, answer_lens, strict=True)):
        group_starts.append(offset)
        g_end = offset + p + sum(answers)
        positions.extend(range(p))
        answer_ids.extend([-1] * p)
        q_seg.append([0, offset, offset + p, 0, 0, offset, offset + p, 0])
        k_seg.append([0, offset, offset + p, offset + p, g_end, offset, offset + p, 0])
        s = offset + p
        for n in answers:
            positions.extend(range(p, p + n))
            answer_ids.extend([a_id] * n)
            starts.append(s)
            ends.append(s + n)
            agroup.append(g)
            tgt.extend(range(s, s + n))
            src.extend([offset + p - 1] + list(range(s, s + n - 1)))
            tans.extend([a_id] * n)
            q_seg.append([0, s, s + n, offset, offset + p, s, s + n, 0])
            k_seg.append([0, s, s + n, 0, 0, s, s + n, 0])
            s += n
            a_id += 1
        group_ids.extend([g] * (g_end - offset))
        offset = g_end

    def t(x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype, device=device)

    ends_t = t(ends)
    longest = max(max(prompt_lens), max(max(a) for a in answer_lens))
    return SharedPrefixLayout(
        prompt_lens=prompt_lens, answer_lens=answer_lens, total=offset, group_starts=tuple(group_starts),
        position_ids=t(positions), answer_ids=t(answer_ids), group_ids=t(group_ids), answer_starts=t(starts),
        answer_ends=ends_t, last_token_index=ends_t - 1, answer_group=t(agroup), target_index=t(tgt),
        source_index=t(src), target_answer=t(tans), q_segments=t(q_seg, torch.int32),
        k_segments=t(k_seg, torch.int32), max_q_len=longest, max_k_len=longest)


def _shared_prefix_groups(q_segments: Tensor) -> tuple[list[int], list[list[int]]]:
    """(prompt_lens, answer_lens) back from a shared-prefix segment table (host)."""
    prompts, answers = [], []
    for _, lo, hi, ka_lo, ka_hi, *_ in q_segments.tolist():
        if ka_hi == ka_lo:  # no shared range: a prompt opens a new group
            prompts.append(hi - lo)
            answers.append([])
        else:
            answers[-1].append(hi - lo)
    return prompts, answers


# ---------------------------------------------------------------------------------------------
# Output layouts
# ---------------------------------------------------------------------------------------------

def _empty_bthd(b: int, h: int, t: int, d: int, like: Tensor) -> Tensor:
    """(B, H, T, D) tensor stored as (B, T, H, D)."""
    return torch.empty((b, t, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


def _as_bthd(x: Tensor) -> Tensor:
    """x (B, H, T, D) in (B, T, H, D) storage, copied only when it is stored otherwise."""
    y = x.transpose(1, 2)
    return x if y.is_contiguous() else y.contiguous().transpose(1, 2)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------
# torch backend (reference.py): forward and backward in plain math on the explicit (T, S) mask
# ---------------------------------------------------------------------------------------------

def _dense_allowed(t, s, key_mask, causal, device):
    allowed = causal_mask_ref(t, s, device) if causal else torch.ones(t, s, dtype=torch.bool, device=device)
    return allowed if key_mask is None else allowed & key_mask[:, None, None, :]


def _torch_forward(q, k, v, key_mask, causal, scale):
    out, lse = attention_ref(q, k, v, causal=causal, attention_mask=key_mask, scale=scale, return_lse=True)
    return _as_bthd(out), torch.where(lse == -_INF, _INF, lse).float()


def _torch_backward(dout, q, k, v, out, lse, key_mask, causal, scale):
    allowed = _dense_allowed(q.shape[2], k.shape[2], key_mask, causal, q.device)
    return tuple(_as_bthd(g) for g in masked_attention_backward_ref(dout, q, k, v, allowed, scale))


def _torch_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out, lse = varlen_attention_ref(q, k, v, cu_q, cu_k, causal=causal, scale=scale, return_lse=True)
    return out.contiguous(), torch.where(lse == -_INF, _INF, lse).float().contiguous()


def _torch_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    dq, dk, dv = (torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        allowed = _dense_allowed(qs.stop - qs.start, ks.stop - ks.start, None, causal, q.device)
        grads = masked_attention_backward_ref(*(x.transpose(0, 1) for x in (dout[qs], q[qs], k[ks], v[ks])),
                                              allowed, scale)
        for dst, rows, g in zip((dq, dk, dv), (qs, ks, ks), grads, strict=True):
            dst[rows] = g.transpose(0, 1)
    return dq, dk, dv


def _torch_shared_forward(q, k, v, q_seg, k_seg, max_q, max_k, scale):
    prompts, answers = _shared_prefix_groups(q_seg)
    out, lse = shared_prefix_attention_ref(q, k, v, prompts, answers, scale=scale, return_lse=True)
    return out.contiguous(), lse.float().contiguous()


def _torch_shared_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, scale):
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    start = 0
    for p, group_answers in zip(*_shared_prefix_groups(q_seg), strict=True):
        rows = slice(start, start + p + sum(group_answers))
        allowed = shared_prefix_mask_ref(p, group_answers, q.device)
        grads = masked_attention_backward_ref(*(x[rows].transpose(0, 1) for x in (dout, q, k, v)), allowed, scale)
        for dst, g in zip((dq, dk, dv), grads, strict=True):
            dst[rows] = g.transpose(0, 1)
        start = rows.stop
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# cpu backend: torch's fused flash-attention CPU kernel (aten::_scaled_dot_product_flash_attention_for_cpu,
# what F.scaled_dot_product_attention runs on CPU), forward with its logsumexp and its own backward.
# It aligns is_causal top-left and takes an additive mask of q's dtype; GQA heads are native.
# ---------------------------------------------------------------------------------------------

def _flash_cpu(q, k, v, causal, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                       scale=scale)


def _flash_cpu_bwd(dout, q, k, v, out, lse, causal, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def _dense_parts(t: int, s: int, causal: bool):
    """The (bottom-right) causal problem as calls of a top-left-causal kernel:
    [(q rows (lo, hi), key rows (lo, hi), causal)]. T < S: all queries see keys [0, S - T) whole and the
    last T keys causally (a square); T > S: the first T - S queries see nothing, the last S a square."""
    if t == 0 or s == 0:
        return []
    if not causal or t == s:
        return [((0, t), (0, s), causal)]
    if t < s:
        return [((0, t), (0, s - t), False), ((0, t), (s - t, s), True)]
    return [((t - s, t), (0, s), True)]


def _part_empty_rows(key_mask: Tensor | None, q_rows: int, k_range, causal: bool):
    """(B, q_rows) bool: rows of a part that see no kept key (None when no row can be empty)."""
    if key_mask is None:
        return None
    part = key_mask[:, k_range[0]:k_range[1]]
    if not causal:
        return (~part.any(dim=1))[:, None].expand(-1, q_rows)
    # top-left causal square: row r sees part keys [0, r]; empty iff the first kept key comes after r
    idx = torch.arange(part.shape[1], device=part.device)
    first = torch.where(part, idx, part.shape[1]).amin(dim=1) if part.shape[1] else part.new_zeros(
        part.shape[0], dtype=torch.long)
    return first[:, None] > torch.arange(q_rows, device=part.device)[None, :]


def _additive(key_mask: Tensor | None, k_range, dtype):
    if key_mask is None:
        return None
    part = key_mask[:, None, None, k_range[0]:k_range[1]]
    return torch.zeros(part.shape, dtype=dtype, device=part.device).masked_fill_(~part, -_INF)


def _cpu_dense_forward(q, k, v, key_mask, causal, scale):
    """(out (B, Hq, T, D) in (B, T, H, D) storage, lse (B, Hq, T) fp32 with +inf on empty rows)."""
    b, h, t, d = q.shape
    s = k.shape[2]
    out = _empty_bthd(b, h, t, d, q)
    lse = torch.full((b, h, t), -_INF, dtype=torch.float32, device=q.device)
    parts = _dense_parts(t, s, causal)
    if not parts or (len(parts) == 1 and parts[0][0] != (0, t)):
        out.zero_()
    results = []
    for (q0, q1), (k0, k1), c in parts:
        o, part_lse = _flash_cpu(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], c, _additive(key_mask, (k0, k1),
                                                                                              q.dtype), scale)
        empty = _part_empty_rows(key_mask, q1 - q0, (k0, k1), c)
        if empty is not None:  # the kernel reports lse 0 for a row it saw no key for
            part_lse = part_lse.masked_fill(empty[:, None, :], -_INF)
        results.append(((q0, q1), o, part_lse))
    if len(results) == 1:
        (q0, q1), o, part_lse = results[0]
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = part_lse
    elif len(results) == 2:  # T < S: merge the two key ranges by their logsumexps (split-KV merge)
        (_, oa, la), (_, ob, lb) = results
        lse = torch.logaddexp(la, lb)
        base = torch.where(lse == -_INF, 0.0, lse)
        wa, wb = torch.exp(la - base)[..., None], torch.exp(lb - base)[..., None]
        out.copy_(oa.float() * wa + ob.float() * wb)
    return out, torch.where(lse == -_INF, _INF, lse)


def _cpu_dense_backward(dout, q, k, v, out, lse, key_mask, causal, scale):
    """Each part's backward with the FINAL out and lse: P = exp(S - lse) and delta = rowsum(dO * O) then
    are those of the whole softmax restricted to the part's keys, so the parts' gradients add up exactly."""
    b, h, t, d = q.shape
    s = k.shape[2]
    parts = _dense_parts(t, s, causal)
    if len(parts) == 1 and parts[0][0] == (0, t) and parts[0][1] == (0, s):
        (_, _, c), = parts
        grads = _flash_cpu_bwd(dout, q, k, v, out, lse, c, _additive(key_mask, (0, s), q.dtype), scale)
        return tuple(_as_bthd(g) for g in grads)
    dq = _empty_bthd(b, h, t, d, q).zero_()
    dk = _empty_bthd(b, k.shape[1], s, d, k).zero_()
    dv = _empty_bthd(b, v.shape[1], s, d, v).zero_()
    for (q0, q1), (k0, k1), c in parts:
        gq, gk, gv = _flash_cpu_bwd(dout[:, :, q0:q1], q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                                    out[:, :, q0:q1], lse[:, :, q0:q1].contiguous(), c,
                                    _additive(key_mask, (k0, k1), q.dtype), scale)
        dq[:, :, q0:q1] += gq
        dk[:, :, k0:k1] += gk
        dv[:, :, k0:k1] += gv
    return dq, dk, dv


def _seq_view(x: Tensor, lo: int, hi: int) -> Tensor:
    """Rows [lo, hi) of a packed (total, H, D) tensor as a (1, H, L, D) view."""
    return x[lo:hi].transpose(0, 1).unsqueeze(0)


def _cpu_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue
        o, part_lse = _cpu_dense_forward(_seq_view(q, cq[i], cq[i + 1]), _seq_view(k, ck[i], ck[i + 1]),
                                         _seq_view(v, ck[i], ck[i + 1]), None, causal, scale)
        out[cq[i]:cq[i + 1]] = o[0].transpose(0, 1)
        lse[:, cq[i]:cq[i + 1]] = part_lse[0]
    return out, lse


def _cpu_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i] or ck[i + 1] == ck[i]:
            continue
        qs, ks = (cq[i], cq[i + 1]), (ck[i], ck[i + 1])
        gq, gk, gv = _cpu_dense_backward(_seq_view(dout, *qs), _seq_view(q, *qs), _seq_view(k, *ks),
                                         _seq_view(v, *ks), _seq_view(out, *qs), lse[None, :, qs[0]:qs[1]],
                                         None, causal, scale)
        dq[qs[0]:qs[1]] = gq[0].transpose(0, 1)
        dk[ks[0]:ks[1]] = gk[0].transpose(0, 1)
        dv[ks[0]:ks[1]] = gv[0].transpose(0, 1)
    return dq, dk, dv


def _shared_runs(q_seg: Tensor):
    """Host view of a shared-prefix segment table: [(q_lo, q_hi, kb_lo, kb_hi)] per segment (own keys,
    causal), and [(rows_lo, rows_hi, ka_lo, ka_hi)] per group: the answers' rows, contiguous, and the
    prompt keys they all see whole."""
    own, shared = [], {}
    for _, q_lo, q_hi, ka_lo, ka_hi, kb_lo, kb_hi, diag in q_seg.tolist():
        if q_hi - q_lo != kb_hi - kb_lo or diag != 0:
            raise ValueError("q_segments: not a shared-prefix table (a segment attends to a range of "
                             "another length, or off the diagonal)")
        own.append((q_lo, q_hi, kb_lo, kb_hi))
        if ka_hi > ka_lo:
            lo, hi = shared.get((ka_lo, ka_hi), (q_lo, q_hi))
            shared[(ka_lo, ka_hi)] = (min(lo, q_lo), max(hi, q_hi))
    return own, [(lo, hi, ka_lo, ka_hi) for (ka_lo, ka_hi), (lo, hi) in shared.items()]


def _cpu_shared_forward(q, k, v, q_seg, k_seg, max_q, max_k, scale):
    """Per group: the prompt causally (1 call), every answer causally on its own keys (1 call each), and all
    answers of the group at once against the prompt's K/V (1 call, the prompt K/V read in place, never
    copied per answer); the two results of an answer row are merged by their logsumexps."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    own, shared = _shared_runs(q_seg)
    for q_lo, q_hi, k_lo, k_hi in own:
        o, part_lse = _flash_cpu(_seq_view(q, q_lo, q_hi), _seq_view(k, k_lo, k_hi), _seq_view(v, k_lo, k_hi), True,
                                 None, scale)
        out[q_lo:q_hi] = o[0].transpose(0, 1)
        lse[:, q_lo:q_hi] = part_lse[0]
    for lo, hi, ka_lo, ka_hi in shared:
        oa, la = _flash_cpu(_seq_view(q, lo, hi), _seq_view(k, ka_lo, ka_hi), _seq_view(v, ka_lo, ka_hi), False,
                            None, scale)
        oa, la = oa[0].transpose(0, 1), la[0]  # (rows, H, D), (H, rows)
        lb = lse[:, lo:hi]
        merged = torch.logaddexp(la, lb)
        wa, wb = torch.exp(la - merged).t()[..., None], torch.exp(lb - merged).t()[..., None]
        out[lo:hi] = oa.float() * wa + out[lo:hi].float() * wb
        lse[:, lo:hi] = merged
    return out, lse


def _cpu_shared_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, scale):
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    own, shared = _shared_runs(q_seg)
    runs = [(q_lo, q_hi, k_lo, k_hi, True) for q_lo, q_hi, k_lo, k_hi in own]
    runs += [(lo, hi, ka_lo, ka_hi, False) for lo, hi, ka_lo, ka_hi in shared]
    for q_lo, q_hi, k_lo, k_hi, causal in runs:  # final out and lse: see _cpu_dense_backward
        gq, gk, gv = _flash_cpu_bwd(_seq_view(dout, q_lo, q_hi), _seq_view(q, q_lo, q_hi), _seq_view(k, k_lo, k_hi),
                                    _seq_view(v, k_lo, k_hi), _seq_view(out, q_lo, q_hi),
                                    lse[None, :, q_lo:q_hi].contiguous(), causal, None, scale)
        dq[q_lo:q_hi] += gq[0].transpose(0, 1)
        dk[k_lo:k_hi] += gk[0].transpose(0, 1)
        dv[k_lo:k_hi] += gv[0].transpose(0, 1)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# triton backend (kernels/attention.py)
# ---------------------------------------------------------------------------------------------

def _packed4(x: Tensor) -> Tensor:
    """(total, H, D) -> the (1, H, total, D) view the kernels take."""
    return x.permute(1, 0, 2).unsqueeze(0)


def _triton_forward(q, k, v, key_mask, causal, scale):
    from rlhf_fast.kernels import attention as K

    b, h, t, d = q.shape
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = _empty_bthd(b, h, t, d, q)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    q_seg, _ = dense_segments(b, t, k.shape[2], key_mask, q.device)
    km = None if key_mask is None else key_mask.view(torch.uint8)
    K.segment_attention_fwd(q, k, v, out, lse, q_seg, t, key_mask=km, causal=causal, scale=scale,
                            has_range_a=False)
    return out, lse


def _triton_backward(dout, q, k, v, out, lse, key_mask, causal, scale):
    from rlhf_fast.kernels import attention as K

    b, h, t, d = q.shape
    s = k.shape[2]
    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    dq = _empty_bthd(b, h, t, d, q)
    dk, dv = _empty_bthd(b, k.shape[1], s, d, k), _empty_bthd(b, v.shape[1], s, d, v)
    if key_mask is not None:  # keys outside [first kept, last kept] belong to no segment
        dk.zero_()
        dv.zero_()
    q_seg, k_seg = dense_segments(b, t, s, key_mask, q.device)
    km = None if key_mask is None else key_mask.view(torch.uint8)
    K.segment_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, q_seg, k_seg, t, s, key_mask=km, causal=causal,
                            scale=scale, has_range_a=False)
    return dq, dk, dv


def _triton_packed_forward(q, k, v, q_seg, max_q, causal, scale, has_range_a):
    from rlhf_fast.kernels import attention as K

    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    if q.shape[0] > 0:
        K.segment_attention_fwd(_packed4(q), _packed4(k), _packed4(v), _packed4(out), lse[None], q_seg, max_q,
                                causal=causal, scale=scale, has_range_a=has_range_a)
    return out, lse


def _triton_packed_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, causal, scale, has_range_a):
    from rlhf_fast.kernels import attention as K

    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    # zeroed: keys of sequences with no query (varlen) belong to a segment that has no query row
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if q.shape[0] > 0:
        K.segment_attention_bwd(_packed4(dout), _packed4(q), _packed4(k), _packed4(v), _packed4(out), lse[None],
                                _packed4(dq), _packed4(dk), _packed4(dv), q_seg, k_seg, max_q, max_k, causal=causal,
                                scale=scale, has_range_a=has_range_a)
    return dq, dk, dv


def _triton_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    q_seg, _ = varlen_segments(cu_q, cu_k)
    return _triton_packed_forward(q, k, v, q_seg, max_q, causal, scale, False)


def _triton_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    q_seg, k_seg = varlen_segments(cu_q, cu_k)
    return _triton_packed_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, causal, scale, False)


def _triton_shared_forward(q, k, v, q_seg, k_seg, max_q, max_k, scale):
    return _triton_packed_forward(q, k, v, q_seg, max_q, True, scale, True)


def _triton_shared_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, scale):
    return _triton_packed_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, True, scale, True)


def _triton_limits(q, *_):
    if q.shape[-1] > MAX_HEAD_DIM:
        return [f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"]
    return []


OP.register("torch", _torch_forward, _torch_backward)
OP.register("cpu", _cpu_dense_forward, _cpu_dense_backward, native=False)
OP.register("triton", _triton_forward, _triton_backward, limits=_triton_limits)
VARLEN_OP.register("torch", _torch_varlen_forward, _torch_varlen_backward)
VARLEN_OP.register("cpu", _cpu_varlen_forward, _cpu_varlen_backward, native=False)
VARLEN_OP.register("triton", _triton_varlen_forward, _triton_varlen_backward, limits=_triton_limits)
SHARED_OP.register("torch", _torch_shared_forward, _torch_shared_backward)
SHARED_OP.register("cpu", _cpu_shared_forward, _cpu_shared_backward, native=False)
SHARED_OP.register("triton", _triton_shared_forward, _triton_shared_backward, limits=_triton_limits)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float,
                  backend: str) -> tuple[Tensor, Tensor]:
    return OP.impl(backend).forward(q, k, v, key_mask, causal, scale)


@_attention_op.register_fake
def _(q, k, v, key_mask, causal, scale, backend):
    b, h, t, d = q.shape
    return _empty_bthd(b, h, t, d, q), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("rlhf_fast::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           key_mask: Tensor | None, causal: bool, scale: float,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return OP.impl(backend).backward(dout, q, k, v, out, lse, key_mask, causal, scale)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_mask, causal, scale, backend):
    return tuple(_empty_bthd(*x.shape, x) for x in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, key_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask)
    ctx.args = (causal, scale, backend)


def _attention_bwd(ctx, dout, _dlse):
    q, k, v, out, lse, key_mask = ctx.saved_tensors
    causal, scale, backend = ctx.args
    dq, dk, dv = _attention_backward_op(dout, q, k, v, out, lse, key_mask, causal, scale, backend)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_attention_bwd, setup_context=_attention_setup)


@torch.library.custom_op("rlhf_fast::varlen_attention", mutates_args=())
def _varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
               max_seqlen_k: int, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return VARLEN_OP.impl(backend).forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                           scale)


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("rlhf_fast::varlen_attention_backward", mutates_args=())
def _varlen_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
                        cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return VARLEN_OP.impl(backend).backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, causal, scale)


@_varlen_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, backend)


def _varlen_bwd(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, causal, scale, backend = ctx.args
    dq, dk, dv = _varlen_backward_op(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, backend)
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_op.register_autograd(_varlen_bwd, setup_context=_varlen_setup)


@torch.library.custom_op("rlhf_fast::shared_prefix_attention", mutates_args=())
def _shared_op(q: Tensor, k: Tensor, v: Tensor, q_segments: Tensor, k_segments: Tensor, max_q_len: int,
               max_k_len: int, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return SHARED_OP.impl(backend).forward(q, k, v, q_segments, k_segments, max_q_len, max_k_len, scale)


@_shared_op.register_fake
def _(q, k, v, q_segments, k_segments, max_q_len, max_k_len, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("rlhf_fast::shared_prefix_attention_backward", mutates_args=())
def _shared_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_segments: Tensor,
                        k_segments: Tensor, max_q_len: int, max_k_len: int, scale: float,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return SHARED_OP.impl(backend).backward(dout, q, k, v, out, lse, q_segments, k_segments, max_q_len, max_k_len,
                                            scale)


@_shared_backward_op.register_fake
def _(dout, q, k, v, out, lse, q_segments, k_segments, max_q_len, max_k_len, scale, backend):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _shared_setup(ctx, inputs, output):
    q, k, v, q_seg, k_seg, max_q, max_k, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_seg, k_seg)
    ctx.args = (max_q, max_k, scale, backend)


def _shared_bwd(ctx, dout, _dlse):
    q, k, v, out, lse, q_seg, k_seg = ctx.saved_tensors
    max_q, max_k, scale, backend = ctx.args
    dq, dk, dv = _shared_backward_op(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, scale, backend)
    return dq, dk, dv, None, None, None, None, None, None


_shared_op.register_autograd(_shared_bwd, setup_context=_shared_setup)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_qkv(q, k, v, dims: int, layout: str):
    for name, x in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, x)
        if x.dtype not in QKV_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, bfloat16 or float16 (float64 on the torch backend), "
                             f"got {x.dtype}")
        if x.dim() != dims:
            raise ValueError(f"{name}: expected a {dims}-D tensor {layout}, got shape {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} like q, got {x.dtype}")
        V.check_same_device(name, x, "q", q)
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim D in [1, {MAX_HEAD_DIM}], got {d}")
    if k.shape[-1] != d:
        raise ValueError(f"k: expected head dim {d} like q, got {k.shape[-1]}")
    hq, hkv = q.shape[1], k.shape[1]  # (B, H, T, D) and (total, H, D) alike
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"k: expected a number of key/value heads that divides the {hq} query heads (GQA/MQA), "
                         f"got {hkv}")


def _check_scale(scale, head_dim: int) -> float:
    return head_dim ** -0.5 if scale is None else V.check_positive_float("scale", scale)


def _check_cu_seqlens(name: str, cu: Tensor, total: int, ref: Tensor, n: int | None) -> int:
    """Shape/dtype always; values (0 first, `total` last, non-decreasing) with one small host copy,
    skipped while torch.compile traces. Returns the number of sequences."""
    V.check_tensor(name, cu, (torch.int32, torch.int64))
    V.check_same_device(name, cu, "q", ref)
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D tensor (num_seqs + 1,), got shape {tuple(cu.shape)}")
    if n is not None and cu.shape[0] != n + 1:
        raise ValueError(f"{name}: expected {n + 1} entries like cu_seqlens_q, got {cu.shape[0]}")
    return cu.shape[0] - 1


def _check_cu_values(name: str, cu: Tensor, total: int, max_len: int, max_name: str) -> None:
    if torch.compiler.is_compiling():
        return
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != total:
        raise ValueError(f"{name}: expected cumulative lengths from 0 to {total} (the packed tokens), "
                         f"got {vals[0]} ... {vals[-1]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:], strict=True)]
    if lens and min(lens) < 0:
        raise ValueError(f"{name}: expected non-decreasing values, got a negative length at sequence "
                         f"{lens.index(min(lens))}")
    if lens and max(lens) > max_len:
        raise ValueError(f"{max_name}: expected >= the longest sequence ({max(lens)}), got {max_len}")


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, attention_mask: Tensor | None = None,
              scale: float | None = None, backend: str | None = None) -> Tensor:
    """Fused scaled dot-product attention ``softmax(q k^T * scale + mask) v`` (flash-attention-2 on GPU).

    Args:
        q: ``(B, Hq, T, D)`` float32, bfloat16 or float16 (float64 on the torch backend), any strides.
        k, v: ``(B, Hkv, S, D)``, same dtype and device; ``Hq % Hkv == 0``: query head ``h`` reads key/value
            head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention, no copy of K/V per head).
            ``1 <= D <= 256``.
        causal: query ``i`` sees key ``j`` iff ``j <= i + (S - T)``. With ``T != S`` the query block is
            aligned to the END of the keys (bottom-right, as flash-attn and KV-cache decoding: the last
            query sees every key; with ``T > S`` the first ``T - S`` queries see none).
        attention_mask: optional ``(B, S)`` bool or 0/1 key-padding mask (nonzero = the key exists), left or
            right padding or any pattern. Leading/trailing padding blocks are skipped by the kernels.
        scale: multiplies ``q . k``; default ``D ** -0.5``.
        backend: ``"triton"``, ``"cpu"`` or ``"torch"``; default ``RLHF_FAST_BACKEND`` or the best available.

    Returns:
        ``(B, Hq, T, D)`` in q's dtype (stored as ``(B, T, Hq, D)``, so ``out.transpose(1, 2)`` is
        contiguous), differentiable w.r.t. q, k, v. Softmax and accumulation in fp32. A query row that sees
        no key (fully masked) gives 0 and zero gradients, never NaN.
    """
    _check_qkv(q, k, v, 4, "(B, H, T, D)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} like q, got {k.shape[0]}")
    key_mask = None
    if attention_mask is not None:
        V.check_tensor("attention_mask", attention_mask)
        V.check_same_device("attention_mask", attention_mask, "q", q)
        V.check_shape("attention_mask", attention_mask, (k.shape[0], k.shape[2]), "(B, S)")
        key_mask = (attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0).contiguous()
    scale = _check_scale(scale, q.shape[-1])
    # one query row aligned to the end of the keys sees all of them: a decoding step needs no causal mask
    causal = bool(causal) and q.shape[2] > 1
    name = OP.select([q, k, v], backend)
    out, _ = _attention_op(q, k, v, key_mask, causal, scale, name)
    return out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = True, scale: float | None = None,
                     backend: str | None = None) -> Tensor:
    """Attention over packed variable-length sequences (no padding), as flash-attn's varlen interface.

    Args:
        q: ``(total_q, Hq, D)``; k, v: ``(total_k, Hkv, D)`` (dtypes, heads and D as in :func:`attention`).
        cu_seqlens_q, cu_seqlens_k: ``(N + 1,)`` int32/int64 cumulative lengths, from 0 to total: sequence
            ``i`` is rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q and ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of
            k/v. Sequences may be empty. Checked on the host (one small copy) unless torch.compile traces.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (sizes the GPU launch grid).
        causal: as in :func:`attention`, per sequence (bottom-right when its query and key lengths differ).

    Returns ``(total_q, Hq, D)`` in q's dtype, contiguous; differentiable w.r.t. q, k, v.
    """
    _check_qkv(q, k, v, 3, "(total, H, D)")
    n = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q, None)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q, n)
    max_seqlen_q = V.check_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = V.check_int("max_seqlen_k", max_seqlen_k)
    _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    scale = _check_scale(scale, q.shape[-1])
    name = VARLEN_OP.select([q, k, v], backend)
    out, _ = _varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale, name)
    return out


def shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: SharedPrefixLayout, *,
                            scale: float | None = None, backend: str | None = None) -> Tensor:
    """Attention of one prompt followed by K answers, packed as ``[prompt, answer_1, ..., answer_K]``, for
    several such groups at once: the prompt's keys/values are computed and stored once, not K times.

    Inside each group, a prompt token attends causally to the prompt; a token of answer ``j`` attends to the
    whole prompt and causally to answer ``j`` up to itself, never to another answer. Every answer therefore
    gets exactly the attention it would get as the sequence ``[prompt, answer_j]`` on its own, provided the
    model is given ``layout.position_ids`` (answers restart at the prompt length).

    Args:
        q: ``(total, Hq, D)``; k, v: ``(total, Hkv, D)`` (dtypes, heads and D as in :func:`attention`), packed
            group after group.
        layout: from :func:`shared_prefix_layout` (prompt and answer lengths of every group).
        scale: default ``D ** -0.5``.

    Worked example: ``layout = shared_prefix_layout([3], [[2, 1]])`` packs ``p0 p1 p2 a0 a1 b0`` with
    ``layout.position_ids = [0, 1, 2, 3, 4, 3]``; the allowed (query row, key column) pairs are::

            p0 p1 p2 a0 a1 b0
        p0   1  .  .  .  .  .
        p1   1  1  .  .  .  .
        p2   1  1  1  .  .  .
        a0   1  1  1  1  .  .
        a1   1  1  1  1  1  .
        b0   1  1  1  .  .  1

    Returns ``(total, Hq, D)`` in q's dtype, contiguous; differentiable w.r.t. q, k, v.
    """
    _check_qkv(q, k, v, 3, "(total, H, D)")
    if not isinstance(layout, SharedPrefixLayout):
        raise ValueError(f"layout: expected a SharedPrefixLayout (rlhf_fast.shared_prefix_layout), "
                         f"got {type(layout).__name__}")
    if q.shape[0] != layout.total or k.shape[0] != layout.total:
        raise ValueError(f"q: expected {layout.total} packed tokens (the layout's total) in q and k, got "
                         f"{q.shape[0]} and {k.shape[0]}")
    V.check_same_device("layout", layout.q_segments, "q", q)
    scale = _check_scale(scale, q.shape[-1])
    name = SHARED_OP.select([q, k, v], backend)
    out, _ = _shared_op(q, k, v, layout.q_segments, layout.k_segments, layout.max_q_len, layout.max_k_len, scale,
                        name)
    return out
