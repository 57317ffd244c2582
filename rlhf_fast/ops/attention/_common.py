"""What the three attention ops share: limits, output layouts, validation, torch's fused CPU kernel and the
launchers of the Triton kernels over packed (total, H, D) tensors (see the package docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.reference import causal_mask_ref

MAX_HEAD_DIM = 256
QKV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_INF = float("inf")


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
# torch backend helper: the explicit (T, S) mask of a dense problem
# ---------------------------------------------------------------------------------------------

def _dense_allowed(t, s, key_mask, causal, device):
    allowed = causal_mask_ref(t, s, device) if causal else torch.ones(t, s, dtype=torch.bool, device=device)
    return allowed if key_mask is None else allowed & key_mask[:, None, None, :]


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


def _seq_view(x: Tensor, lo: int, hi: int) -> Tensor:
    """Rows [lo, hi) of a packed (total, H, D) tensor as a (1, H, L, D) view."""
    return x[lo:hi].transpose(0, 1).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# triton backend (rlhf_fast/kernels/attention.py) on packed sequences: varlen and shared-prefix
# ---------------------------------------------------------------------------------------------

def _packed4(x: Tensor) -> Tensor:
    """(total, H, D) -> the (1, H, total, D) view the kernels take."""
    return x.permute(1, 0, 2).unsqueeze(0)


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


def _triton_limits(q, *_):
    if q.shape[-1] > MAX_HEAD_DIM:
        return [f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"]
    return []


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
