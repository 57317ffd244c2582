"""rollout_importance_weights: the correction for rollouts whose log-probs come from another engine (vLLM,
SGLang, a quantized sampler, our own sampler in another precision) than the trainer that recomputes them.

The ratio of the policy loss is taken against the trainer's own old log-probs; the answers were drawn from the
sampler's distribution, so each token (or answer) is re-weighted by ``rho = pi_trainer_old / pi_sampler``, truncated
(TIS) or with outliers masked out (MIS), as TRL's ``vllm_importance_sampling_correction`` and verl's ``rollout_is``.
The weights are constants of the loss (no gradient) and multiply the advantages: every policy loss here is
positively homogeneous in the advantage (``l(c A) = c l(A)`` for ``c >= 0``, gradient included), so that is the
same as weighting each token's policy term while leaving the KL term unweighted, as TRL does.

A composition of a few element-wise and row-sum torch ops, computed once per rollout (no kernel: it is a few
passes over (B, T) that cost nothing next to the forward that produced the log-probs), in the log domain so
that no ``exp`` overflows: ``log rho`` is clamped to ``[log clip_min, log clip_max]`` before ``exp``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.reference import ROLLOUT_IS_MODES, ROLLOUT_IS_STATS

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def rollout_importance_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *,
                               mode: str = "sequence_mask", clip_max: float = 3.0,
                               clip_min: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights of the sampled tokens, ``(B, T)`` fp32, and their statistics.

    With ``delta = old_logprobs - sampler_logprobs`` at valid tokens (0 where the sampler gave NaN: no
    correction for that token):

    - ``token_truncate`` / ``token_mask``: ``rho_t = exp(delta_t)``
    - ``sequence_truncate`` / ``sequence_mask``: ``rho_t = exp(sum_t delta_t)`` for every token of the row
    - ``*_truncate``: ``w = clamp(rho, clip_min, clip_max)``; ``*_mask``: ``w = rho`` inside
      ``[clip_min, clip_max]``, else 0 (the token, or the whole answer, leaves the loss)

    Args:
        old_logprobs: ``(B, T)`` float: the trainer's log-probs of the sampled tokens under the rollout policy.
        sampler_logprobs: ``(B, T)`` float: the sampler's log-probs of the same tokens.
        mask: ``(B, T)`` bool, float or integer: nonzero at answer tokens. Weights are 0 elsewhere, whatever the
            log-probs hold there (padding, -inf, NaN).
        mode: one of ``token_truncate``, ``token_mask``, ``sequence_truncate``, ``sequence_mask`` (default, as
            TRL's), named as TRL's ``vllm_importance_sampling_mode``.
        clip_max: ``C_max`` > 0, default 3.0 (TRL's). Required (finite): the weight is bounded above.
        clip_min: ``C_min`` in ``(0, clip_max)``, or None: no lower bound.

    Returns:
        ``(weights, stats)``: ``weights`` ``(B, T)`` fp32, detached, finite for any finite inputs; ``stats`` a dict
        of detached fp32 scalars over the valid tokens: ``weight_mean``, ``clipped_frac`` (tokens whose rho was
        truncated or masked), ``log_diff_mean`` and ``log_diff_max`` (of ``|delta_t|``). Without a valid token the
        weights and every statistic are 0.
    """
    for name, x in (("old_logprobs", old_logprobs), ("sampler_logprobs", sampler_logprobs)):
        V.check_tensor(name, x, _FLOATS)
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (B, T) tensor, got shape {tuple(x.shape)}")
    V.check_shape("sampler_logprobs", sampler_logprobs, tuple(old_logprobs.shape), "old_logprobs.shape")
    V.check_same_device("sampler_logprobs", sampler_logprobs, "old_logprobs", old_logprobs)
    V.check_tensor("mask", mask)
    V.check_shape("mask", mask, tuple(old_logprobs.shape), "old_logprobs.shape")
    V.check_same_device("mask", mask, "old_logprobs", old_logprobs)
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"mode: expected one of {ROLLOUT_IS_MODES}, got {mode!r}")
    hi = math.log(V.check_positive_float("clip_max", clip_max))
    lo = None
    if clip_min is not None:
        if not V.check_positive_float("clip_min", clip_min) < clip_max:
            raise ValueError(f"clip_min: expected a number in (0, clip_max = {clip_max}), got {clip_min!r}")
        lo = math.log(clip_min)

    with torch.no_grad():
        valid = mask != 0
        m = mask.to(torch.float32)
        zero = torch.zeros((), device=old_logprobs.device)
        delta = torch.where(valid, old_logprobs.float() - sampler_logprobs.float(), zero)
        delta = torch.where(delta.isnan(), zero, delta)
        log_rho = delta if mode.startswith("token") else delta.sum(1, keepdim=True).expand_as(delta)
        out = log_rho > hi if lo is None else (log_rho > hi) | (log_rho < lo)
        bounded = log_rho.clamp(lo, hi)
        w = torch.exp(bounded) if mode.endswith("truncate") else torch.where(out, zero, torch.exp(bounded))
        w = torch.where(valid, w, zero)
        n = m.sum()
        denom = torch.where(n > 0, n, torch.ones_like(n))
        absd = delta.abs()
        values = ((w * m).sum() / denom, (out & valid).float().mul(m).sum() / denom, (absd * m).sum() / denom,
                  absd.amax() if absd.numel() else zero)
        return w, dict(zip(ROLLOUT_IS_STATS, values, strict=True))
