"""attention: fused softmax(q k^T * scale + mask) v on (B, H, T, D) tensors, bottom-right causal, key
padding, grouped-query heads (custom op ``rlhf_fast::attention``; see the package docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.ops.attention._common import (
    _INF,
    _as_bthd,
    _check_qkv,
    _check_scale,
    _dense_allowed,
    _empty_bthd,
    _flash_cpu,
    _flash_cpu_bwd,
    _triton_limits,
    _unit_last,
)
from rlhf_fast.reference import attention_ref, masked_attention_backward_ref

OP = op_registry("attention")


# ---------------------------------------------------------------------------------------------
# Segment tables (the Triton kernels' description of who attends to whom; see rlhf_fast/kernels/attention.py).
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


# ---------------------------------------------------------------------------------------------
# torch backend (reference.py): forward and backward in plain math on the explicit (T, S) mask
# ---------------------------------------------------------------------------------------------

def _torch_forward(q, k, v, key_mask, causal, scale):
    out, lse = attention_ref(q, k, v, causal=causal, attention_mask=key_mask, scale=scale, return_lse=True)
    return _as_bthd(out), torch.where(lse == -_INF, _INF, lse).float()


def _torch_backward(dout, q, k, v, out, lse, key_mask, causal, scale):
    allowed = _dense_allowed(q.shape[2], k.shape[2], key_mask, causal, q.device)
    return tuple(_as_bthd(g) for g in masked_attention_backward_ref(dout, q, k, v, allowed, scale))


# ---------------------------------------------------------------------------------------------
# cpu backend: torch's fused flash-attention CPU kernel (see _common._flash_cpu), bottom-right causal
# alignment by splitting the problem into top-left-causal parts merged by their logsumexps
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# triton backend (rlhf_fast/kernels/attention.py)
# ---------------------------------------------------------------------------------------------

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


OP.register("torch", _torch_forward, _torch_backward)
OP.register("cpu", _cpu_dense_forward, _cpu_dense_backward, native=False)
OP.register("triton", _triton_forward, _triton_backward, limits=_triton_limits)


# ---------------------------------------------------------------------------------------------
# Custom op
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


# ---------------------------------------------------------------------------------------------
# Public function
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
