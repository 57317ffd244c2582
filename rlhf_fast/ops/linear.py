"""linear: ``y = x @ weight.T + bias``, the projections of a transformer's layers (q, k, v, o, gate, up,
down), as an op whose CPU backend picks the faster GEMM engine.

Flow: public function (validates, views the input as rows) -> custom op ``rlhf_fast::linear`` (fake
impl, autograd through the custom op ``rlhf_fast::linear_backward``, so it traces under
torch.compile and passes opcheck) -> the backend chosen by rlhf_fast.backends: torch
(reference.linear_ref, ATen's GEMM), cpu (csrc/cpu/linear.cpp).

Why an op for a plain GEMM: on AMD Zen 4/5 CPUs ATen's fp32 GEMM is MKL's sgemm, which does not take
its AVX-512 path there; oneDNN's matmul (in every x86 torch wheel) does, and runs the fp32 GEMMs of a
small Llama's layers ~2x faster (measured on Zen 5, (2560, 256) @ (256, 768): 2.5 ms vs 5.0 ms; the
backward's two GEMMs alike). The cpu backend sends fp32 products of at least 8 rows and ~1 MFLOP to
oneDNN and the rest (decoding's one-token steps) to ATen's BLAS, whose per-call cost is lower;
bfloat16 and float16 go to ATen, whose CPU path for them is oneDNN already. Outputs of >= 2 MB come
from the huge-page buffer cache. On GPUs the op runs the torch backend (cuBLAS): another GEMM has
nothing to win there, and no cuda or triton backend is registered.

:func:`rlhf_fast.integrations.transformers.use_rlhf_fast_linear` routes a model's ``nn.Linear``
layers through this op; the pipeline does so for every model it loads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.reference import linear_backward_ref, linear_ref

OP = op_registry("linear")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Backends. forward(x (M, K), weight (N, K), bias (N,) or None; one float dtype) -> (M, N).
# backward(grad (M, N), x, weight, need_input, need_weight, need_bias) -> (grad_x (M, K),
# grad_weight (N, K), grad_bias (N,)), each an empty (0,) tensor where not asked for.
# ---------------------------------------------------------------------------------------------

def _torch_forward(x, weight, bias):
    with torch.no_grad():
        return linear_ref(x, weight, bias)


def _torch_backward(grad, x, weight, need_input, need_weight, need_bias):
    # (the public function runs ATen's own linear on this backend; this path serves direct op calls)
    with torch.no_grad():
        grads = linear_backward_ref(grad, x, weight)
        return tuple(g if need else x.new_empty((0,))
                     for g, need in zip(grads, (need_input, need_weight, need_bias), strict=True))


def _native_forward(x, weight, bias):
    return torch.ops.rlhf_fast_C.linear_fwd(x, weight, bias)


def _native_backward(grad, x, weight, need_input, need_weight, need_bias):
    return torch.ops.rlhf_fast_C.linear_bwd(grad, x, weight, need_input, need_weight, need_bias)


OP.register("torch", _torch_forward, _torch_backward)
OP.register("cpu", _native_forward, _native_backward)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    return OP.impl(backend).forward(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("rlhf_fast::linear_backward", mutates_args=())
def _linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_weight: bool,
                        need_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return OP.impl(backend).backward(grad, x, weight, need_input, need_weight, need_bias)


@_linear_backward_op.register_fake
def _(grad, x, weight, need_input, need_weight, need_bias, backend):
    none = lambda: x.new_empty((0,))  # noqa: E731
    return (x.new_empty(x.shape) if need_input else none(), weight.new_empty(weight.shape) if need_weight else none(),
            x.new_empty((weight.shape[0],)) if need_bias else none())


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.backend = backend


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    gx, gw, gb = _linear_backward_op(grad.contiguous(), x, weight, need_input, need_weight, need_bias, ctx.backend)
    return (gx if need_input else None, gw if need_weight else None, gb if need_bias else None, None)


_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """``input @ weight.T + bias``, as ``torch.nn.functional.linear``, with gradients for all three.

    Args:
        input: ``(..., K)`` float32, bfloat16 or float16 (float64 on the torch backend).
        weight: ``(N, K)``, the dtype and device of ``input``.
        bias: ``None`` or ``(N,)``, the same dtype and device.
        backend: ``"torch"`` or ``"cpu"``; default ``RLHF_FAST_BACKEND`` or the best available for
            the device (see :mod:`rlhf_fast.backends`). CUDA tensors run on ``"torch"`` (cuBLAS).

    Returns:
        ``(..., N)`` in the input's dtype. fp32 results differ from ATen's in the last bits where the
        engines sum in another order (both accumulate in fp32). First-order gradients only.
    """
    V.check_tensor("input", input, _FLOAT_DTYPES)
    V.check_tensor("weight", weight)
    if weight.dtype != input.dtype:
        raise ValueError(f"weight: expected dtype {input.dtype} (the input's), got {weight.dtype}")
    V.check_same_device("weight", weight, "input", input)
    if input.dim() < 1:
        raise ValueError("input: expected a tensor of shape (..., K), got a 0-dim tensor")
    k = input.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight: expected shape (N, {k}) (K = input.shape[-1]), got {tuple(weight.shape)}")
    if bias is not None:
        V.check_tensor("bias", bias)
        if bias.dtype != input.dtype:
            raise ValueError(f"bias: expected dtype {input.dtype} (the input's), got {bias.dtype}")
        V.check_same_device("bias", bias, "input", input)
        V.check_shape("bias", bias, (weight.shape[0],), "(weight.shape[0],)")
    x = input.reshape(-1, k)
    name = OP.select([x, weight], backend)
    if name == "torch" or input.dtype != torch.float32:
        # the reference, and what the cpu backend runs for 16-bit inputs, is ATen's own linear: called
        # directly, with ATen's autograd, it costs what nn.Linear costs (the custom op's wrapper would
        # add ~20-60 us a call and change nothing)
        return torch.nn.functional.linear(input, weight, bias)
    return _linear_op(x, weight, bias, name).view(*input.shape[:-1], weight.shape[0])
