"""varlen_attention: attention over packed variable-length sequences (no padding), as flash-attn's varlen
interface (custom op ``rlhf_fast::varlen_attention``; see the package docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.ops.attention._common import (
    _INF,
    _check_qkv,
    _check_scale,
    _dense_allowed,
    _seq_view,
    _triton_limits,
    _triton_packed_backward,
    _triton_packed_forward,
)
from rlhf_fast.ops.attention.dense import _cpu_dense_backward, _cpu_dense_forward
from rlhf_fast.reference import masked_attention_backward_ref, varlen_attention_ref

VARLEN_OP = op_registry("varlen_attention")


# Segment table of packed sequences (see dense.dense_segments for the format).

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
# torch backend (reference.py)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# cpu backend: each sequence as a dense problem of the cpu backend of attention
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# triton backend (rlhf_fast/kernels/attention.py)
# ---------------------------------------------------------------------------------------------

def _triton_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    q_seg, _ = varlen_segments(cu_q, cu_k)
    return _triton_packed_forward(q, k, v, q_seg, max_q, causal, scale, False)


def _triton_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    q_seg, k_seg = varlen_segments(cu_q, cu_k)
    return _triton_packed_backward(dout, q, k, v, out, lse, q_seg, k_seg, max_q, max_k, causal, scale, False)


VARLEN_OP.register("torch", _torch_varlen_forward, _torch_varlen_backward)
VARLEN_OP.register("cpu", _cpu_varlen_forward, _cpu_varlen_backward, native=False)
VARLEN_OP.register("triton", _triton_varlen_forward, _triton_varlen_backward, limits=_triton_limits)


# ---------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Validation of the offsets
# ---------------------------------------------------------------------------------------------

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
# Public function
# ---------------------------------------------------------------------------------------------

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
