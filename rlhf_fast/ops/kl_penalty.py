"""kl_penalty: per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

Flow: public function (validates, views the inputs as rows) -> custom op ``rlhf_fast::kl_penalty``
(fake impl + registered autograd, so it traces under torch.compile and passes opcheck) -> the
backend chosen by rlhf_fast.backends: torch (reference.py), cpu (csrc/cpu/ppo_losses.cpp),
triton (rlhf_fast/kernels/ppo_losses.py). The math is in
csrc/include/rlhf_fast/ppo_losses_math.h (the CPU kernels' math).

Cost model, (B, T) inputs of b bytes each: the eager reference reads both inputs, upcasts, subtracts
and applies the estimator in 2-6 ATen kernels (each a full pass writing an fp32 (B, T) temporary),
and its backward as many again. The fused forward reads each input once and writes the fp32 result
and, when logprobs requires grad, the derivative dk/dx in the same pass: 2b + 4 (+ 4) bytes per
token. The backward is then one PyTorch multiply, grad * dk/dx (traceable, and fused by inductor
into what surrounds it under torch.compile): no backward kernel, no recomputation of exp. At RL sizes
the ops are small enough that per-call overhead matters as much as bytes, so the wrapper stays lean:
cheap checks, no host syncs, no data-dependent Python.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.ops import _numerics as N
from rlhf_fast.reference import KL_ESTIMATORS, kl_penalty_backward_ref, kl_penalty_ref

OP = op_registry("kl_penalty")
# Estimator name -> code of the native and Triton kernels (ppo::Estimator).
ESTIMATOR_CODES = {name: code for code, name in enumerate(KL_ESTIMATORS)}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Backends. forward(logprobs (R, C), ref_logprobs (R, C), estimator name, clamp or None, cap or None, need_grad)
# -> (kl (R, C) fp32 contiguous, dkl = dk/dx (R, C) fp32 contiguous, or (0,) without need_grad).
# Inputs may have any strides and each its own float dtype. There is no backward: see _backward.
# ---------------------------------------------------------------------------------------------

def _torch_forward(logprobs, ref_logprobs, estimator, clamp, cap, need_grad):
    with torch.no_grad():
        kl = kl_penalty_ref(logprobs, ref_logprobs, estimator=estimator, clamp=clamp, cap=cap).contiguous()
        lp = logprobs.float()
        dkl = (kl_penalty_backward_ref(torch.ones_like(lp), lp, ref_logprobs, estimator=estimator, clamp=clamp,
                                       cap=cap) if need_grad else kl.new_empty((0,)))
        return kl, dkl.contiguous()


def _cpu_forward(logprobs, ref_logprobs, estimator, clamp, cap, need_grad):
    return torch.ops.rlhf_fast_C.kl_penalty_capped_fwd(logprobs, ref_logprobs, ESTIMATOR_CODES[estimator], clamp, cap,
                                                       need_grad)



def _triton_forward(logprobs, ref_logprobs, estimator, clamp, cap, need_grad):
    from rlhf_fast.kernels import ppo_losses as K

    return K.kl_penalty_fwd(logprobs, ref_logprobs, ESTIMATOR_CODES[estimator], clamp, cap, need_grad)


OP.register("torch", _torch_forward)
OP.register("cpu", _cpu_forward, native_op="kl_penalty_capped_fwd")
OP.register("triton", _triton_forward)


# ---------------------------------------------------------------------------------------------
# Custom op. The scalar arguments travel as one float list (layout PARAMS): the per-call cost of
# torch.library's autograd wrapper grows with the square of the number of arguments (see
# ppo_policy_loss.py).
# ---------------------------------------------------------------------------------------------

# estimator (code of ESTIMATOR_CODES), clamp (0: none), cap (0: none), need_grad (1 or 0: write dk/dx or not).
PARAMS = ("estimator", "clamp", "cap", "need_grad")


@torch.library.custom_op("rlhf_fast::kl_penalty", mutates_args=())
def _kl_penalty_op(logprobs: Tensor, ref_logprobs: Tensor, params: list[float], backend: str
                   ) -> tuple[Tensor, Tensor]:
    estimator, clamp, cap, need_grad = params
    return OP.impl(backend).forward(logprobs, ref_logprobs, KL_ESTIMATORS[int(estimator)],
                                    clamp if clamp > 0 else None, cap if cap > 0 else None, need_grad != 0)


@_kl_penalty_op.register_fake
def _(logprobs, ref_logprobs, params, backend):
    kl = logprobs.new_empty(logprobs.shape, dtype=torch.float32)
    return kl, (kl.new_empty(logprobs.shape) if params[-1] != 0 else kl.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    logprobs = inputs[0]
    _, dkl = output
    ctx.mark_non_differentiable(dkl)
    ctx.save_for_backward(dkl)
    ctx.dtype = logprobs.dtype


def _backward(ctx, grad, _grad_dkl):
    # The derivative was written by the forward; the backward only multiplies (plain PyTorch: one
    # pass in eager mode, fused with its neighbours under torch.compile).
    (dkl,) = ctx.saved_tensors
    if grad is None:
        return None, None, None, None
    if dkl.shape != grad.shape:
        raise RuntimeError("kl_penalty: no derivative was saved (the forward ran with need_grad=False)")
    return (grad * dkl).to(ctx.dtype), None, None, None


_kl_penalty_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _rows(t: Tensor) -> Tensor:
    """(..., C) as (R, C), a view whenever the strides allow it; a 0-dim tensor as (1, 1)."""
    if t.dim() == 0 or t.shape[-1] == 0:
        return t.reshape(-1, 1)
    return t.reshape(-1, t.shape[-1])


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1", clamp: float | None = None,
               cap: float | str | None = "default", backend: str | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens.

    With ``x = logprobs - ref_logprobs`` (clamped to ``[-clamp, clamp]`` first when ``clamp`` is given),
    then the value clamped to ``[-cap, cap]`` (the cap; by default only k3's, at 10):

    =========  ======================  =============  ======================================================
    estimator  value                   default cap    use
    =========  ======================  =============  ======================================================
    ``"k1"``   ``x``                   none           unbiased, high variance (InstructGPT's reward penalty)
    ``"abs"``  ``|x|``                 none
    ``"k2"``   ``x^2 / 2``             none           low variance, biased
    ``"k3"``   ``exp(-x) - 1 + x``     10             unbiased and >= 0 (Schulman's k3; GRPO's KL loss)
    =========  ======================  =============  ======================================================

    k3 grows like ``exp(-x)``: at ``x = -12`` it is 1.6e5 and past ``x = -88`` it is inf, so one token
    whose policy log-prob fell far below the reference's can dominate a batch. The default caps it at
    10 as verl does (``low_var_kl``); k1, abs and k2 grow at most quadratically and are not capped by
    default (verl's choice too). OpenRLHF caps k1, k2 and k3 alike at 10: ``cap=10.0`` does that here.

    Args:
        logprobs: ``(...)`` float32, bfloat16 or float16 (float64 on the torch backend): log-probs
            of the sampled tokens under the policy. Differentiable.
        ref_logprobs: same shape and device, any of those dtypes: log-probs under the reference
            policy. Treated as data (never receives a gradient).
        estimator: ``"k1"``, ``"abs"``, ``"k2"`` or ``"k3"``.
        clamp: ``None`` or a finite number > 0; where ``|x| > clamp`` the value is taken at
            ``x = ±clamp`` and the gradient is 0.
        cap: ``"default"`` (10 for k3, none for the others), ``None`` (no cap) or a finite number
            ``k`` > 0 for every estimator: where ``|value| > k`` the value is ``±k`` and the gradient 0.
        backend: ``"torch"``, ``"cpu"`` or ``"triton"``; default ``RLHF_FAST_BACKEND`` or
            the best available for the device (see :mod:`rlhf_fast.backends`).

    Returns:
        ``kl`` float32 with the shape of ``logprobs``, computed in fp32 (k3 near ``x = 0`` by a series,
        without cancellation). Finite for any finite ``x`` with a cap or a clamp (k3's default cap
        included); without them k3 is finite for ``x`` above about -88 (``exp`` of fp32). There is no
        mask: multiply or select the result as your loss or reward needs; an empty input gives an
        empty result.

        When ``logprobs`` requires grad, the same pass also writes ``dk/dx`` (fp32, 4 bytes per token,
        kept for the backward, which multiplies it by the upstream gradient). Gradients are first
        order only: a double backward does not see the second derivative.
    """
    V.check_tensor("logprobs", logprobs, _FLOAT_DTYPES)
    V.check_tensor("ref_logprobs", ref_logprobs, _FLOAT_DTYPES)
    V.check_same_device("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    V.check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    if estimator not in ESTIMATOR_CODES:
        raise ValueError(f"estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None:
        clamp = V.check_positive_float("clamp", clamp)
    cap = N.resolve_kl_cap("cap", cap, estimator)
    lp, ref = _rows(logprobs), _rows(ref_logprobs)
    name = OP.select([lp, ref], backend)
    need_grad = logprobs.requires_grad and torch.is_grad_enabled()
    params = [float(ESTIMATOR_CODES[estimator]), clamp or 0.0, cap or 0.0, float(need_grad)]
    kl, _ = _kl_penalty_op(lp, ref, params, name)
    return kl.view(logprobs.shape)
