"""group_advantages: critic-free advantages from one score per answer (GRPO, Dr. GRPO, RLOO, REINFORCE++).

Flow: public function (validates, resolves the scale) -> custom op ``rlhf_fast::group_advantages`` (fake
impl, no autograd: advantages are constants of the policy loss) -> the backend chosen by
rlhf_fast.backends: torch (reference.group_advantages_ref), triton (rlhf_fast/kernels/group_advantages.py; the
(P, K) layout, K <= 4096). There is no cpu/cuda kernel: on the CPU the reference is the backend (see
bench/bench_group_advantages.py for what it costs against the formulas of TRL and verl).

Cost model, P prompts of K answers with b-byte scores: the eager formula TRL writes (view(-1, K),
nanmean, nanstd, repeat_interleave, subtract, divide, nan_to_num) is ~15 launches, each writing a
(P, K) or (P,) temporary; verl's per-answer Python loop is ~4 launches per answer (~130K at P = 4096,
K = 8). The Triton kernel reads the scores and the mask once and writes the fp32 advantages once
(b + 1 + 4 bytes per answer), plus one more pass for batch scaling.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.reference import (
    ADVANTAGE_ALLOWED_SCALES,
    ADVANTAGE_DEFAULT_SCALE,
    ADVANTAGE_MODES,
    ADVANTAGE_SCALES,
    group_advantages_ref,
)

OP = op_registry("group_advantages")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Backends. forward(scores (P, K) or (N,) contiguous, mask of the same shape bool contiguous or None,
# group_ids (N,) int64 or None, mode, scale (resolved, never None), eps) -> advantages fp32 shaped
# like scores.
# ---------------------------------------------------------------------------------------------

def _torch_forward(scores, mask, group_ids, mode, scale, eps):
    with torch.no_grad():
        return group_advantages_ref(scores, mode=mode, scale=scale, mask=mask, group_ids=group_ids, eps=eps)


def _triton_forward(scores, mask, group_ids, mode, scale, eps):
    from rlhf_fast.kernels import group_advantages as K

    return K.group_advantages_fwd(scores, mask, mode, scale, eps)


def _triton_limits(scores, *_):
    from rlhf_fast.kernels.group_advantages import MAX_K

    if scores.dim() != 2:
        return ["triton runs the (P, K) layout; flat scores with group_ids run on the torch backend"]
    if scores.shape[1] > MAX_K:
        return [f"triton holds a group in registers: K <= {MAX_K}, got K = {scores.shape[1]}"]
    return []


OP.register("torch", _torch_forward)
OP.register("triton", _triton_forward, limits=_triton_limits)


# ---------------------------------------------------------------------------------------------
# Custom op (no autograd: the public function passes detached tensors)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::group_advantages", mutates_args=())
def _group_advantages_op(scores: Tensor, mask: Tensor | None, group_ids: Tensor | None, mode: str, scale: str,
                         eps: float, backend: str) -> Tensor:
    return OP.impl(backend).forward(scores, mask, group_ids, mode, scale, eps)


@_group_advantages_op.register_fake
def _(scores, mask, group_ids, mode, scale, eps, backend):
    return scores.new_empty(scores.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def group_advantages(scores: Tensor, *, mode: str = "grpo", scale: str | None = None, mask: Tensor | None = None,
                     group_ids: Tensor | None = None, eps: float = 1e-4, backend: str | None = None) -> Tensor:
    """Group-relative advantages of sampled answers from one score (reward) per answer.

    Args:
        scores: ``(P, K)``: the scores of K answers to each of P prompts (one group per row); or ``(N,)``
            flat together with ``group_ids``. float32, bfloat16 or float16 (float64 on the torch backend).
        mode: ``"grpo"``, ``"dr_grpo"``, ``"rloo"``, ``"reinforce_pp"`` or ``"reinforce_pp_baseline"``
            (the table below).
        scale: ``"group"``, ``"batch"`` or ``"none"``; ``None`` takes the mode's own (grpo: group,
            dr_grpo and rloo: none, reinforce_pp and reinforce_pp_baseline: batch). Accepted: grpo any
            (TRL's ``scale_rewards``), dr_grpo ``"none"``, rloo ``"none"``/``"batch"`` (TRL's
            ``normalize_advantages``), reinforce_pp(_baseline) ``"batch"`` only (whitening is what they are).
        mask: shaped like ``scores``, bool or numbers (nonzero = valid); ``None`` = all valid. A dropped
            answer (and any answer whose score is NaN or +-inf, TRL's mark of an unscorable completion)
            gets advantage 0 and enters no statistic; its score is never used.
        group_ids: ``(N,)`` int32/int64 with flat ``scores``: answers with equal ids form one group (any
            values, any order, groups of any size).
        eps: added to the standard deviation before dividing (finite, >= 0). TRL uses 1e-4 (our
            default), verl 1e-6, OpenRLHF 1e-9 (group_norm).
        backend: ``"torch"`` or ``"triton"`` (the (P, K) layout, K <= 4096); default
            ``RLHF_FAST_BACKEND`` or the best available for the device.

    Per group with n valid answers r_1..r_n, mean m_g and standard deviation s_g; over all valid answers
    of the batch m_B and s_B. Every standard deviation is the unbiased one (Bessel, n - 1), as
    ``torch.std`` in TRL, verl and OpenRLHF, and ``eps`` is added to it, outside the square root::

        grpo                   r - m_g;   scale group: / (s_g + eps);   batch: / (s_B(r) + eps);   none
        dr_grpo                r - m_g                                   (Dr. GRPO: no std division)
        rloo                   n / (n - 1) * (r - m_g) = r - mean of the n - 1 other answers
                               scale batch: whitened, (A - m_B(A)) / (s_B(A) + eps)
        reinforce_pp           (r - m_B(r)) / (s_B(r) + eps)             (batch whitening, no groups)
        reinforce_pp_baseline  A = r - m_g, then (A - m_B(A)) / (s_B(A) + eps)

    Defined values: a group whose valid answers all score the same, or with fewer than two valid
    answers, has advantage exactly 0 in every mode but reinforce_pp (no groups there); a batch whose
    values are all equal whitens to 0; never NaN. Statistics in float64: finite for any finite score.

    Where peers differ (same inputs, no dropped answers, groups of >= 2 distinct scores: equal to
    TRL's GRPOTrainer/RLOOTrainer within fp32 rounding for grpo/dr_grpo/rloo, and to verl's
    compute_grpo_outcome_advantage / compute_rloo_outcome_advantage with ``eps=1e-6``):
      - a group of one answer: verl gives grpo ``r / (1 + eps)`` (mean 0, std 1) and rloo ``r``; TRL gives
        NaN (std of one value) for grpo and 0 for rloo; we give 0 for all modes.
      - a constant group: peers give ``0 / (0 + eps) = 0`` up to the rounding of the mean; we give 0 exactly.
      - reinforce_pp(_baseline): verl and OpenRLHF whiten the token-level returns over all response
        tokens (an answer weighs as many times as it has tokens) and divide by ``sqrt(var + 1e-8)``; we
        whiten per answer (each answer once) with ``s_B + eps``.

    Returns:
        advantages, float32, shaped like ``scores``, 0 at dropped answers. Not differentiable (computed
        from detached scores); the caller's tensors are never written to.
    """
    V.check_tensor("scores", scores, _FLOAT_DTYPES)
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode: expected one of {ADVANTAGE_MODES}, got {mode!r}")
    if scale is not None and scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale: expected one of {ADVANTAGE_SCALES} or None, got {scale!r}")
    scale = ADVANTAGE_DEFAULT_SCALE[mode] if scale is None else scale
    if scale not in ADVANTAGE_ALLOWED_SCALES[mode]:
        raise ValueError(f"scale: mode={mode!r} accepts {ADVANTAGE_ALLOWED_SCALES[mode]}, got {scale!r}")
    if isinstance(eps, bool):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}") from None
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if group_ids is None:
        if scores.dim() != 2:
            raise ValueError(f"scores: expected a 2-D (P, K) tensor (or 1-D (N,) with group_ids), "
                             f"got shape {tuple(scores.shape)}")
    else:
        V.check_tensor("group_ids", group_ids, (torch.int32, torch.int64))
        V.check_same_device("group_ids", group_ids, "scores", scores)
        if scores.dim() != 1:
            raise ValueError(f"scores: expected a 1-D (N,) tensor with group_ids, got shape {tuple(scores.shape)}")
        V.check_shape("group_ids", group_ids, scores.shape, "scores.shape")
        group_ids = group_ids.detach().to(torch.int64).contiguous()
    if mask is not None:
        V.check_tensor("mask", mask)
        V.check_same_device("mask", mask, "scores", scores)
        V.check_shape("mask", mask, scores.shape, "scores.shape")
        mask = (mask if mask.dtype == torch.bool else mask != 0).detach().contiguous()
    s = scores.detach().contiguous()
    name = OP.select([s], backend)
    return _group_advantages_op(s, mask, group_ids, mode, scale, eps, name)
