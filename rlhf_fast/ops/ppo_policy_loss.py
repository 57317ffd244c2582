"""ppo_policy_loss: the PPO clipped-ratio policy loss (optionally dual-clip; or CISPO's objective; at the token
or, as GSPO, the sequence level), aggregated, with its statistics, in one pass.

GSPO's sequence-level ratio is a composition in front of the per-token op: each row's mean log-ratio (one
differentiable masked row mean) becomes the per-token log-ratio input, so every backend computes it and the
gradient reaches each token through the mean by autograd.

Flow: public function (validates) -> custom op ``rlhf_fast::ppo_policy_loss`` (fake impl +
registered autograd) -> the backend chosen by rlhf_fast.backends: torch (reference.py), cpu
(csrc/cpu/ppo_losses.cpp), triton (rlhf_fast/kernels/ppo_losses.py). Per-token
math: csrc/include/rlhf_fast/ppo_losses_math.h; aggregation modes: rlhf_fast/ops/_aggregation.py.

The op boundary is the whole loss: one custom op returns the scalar loss, the statistics as one small
fp32 tensor, and what the backward needs. Because the loss is a scalar, d loss / d logprobs is known
in the forward: the kernels write the per-token gradient m * dl/dlogprobs in the same pass that reads
the inputs, plus one weight per sequence w_b (the aggregation). The backward is then one broadcast
multiply in plain PyTorch, grad = token_grad * (grad_loss * w_b) in the dtype of logprobs
(_aggregation.scale_token_grad): no backward op or kernel, whose per-call overhead would cost more
than the multiply, and inductor fuses it into its neighbours under torch.compile. grad_loss is a
tensor, so skipping the multiply when it is 1 would need a host sync: it is always done.

Cost model, (B, T) inputs (b bytes each, mask 1 byte): eager PyTorch runs ~25 kernels forward
(ratio, both branches, max, masks, sums and each statistic) and ~15 backward, each a pass over a
(B, T) fp32 temporary. Fused: forward reads 3b + 1 bytes per token and writes 4 (the per-token
gradient, only when logprobs requires grad); backward reads 4 and writes b.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.ops import _aggregation as A
from rlhf_fast.ops import _numerics as N
from rlhf_fast.reference import (
    POLICY_OBJECTIVES,
    PPO_POLICY_STATS,
    RATIO_LEVELS,
    ppo_policy_loss_terms_ref,
    ppo_policy_stats_ref,
)

OP = op_registry("ppo_policy_loss")


# ---------------------------------------------------------------------------------------------
# Backends. forward(logprobs, old_logprobs, advantages, mask (B, T) each, clip_eps_low, clip_eps_high,
# dual_clip or None, log_ratio_clamp or None, aggregation name, num_items tensor or None, num_items_int (-1: none),
# norm_length (-1: T), need_grad, cispo) -> (loss () fp32, stats (6,) fp32 in PPO_POLICY_STATS order,
# token_grad (B, T) fp32 = m * dl/dlogprobs (or (0,) without need_grad), row_scale (B,) fp32 = w_b).
# No backward: see _backward.
# ---------------------------------------------------------------------------------------------

def _torch_forward(logprobs, old_logprobs, advantages, mask, clip_eps_low, clip_eps_high, dual_clip, log_ratio_clamp,
                   aggregation, num_items, num_items_int, norm_length, need_grad, cispo):
    items = num_items if num_items is not None else (num_items_int if num_items_int >= 0 else None)
    norm = norm_length if norm_length > 0 else None
    with torch.no_grad():
        t = ppo_policy_loss_terms_ref(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps_low,
                                      clip_eps_high=clip_eps_high, dual_clip=dual_clip,
                                      log_ratio_clamp=log_ratio_clamp, objective="cispo" if cispo else "clip")
        loss = A.aggregate(t["loss"], mask, aggregation, items, norm)
        stats = torch.stack(list(ppo_policy_stats_ref(t).values()))
        token_grad = (torch.where(t["valid"], t["grad"] * t["m"], torch.zeros_like(t["grad"])) if need_grad
                      else loss.new_empty((0,)))
        return loss, stats, token_grad, A.row_weights(mask, aggregation, items, norm)


def _cpu_forward(logprobs, old_logprobs, advantages, mask, clip_eps_low, clip_eps_high, dual_clip, log_ratio_clamp,
                 aggregation, num_items, num_items_int, norm_length, need_grad, cispo):
    return torch.ops.rlhf_fast_C.ppo_policy_loss_clamped_fwd(logprobs, old_logprobs, advantages, mask, clip_eps_low,
                                                             clip_eps_high, dual_clip, log_ratio_clamp,
                                                             A.AGG_CODES[aggregation], num_items, num_items_int,
                                                             norm_length, need_grad, cispo)



def _triton_forward(logprobs, old_logprobs, advantages, mask, clip_eps_low, clip_eps_high, dual_clip, log_ratio_clamp,
                    aggregation, num_items, num_items_int, norm_length, need_grad, cispo):
    from rlhf_fast.kernels import ppo_losses as K

    return K.ppo_policy_loss_fwd(logprobs, old_logprobs, advantages, mask, clip_eps_low, clip_eps_high, dual_clip,
                                 log_ratio_clamp, A.AGG_CODES[aggregation], num_items, num_items_int, norm_length,
                                 need_grad, cispo)


OP.register("torch", _torch_forward)
OP.register("cpu", _cpu_forward, native_op="ppo_policy_loss_clamped_fwd")
OP.register("triton", _triton_forward)


# ---------------------------------------------------------------------------------------------
# Custom ops
#
# The scalar arguments travel as one float list, `params` (layout PARAMS). Every call of a custom op
# with a registered autograd runs torch.library's fill_defaults over its schema, which costs about
# 0.4 us * (number of arguments)^2 in this torch: 13 separate arguments made that ~65 us per call,
# more than the kernels take at (64, 2048); with 7 arguments the op's fwd+bwd overhead is ~24 us lower.
# ---------------------------------------------------------------------------------------------

# clip_eps_low, clip_eps_high, dual_clip (0: none), log_ratio_clamp (0: none), aggregation (code of
# _aggregation.AGG_CODES), num_items as a number (-1: none, or given as the num_items tensor),
# norm_length (-1: T), objective (index in POLICY_OBJECTIVES), need_grad (1 or 0; without it no per-token
# gradient is written; last, as A.fake_outputs reads it there).
PARAMS = ("clip_eps_low", "clip_eps_high", "dual_clip", "log_ratio_clamp", "aggregation", "num_items", "norm_length",
          "objective", "need_grad")


def _unpack(params):
    eps_low, eps_high, dual, clamp, agg, items, norm, objective, need_grad = params
    return (eps_low, eps_high, dual if dual > 0 else None, clamp if clamp > 0 else None, A.AGGREGATIONS[int(agg)],
            int(items), int(norm), need_grad != 0, POLICY_OBJECTIVES[int(objective)] == "cispo")


@torch.library.custom_op("rlhf_fast::ppo_policy_loss", mutates_args=())
def _ppo_policy_loss_op(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        num_items: Tensor | None, params: list[float], backend: str
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    eps_low, eps_high, dual, clamp, agg, items, norm, need_grad, cispo = _unpack(params)
    return OP.impl(backend).forward(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, dual, clamp, agg,
                                    num_items, items, norm, need_grad, cispo)


@_ppo_policy_loss_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, num_items, params, backend):
    return A.fake_outputs(logprobs, len(PPO_POLICY_STATS), params[-1] != 0)


A.register_loss_autograd(_ppo_policy_loss_op)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """GSPO's ratio level as inputs of the per-token op: (every valid token of row b holding the row's m-weighted
    mean log-ratio (B, T) fp32, differentiable through the mean; zeros as old_logprobs). Masked positions hold 0."""
    valid = mask != 0
    m = mask.to(torch.float32)
    diff = torch.where(valid, logprobs.float() - old_logprobs.float(), torch.zeros((), device=logprobs.device))
    mean = (diff * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    seq = torch.where(valid, mean.expand_as(diff), torch.zeros((), device=logprobs.device))
    return seq, torch.zeros_like(seq)


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                    aggregation: str = "token-mean", num_items: int | Tensor | None = None,
                    norm_length: int | None = None, log_ratio_clamp: float | None = N.LOG_RATIO_CLAMP,
                    objective: str = "clip", ratio_level: str = "token",
                    backend: str | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped-ratio policy loss (or CISPO's, or at GSPO's sequence level), aggregated over the valid tokens,
    and its statistics.

    Per valid token, with ``d = clamp(logprobs - old_logprobs, -c, c)`` (``c = log_ratio_clamp``),
    ``r = exp(d)`` and ``A = advantages``::

        l = max(-A * r, -A * clip(r, 1 - clip_eps, 1 + clip_eps_high))
        dual clip c (for A < 0):  l = min(l, -A * c)

    then ``loss = aggregate(l, mask)`` (see ``aggregation``). The gradient flows to ``logprobs`` only:
    ``-A * r * w`` where neither clip is active, 0 where one is, and 0 where the log-ratio clamp is
    (``|logprobs - old_logprobs| > c``: the ratio is constant there).

    ``objective="cispo"`` (CISPO, MiniMax-M1; TRL's ``loss_type="cispo"``; verl's ``cispo``): the ratio capped
    above is a detached weight of a REINFORCE term, ``w = min(r, 1 + clip_eps_high)``, ``l = -A * w * logprobs``,
    gradient ``-A * w`` on every token (no token's gradient is dropped; ``clip_frac`` counts ``r > 1 +
    clip_eps_high``). Without a lower bound, as both; ``clip_eps`` is unused and ``dual_clip`` must be None.
    TRL's ``epsilon_high`` for cispo is the cap itself (``1 + clip_eps_high`` here).

    ``ratio_level="sequence"`` (GSPO, Qwen; TRL's ``importance_sampling_level="sequence"``): every token of row
    b takes the row's ratio ``r_b = exp(clamp(sum_t m (logprobs - old) / sum_t m))``, the geometric mean of its
    token ratios, so ``d`` above is that mean; the gradient reaches each token of the row through the mean
    (``1 / n_b`` of the row's). The statistics are then over tokens of those per-row values. Not with cispo.

    Args:
        logprobs: ``(B, T)`` float32, bfloat16 or float16 (float64 on the torch backend): log-probs of the
            sampled tokens under the current policy. Differentiable.
        old_logprobs: ``(B, T)``, any of those dtypes: log-probs under the policy that sampled them. Data.
        advantages: ``(B, T)``, any of those dtypes. Data.
        mask: ``(B, T)`` bool, float or integer: 1 (True) for tokens of the loss, 0 for prompt and
            padding. Float and integer masks act as weights >= 0. Positions with ``mask == 0`` never
            affect anything, whatever the other inputs hold there (padding, ``-inf``, NaN).
        clip_eps: ``eps_low`` > 0: the ratio is clipped below at ``1 - clip_eps``.
        clip_eps_high: ``eps_high`` > 0 for the upper bound ``1 + clip_eps_high`` (DAPO's clip-higher);
            default ``clip_eps``.
        dual_clip: ``None`` or ``c > 1``: for negative advantages the loss is capped at ``-A * c``
            (dual-clip PPO).
        aggregation: ``"token-mean"`` (default), ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"``; with ``n_b`` = valid tokens of sequence b:

            - token-mean: ``sum(l * m) / sum(m)``
            - seq-mean-token-mean: mean over the sequences with ``n_b > 0`` of ``sum_t(l * m) / n_b``
            - seq-mean-token-sum: ``sum(l * m) / B`` (mean over all B sequences of ``sum_t(l * m)``)
            - seq-mean-token-sum-norm: ``sum(l * m) / (B * L)``, ``L = norm_length`` or ``T``

            (formulas in :mod:`rlhf_fast.ops._aggregation`).
        num_items: the final divisor instead of the local count, for gradient accumulation and data
            parallelism: an int or a 0-dim tensor on the inputs' device (read without a host sync) holding
            the global number of valid tokens (token-mean) or of sequences (seq-* modes; for
            seq-mean-token-mean, of sequences with at least one valid token). The losses of micro-batches
            then sum to the loss of the whole batch, gradients included.
        norm_length: ``L`` of seq-mean-token-sum-norm (a fixed generation budget), default ``T``.
        log_ratio_clamp: ``c`` > 0, default 20 (as verl and OpenRLHF): the log-ratio is clamped to
            ``[-c, c]`` before ``exp``, so one stale or broken token cannot make the loss ~1e10 (at a
            log-ratio of 25 with ``A = -1``: 4.85e8 instead of 7.2e10). ``None``: no clamp (``exp``
            overflows to inf past a log-ratio of about 88).
        objective: ``"clip"`` (default) or ``"cispo"``, see above.
        ratio_level: ``"token"`` (default) or ``"sequence"``, see above.
        backend: ``"torch"``, ``"cpu"`` or ``"triton"``; default ``RLHF_FAST_BACKEND`` or the best
            available for the device (see :mod:`rlhf_fast.backends`).

    Returns:
        ``(loss, stats)``: ``loss`` a float32 scalar; ``stats`` a dict of detached float32 scalars over the
        valid tokens (mask-weighted means), computed in the same pass:

        - ``clip_frac``: fraction of tokens where the clipped branch is the active one
          (``-A * clip(r) > -A * r``; its gradient is 0)
        - ``dual_clip_frac``: fraction where ``A < 0`` and the dual clip is active (0 without dual_clip)
        - ``approx_kl``: mean of ``k3 = r - 1 - log r`` with ``log r = d`` (the clamped log-ratio), Schulman's
          k3 estimate of KL(pi_old || pi) (``x = old - new`` in :func:`rlhf_fast.kl_penalty`'s k3)
        - ``ratio_mean``, ``ratio_min``, ``ratio_max``: of ``r`` (min and max over tokens with ``m != 0``)

        Statistics are local to this call (num_items does not rescale them). Without any valid token
        (fully masked rows or batch) the loss is 0 with a zero gradient and every statistic is 0: check
        ``mask.any()`` if that must not happen. Everything is computed in fp32; with the clamp the loss,
        statistics and gradient are finite for any finite log-ratio (``|A|`` below ~1e29), without it
        for log-ratios up to about ±88.

        When ``logprobs`` requires grad, the forward pass also writes the per-token gradient (fp32,
        4 bytes per token, kept for the backward, which only scales it). Gradients are first order
        only: a double backward does not see second derivatives.
    """
    mask = A.check_loss_inputs("logprobs", logprobs, {"old_logprobs": old_logprobs, "advantages": advantages}, mask)
    eps_low = V.check_positive_float("clip_eps", clip_eps)
    eps_high = eps_low if clip_eps_high is None else V.check_positive_float("clip_eps_high", clip_eps_high)
    if objective not in POLICY_OBJECTIVES:
        raise ValueError(f"objective: expected one of {POLICY_OBJECTIVES}, got {objective!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level: expected one of {RATIO_LEVELS}, got {ratio_level!r}")
    if objective == "cispo" and dual_clip is not None:
        raise ValueError(f"dual_clip: not used with objective='cispo', expected None, got {dual_clip!r}")
    if objective == "cispo" and ratio_level == "sequence":
        raise ValueError("ratio_level: 'sequence' is not defined for objective='cispo' (its loss is per token)")
    if dual_clip is not None:
        dual_clip = A.check_dual_clip(dual_clip)
    clamp = N.check_log_ratio_clamp(log_ratio_clamp)
    agg = A.check_aggregation(aggregation)
    items, items_int = A.check_num_items(num_items, logprobs)
    norm = A.check_norm_length(norm_length)
    if ratio_level == "sequence":
        logprobs, old_logprobs = _sequence_log_ratio(logprobs, old_logprobs, mask)

    need_grad = logprobs.requires_grad and torch.is_grad_enabled()
    name = OP.select([logprobs, old_logprobs, advantages, mask], backend)
    params = [eps_low, eps_high, dual_clip or 0.0, clamp or 0.0, float(agg), float(items_int), float(norm),
              float(POLICY_OBJECTIVES.index(objective)), float(need_grad)]
    loss, stats, _, _ = _ppo_policy_loss_op(logprobs, old_logprobs, advantages, mask, items, params, name)
    return loss, dict(zip(PPO_POLICY_STATS, stats.unbind(0), strict=True))
