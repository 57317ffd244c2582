"""gather_logprobs: per-token log-probs (and entropy) of labels under softmax(logits / T).

Flow: public function (validates, flattens to rows) -> custom op ``rlhf_fast::gather_logprobs``
(fake impl + registered autograd, so it traces under torch.compile and passes opcheck) -> the
backend chosen by rlhf_fast.backends: torch (reference.py), cpu (csrc/cpu/gather_logprobs.cpp),
triton (rlhf_fast/kernels/gather_logprobs.py).

Cost model, logits (N, V) in dtype of b bytes: the eager ``log_softmax(...).gather(...)`` reads the
logits and writes an (N, V) fp32 log-softmax in the forward, then in the backward writes a zero
(N, V) scatter, reads it with the saved log-softmax and writes the gradient: about (b + 4) + (4 + 8 + b)
bytes per element. The fused kernels read the logits once in the forward (online logsumexp, plus the
entropy sum in the same pass) and save only three fp32 numbers per row; the backward reads the logits
once more and writes the gradient once: b forward, 2b backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.reference import gather_logprobs_backward_ref, gather_logprobs_ref

OP = op_registry("gather_logprobs")


# ---------------------------------------------------------------------------------------------
# Backends. forward(logits (N, V) with unit stride along V, labels (N,) int64, temperature,
# ignore_index, return_entropy) -> (logprobs (N,), entropy (N,) or None, lse (N,)), all fp32.
# backward(grad_logprobs (N,), grad_entropy (N,) or None, logits, labels, lse, entropy,
# temperature, ignore_index) -> grad_logits (N, V) contiguous, in the dtype of logits.
# ---------------------------------------------------------------------------------------------

def _torch_forward(logits, labels, temperature, ignore_index, return_entropy):
    V.check_label_range(labels, logits.shape[-1], ignore_index)
    with torch.no_grad():
        return gather_logprobs_ref(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                   return_entropy=return_entropy)


def _torch_backward(grad_lp, grad_ent, logits, labels, lse, entropy, temperature, ignore_index):
    return gather_logprobs_backward_ref(grad_lp, grad_ent, logits, labels, lse, entropy,
                                        temperature=temperature, ignore_index=ignore_index)


def _native_forward(logits, labels, temperature, ignore_index, return_entropy):
    if logits.device.type != "cpu":  # the CPU kernel checks label range inside its single pass
        V.check_label_range(labels, logits.shape[-1], ignore_index)
    lp, ent, lse = torch.ops.rlhf_fast_C.gather_logprobs_fwd(logits, labels, temperature, ignore_index,
                                                            return_entropy)
    return lp, (ent if return_entropy else None), lse


def _native_backward(grad_lp, grad_ent, logits, labels, lse, entropy, temperature, ignore_index):
    return torch.ops.rlhf_fast_C.gather_logprobs_bwd(grad_lp, grad_ent, logits, labels, lse, entropy,
                                                     temperature, ignore_index)


def _triton_forward(logits, labels, temperature, ignore_index, return_entropy):
    from rlhf_fast.kernels import gather_logprobs as K

    V.check_label_range(labels, logits.shape[-1], ignore_index)
    return K.gather_logprobs_fwd(logits, labels, temperature, ignore_index, return_entropy)


def _triton_backward(grad_lp, grad_ent, logits, labels, lse, entropy, temperature, ignore_index):
    from rlhf_fast.kernels import gather_logprobs as K

    return K.gather_logprobs_bwd(grad_lp, grad_ent, logits, labels, lse, entropy, temperature, ignore_index)


OP.register("torch", _torch_forward, _torch_backward)
OP.register("cpu", _native_forward, _native_backward)
OP.register("triton", _triton_forward, _triton_backward)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::gather_logprobs", mutates_args=())
def _gather_logprobs_op(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
                        return_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    lp, ent, lse = OP.impl(backend).forward(logits, labels, temperature, ignore_index, return_entropy)
    if ent is None:  # custom ops return tensors only: no entropy is an empty tensor
        ent = logits.new_empty((0,), dtype=torch.float32)
    return lp, ent, lse


@_gather_logprobs_op.register_fake
def _(logits, labels, temperature, ignore_index, return_entropy, backend):
    n = logits.shape[0]
    new = lambda size: logits.new_empty((size,), dtype=torch.float32)
    return new(n), new(n if return_entropy else 0), new(n)


@torch.library.custom_op("rlhf_fast::gather_logprobs_backward", mutates_args=())
def _gather_logprobs_backward_op(grad_logprobs: Tensor, grad_entropy: Tensor | None, logits: Tensor,
                                 labels: Tensor, lse: Tensor, entropy: Tensor, temperature: float,
                                 ignore_index: int, backend: str) -> Tensor:
    return OP.impl(backend).backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                                     temperature, ignore_index)


@_gather_logprobs_backward_op.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, _return_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.args = (temperature, ignore_index, backend)


def _backward(ctx, grad_lp, grad_ent, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, backend = ctx.args
    if grad_lp is None:
        grad_lp = lse.new_zeros(lse.shape)
    if grad_ent is not None and entropy.numel() == 0:
        grad_ent = None
    grad = _gather_logprobs_backward_op(grad_lp.float().contiguous(),
                                        None if grad_ent is None else grad_ent.float().contiguous(),
                                        logits, labels, lse, entropy, temperature, ignore_index, backend)
    return grad, None, None, None, None, None


_gather_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def gather_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                    return_entropy: bool = False, backend: str | None = None):
    """Log-probability of each label under ``softmax(logits / temperature)``, and optionally the entropy.

    Args:
        logits: ``(..., V)`` float32, bfloat16 or float16 (float64 on the torch backend), any strides.
        labels: ``(...)`` int32 or int64, matching ``logits.shape[:-1]``; each value in ``[0, V)`` or
            equal to ``ignore_index``.
        temperature: divides the logits before the softmax (finite, > 0).
        ignore_index: label value marking positions to skip: their log-prob and entropy are 0 and they
            receive no gradient.
        return_entropy: also return ``H = -sum_j p_j log p_j`` of ``p = softmax(logits / temperature)``.
        backend: ``"torch"``, ``"cpu"`` or ``"triton"``; default ``RLHF_FAST_BACKEND`` or
            the best available for the device (see :mod:`rlhf_fast.backends`).

    Returns:
        ``logprobs`` float32 ``(...)``: ``log_softmax(logits / T)[label]``, or ``(logprobs, entropy)``
        when ``return_entropy``. Both are differentiable w.r.t. ``logits``; the backward recomputes the
        softmax from the logits and three saved fp32 numbers per row (no ``(N, V)`` tensor is saved).
        A row whose logits are all ``-inf`` gives log-prob ``-inf`` (0 if ignored), entropy 0 and no
        gradient. The caller's tensors are never written to.
    """
    V.check_tensor("logits", logits)
    if not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating-point tensor (float32, bfloat16 or float16), "
                         f"got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    V.check_tensor("labels", labels, (torch.int32, torch.int64))
    V.check_same_device("labels", labels, "logits", logits)
    V.check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    temperature = V.check_positive_float("temperature", temperature)
    ignore_index = V.check_int("ignore_index", ignore_index)

    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)  # (N, V): a view whenever the strides allow it
    if rows.stride(-1) != 1:
        rows = rows.contiguous()  # kernels read each row with unit stride; any row stride is fine
    flat_labels = labels.reshape(-1).to(torch.int64)
    name = OP.select([rows], backend)
    lp, ent, _ = _gather_logprobs_op(rows, flat_labels, temperature, ignore_index, bool(return_entropy), name)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp
