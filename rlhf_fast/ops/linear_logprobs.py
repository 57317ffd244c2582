"""linear_logprobs: per-token log-probs (and entropy) straight from the lm_head, never
materializing the (N, V) logits.

Flow as for gather_logprobs: public function (validates, flattens) -> custom op
``rlhf_fast::linear_logprobs`` (fake impl + autograd) -> backend: torch (reference.py, materializes
the logits: the eager baseline), cpu (csrc/cpu/linear_logprobs.cpp), triton
(rlhf_fast/kernels/linear_logprobs.py).

Cost model, N tokens, hidden H, vocabulary V (fp32): eager ``hidden @ weight.T -> log_softmax ->
gather`` holds the (N, V) logits, their log-softmax and, in the backward, two more (N, V) buffers:
4 * N * V * 4 bytes (2 GB at N=4096, V=32k) on top of 3 GEMMs of 2*N*V*H flops. The tiled kernels
hold one (rows x chunk) fp32 tile at a time (16 MB by default): the forward is one GEMM per tile
plus a fused fold (online logsumexp, entropy, label logit); the backward recomputes each tile's
logits, turns them into dL/dlogits in place and accumulates grad_hidden and grad_weight with two
GEMMs: 4 GEMMs instead of 3, no (N, V) memory. Rows whose label is ignore_index (prompt tokens)
are skipped by both passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.reference import linear_logprobs_backward_ref, linear_logprobs_ref

OP = op_registry("linear_logprobs")

# Tile rule for chunk_size=None: at most TILE_ELEMS fp32 logits (16 MB) per tile, rows in blocks of
# at most MAX_TILE_ROWS, vocabulary chunk = TILE_ELEMS / rows rounded down to a multiple of 256,
# within [256, 16384].
TILE_ELEMS = 1 << 22
MAX_TILE_ROWS = 4096


def tile_shape(n_rows: int, vocab: int, chunk_size: int | None) -> tuple[int, int]:
    """(rows per tile, vocabulary columns per tile) for the tiled backends."""
    rows = max(1, min(n_rows, MAX_TILE_ROWS))
    if chunk_size is None:
        chunk = max(256, min(16384, (TILE_ELEMS // rows) // 256 * 256))
    else:
        chunk = chunk_size
    return rows, max(1, min(chunk, vocab))


# ---------------------------------------------------------------------------------------------
# Backends. forward(hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64,
# temperature, softcap (0.0 = none), ignore_index, return_entropy, tile_rows, tile_cols)
#   -> (logprobs (N,), entropy (N,) or None, lse (N,)) fp32
# backward(grad_logprobs, grad_entropy or None, hidden, weight, bias, labels, lse, entropy,
#          temperature, softcap, ignore_index, tile_rows, tile_cols)
#   -> (grad_hidden, grad_weight, grad_bias or None) in the inputs' dtypes
# ---------------------------------------------------------------------------------------------

def _cap(softcap: float) -> float | None:
    return softcap if softcap > 0 else None


def _torch_forward(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, rows, cols):
    V.check_label_range(labels, weight.shape[0], ignore_index)
    with torch.no_grad():
        return linear_logprobs_ref(hidden, weight, labels, bias=bias, temperature=temperature,
                                   logit_softcap=_cap(softcap), ignore_index=ignore_index,
                                   return_entropy=return_entropy)


def _torch_backward(grad_lp, grad_ent, hidden, weight, bias, labels, lse, entropy, temperature, softcap,
                    ignore_index, rows, cols):
    return linear_logprobs_backward_ref(grad_lp, grad_ent, hidden, weight, bias, labels, lse, entropy,
                                        temperature=temperature, logit_softcap=_cap(softcap),
                                        ignore_index=ignore_index)


def _native_forward(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, rows, cols):
    if hidden.device.type != "cpu":
        V.check_label_range(labels, weight.shape[0], ignore_index)
    lp, ent, lse = torch.ops.rlhf_fast_C.linear_logprobs_fwd(hidden, weight, bias, labels, temperature, softcap,
                                                            ignore_index, return_entropy, rows, cols)
    return lp, (ent if return_entropy else None), lse


def _native_backward(grad_lp, grad_ent, hidden, weight, bias, labels, lse, entropy, temperature, softcap,
                     ignore_index, rows, cols):
    gh, gw, gb = torch.ops.rlhf_fast_C.linear_logprobs_bwd(grad_lp, grad_ent, hidden, weight, bias, labels, lse,
                                                          entropy, temperature, softcap, ignore_index, rows, cols)
    return gh, gw, (gb if bias is not None else None)


def _triton_forward(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, rows, cols):
    from rlhf_fast.kernels import linear_logprobs as K

    V.check_label_range(labels, weight.shape[0], ignore_index)
    return K.linear_logprobs_fwd(hidden, weight, bias, labels, temperature, _cap(softcap), ignore_index,
                                 return_entropy)


def _triton_backward(grad_lp, grad_ent, hidden, weight, bias, labels, lse, entropy, temperature, softcap,
                     ignore_index, rows, cols):
    from rlhf_fast.kernels import linear_logprobs as K

    return K.linear_logprobs_bwd(grad_lp, grad_ent, hidden, weight, bias, labels, lse, entropy, temperature,
                                 _cap(softcap), ignore_index)


def _triton_limits(hidden, weight, *rest) -> list[str]:
    import importlib.util

    if importlib.util.find_spec("rlhf_fast.kernels.linear_logprobs") is None:
        return ["the Triton kernel of linear_logprobs is not available in this build"]
    return []


OP.register("torch", _torch_forward, _torch_backward)
OP.register("cpu", _native_forward, _native_backward)
OP.register("triton", _triton_forward, _triton_backward, limits=_triton_limits)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::linear_logprobs", mutates_args=())
def _linear_logprobs_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                        softcap: float, ignore_index: int, return_entropy: bool, tile_rows: int, tile_cols: int,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    lp, ent, lse = OP.impl(backend).forward(hidden, weight, bias, labels, temperature, softcap, ignore_index,
                                            return_entropy, tile_rows, tile_cols)
    if ent is None:
        ent = hidden.new_empty((0,), dtype=torch.float32)
    return lp, ent, lse


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, tile_rows, tile_cols,
      backend):
    n = hidden.shape[0]
    new = lambda size: hidden.new_empty((size,), dtype=torch.float32)
    return new(n), new(n if return_entropy else 0), new(n)


@torch.library.custom_op("rlhf_fast::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(grad_logprobs: Tensor, grad_entropy: Tensor | None, hidden: Tensor, weight: Tensor,
                                 bias: Tensor | None, labels: Tensor, lse: Tensor, entropy: Tensor,
                                 temperature: float, softcap: float, ignore_index: int, tile_rows: int,
                                 tile_cols: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    gh, gw, gb = OP.impl(backend).backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                           temperature, softcap, ignore_index, tile_rows, tile_cols)
    if gb is None:
        gb = hidden.new_empty((0,))
    return gh, gw, gb


@_linear_logprobs_backward_op.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature, softcap, ignore_index,
      tile_rows, tile_cols, backend):
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, softcap, ignore_index, _ret, rows, cols, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (temperature, softcap, ignore_index, rows, cols, backend)


def _backward(ctx, grad_lp, grad_ent, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    temperature, softcap, ignore_index, rows, cols, backend = ctx.args
    if grad_lp is None:
        grad_lp = lse.new_zeros(lse.shape)
    if grad_ent is not None and entropy.numel() == 0:
        grad_ent = None
    gh, gw, gb = _linear_logprobs_backward_op(
        grad_lp.float().contiguous(), None if grad_ent is None else grad_ent.float().contiguous(), hidden, weight,
        bias, labels, lse, entropy, temperature, softcap, ignore_index, rows, cols, backend)
    return gh, gw, (gb if bias is not None else None), None, None, None, None, None, None, None, None


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    temperature: float = 1.0, logit_softcap: float | None = None, ignore_index: int = -100,
                    return_entropy: bool = False, chunk_size: int | None = None, backend: str | None = None):
    """Per-token log-probs ``log softmax(z)[label]`` (and optionally the entropy of ``softmax(z)``) of
    the lm_head's logits, ``z = softcap(hidden @ weight.T + bias) / temperature``, without ever holding
    the ``(N, V)`` logits.

    Args:
        hidden: ``(..., H)`` float32, bfloat16 or float16 (the last hidden states).
        weight: ``(V, H)`` the lm_head (may be shared with the input embedding: gradients from both
            uses accumulate), same dtype and device as ``hidden``.
        labels: ``(...)`` int32/int64 matching ``hidden.shape[:-1]``; values in ``[0, V)`` or
            ``ignore_index``.
        bias: optional ``(V,)``.
        temperature: divides the (capped) logits, finite and > 0.
        logit_softcap: Gemma-style cap ``c``: logits become ``c * tanh(logits / c)`` before the
            temperature. ``None`` (default) for no cap.
        ignore_index: positions with this label get log-prob 0 and entropy 0, receive no gradient,
            and are skipped by the kernels entirely.
        return_entropy: also return the entropy (no cost when False).
        chunk_size: vocabulary columns per tile of the tiled backends (cpu, cuda). ``None`` picks the
            tile from the shape: at most 4M fp32 logits (16 MB) per tile, rows in blocks of at most
            4096, columns = 4M / rows rounded down to a multiple of 256 within [256, 16384]. The result
            does not depend on it beyond fp32 rounding.
        backend: as for :func:`rlhf_fast.gather_logprobs`.

    Returns:
        fp32 ``logprobs`` of shape ``(...)``, or ``(logprobs, entropy)``; differentiable w.r.t.
        hidden, weight and bias. Accumulation is fp32 throughout (bf16/fp16 inputs are widened per
        tile). Equal to ``gather_logprobs(hidden @ weight.T + bias, labels)`` up to fp32 rounding.
    """
    V.check_tensor("hidden", hidden, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    V.check_tensor("weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"hidden: expected shape (..., H), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[-1]}) with V >= 1 (H from hidden), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} like hidden, got {weight.dtype}")
    V.check_same_device("weight", weight, "hidden", hidden)
    V.check_tensor("labels", labels, (torch.int32, torch.int64))
    V.check_same_device("labels", labels, "hidden", hidden)
    V.check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    vocab = weight.shape[0]
    if bias is not None:
        V.check_tensor("bias", bias, (hidden.dtype,))
        V.check_same_device("bias", bias, "hidden", hidden)
        V.check_shape("bias", bias, (vocab,), "(V,) from weight")
    temperature = V.check_positive_float("temperature", temperature)
    softcap = 0.0 if logit_softcap is None else V.check_positive_float("logit_softcap", logit_softcap)
    ignore_index = V.check_int("ignore_index", ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")

    rows = hidden.reshape(-1, hidden.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64)
    tile_rows, tile_cols = tile_shape(rows.shape[0], vocab, chunk_size)
    name = OP.select([rows, w], backend)
    lp, ent, _ = _linear_logprobs_op(rows, w, bias, flat_labels, temperature, softcap, ignore_index,
                                     bool(return_entropy), tile_rows, tile_cols, name)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp
