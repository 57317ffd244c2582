"""shared_prefix_attention: one prompt followed by K answers, packed as [prompt, answer_1, ..., answer_K],
for several groups at once, the prompt's keys/values stored once (custom op
``rlhf_fast::shared_prefix_attention``; see the package docstring), and its layout (shared_prefix_layout)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.ops.attention._common import (
    _check_qkv,
    _check_scale,
    _flash_cpu,
    _flash_cpu_bwd,
    _seq_view,
    _triton_limits,
    _triton_packed_backward,
    _triton_packed_forward,
)
from rlhf_fast.reference import masked_attention_backward_ref, shared_prefix_attention_ref, shared_prefix_mask_ref

SHARED_OP = op_registry("shared_prefix_attention")


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
# torch backend (reference.py)
# ---------------------------------------------------------------------------------------------

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
# cpu backend: torch's fused flash-attention CPU kernel per prompt, per answer and per group's answers
# against the prompt, merged by their logsumexps
# ---------------------------------------------------------------------------------------------

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
# triton backend (rlhf_fast/kernels/attention.py)
# ---------------------------------------------------------------------------------------------

def _triton_shared_forward(q, k, v, q_seg, k_seg, max_q, max_k, scale):
    return _triton_packed_forward(q, k, v, q_seg, max_q, True, scale, True)


def _triton_shared_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, scale):
    return _triton_packed_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, True, scale, True)


SHARED_OP.register("torch", _torch_shared_forward, _torch_shared_backward)
SHARED_OP.register("cpu", _cpu_shared_forward, _cpu_shared_backward, native=False)
SHARED_OP.register("triton", _triton_shared_forward, _triton_shared_backward, limits=_triton_limits)


# ---------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------

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
# Public function
# ---------------------------------------------------------------------------------------------

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
