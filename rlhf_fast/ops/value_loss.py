"""value_loss: the PPO clipped value loss, aggregated, with its statistics, in one pass.

Flow: public function (validates) -> custom op ``rlhf_fast::value_loss`` (fake impl + registered
autograd) -> the backend chosen by rlhf_fast.backends: torch (reference.py), cpu
(csrc/cpu/ppo_losses.cpp), triton (rlhf_fast/kernels/ppo_losses.py). Per-token
math: csrc/include/rlhf_fast/ppo_losses_math.h; aggregation modes: rlhf_fast/ops/_aggregation.py.

Same boundary as ppo_policy_loss (see its module docstring): one custom op returns the loss, the
statistics and the per-token gradient m * dl/dvalues written in the forward pass, and the backward is
one PyTorch multiply by grad_loss * w_b.

The explained variance needs Var[R] and Var[R - v] over the valid tokens. Computed as
E[x^2] - E[x]^2 in fp32 it cancels catastrophically when returns sit far from 0 next to their spread,
so the kernels keep weighted moments (count, mean, sum of squared deviations) per piece of a row and
merge them with Chan's formula (ppo::merge_moments), as stable as a two-pass computation while
reading the inputs once.

Cost model, (B, T) inputs (b bytes each, mask 1 byte): eager PyTorch runs ~30 kernels forward (the
clipped value, both squared errors, max, the masked sums, two variances) and ~12 backward. Fused:
forward reads 3b + 1 bytes per token and writes 4 (the per-token gradient, only when values
requires grad); backward reads 4 and writes b.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.ops import _aggregation as A
from rlhf_fast.reference import VALUE_STATS, value_loss_terms_ref, value_stats_ref

OP = op_registry("value_loss")


# ---------------------------------------------------------------------------------------------
# Backends. forward(values, old_values, returns, mask (B, T) each, clip_eps, aggregation name,
# num_items tensor or None, num_items_int (-1: none), norm_length (-1: T), need_grad) -> (loss () fp32,
# stats (2,) fp32 in VALUE_STATS order, token_grad (B, T) fp32 = m * dl/dvalues (or (0,) without
# need_grad), row_scale (B,) fp32 = w_b). No backward: see _backward (shared with ppo_policy_loss).
# ---------------------------------------------------------------------------------------------

def _torch_forward(values, old_values, returns, mask, clip_eps, aggregation, num_items, num_items_int, norm_length,
                   need_grad):
    items = num_items if num_items is not None else (num_items_int if num_items_int >= 0 else None)
    norm = norm_length if norm_length > 0 else None
    with torch.no_grad():
        t = value_loss_terms_ref(values, old_values, returns, mask, clip_eps=clip_eps)
        loss = A.aggregate(t["loss"], mask, aggregation, items, norm)
        stats = torch.stack(list(value_stats_ref(t).values()))
        token_grad = (torch.where(t["valid"], t["grad"] * t["m"], torch.zeros_like(t["grad"])) if need_grad
                      else loss.new_empty((0,)))
        return loss, stats, token_grad, A.row_weights(mask, aggregation, items, norm)


def _native_forward(values, old_values, returns, mask, clip_eps, aggregation, num_items, num_items_int, norm_length,
                    need_grad):
    return torch.ops.rlhf_fast_C.value_loss_fwd(values, old_values, returns, mask, clip_eps,
                                                A.AGG_CODES[aggregation], num_items, num_items_int, norm_length,
                                                need_grad)


def _triton_forward(values, old_values, returns, mask, clip_eps, aggregation, num_items, num_items_int, norm_length,
                    need_grad):
    from rlhf_fast.kernels import ppo_losses as K

    return K.value_loss_fwd(values, old_values, returns, mask, clip_eps, A.AGG_CODES[aggregation], num_items,
                            num_items_int, norm_length, need_grad)


OP.register("torch", _torch_forward)
OP.register("cpu", _native_forward)
OP.register("triton", _triton_forward)


# ---------------------------------------------------------------------------------------------
# Custom ops. The scalar arguments travel as one float list (layout PARAMS), for the reason given
# in ppo_policy_loss.py: the per-call cost of torch.library's autograd wrapper grows with the
# square of the number of arguments.
# ---------------------------------------------------------------------------------------------

# clip_eps, aggregation (code of _aggregation.AGG_CODES), num_items as a number (-1: none, or given as
# the num_items tensor), norm_length (-1: T), need_grad (1 or 0).
PARAMS = ("clip_eps", "aggregation", "num_items", "norm_length", "need_grad")


@torch.library.custom_op("rlhf_fast::value_loss", mutates_args=())
def _value_loss_op(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, num_items: Tensor | None,
                   params: list[float], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    clip_eps, agg, items, norm, need_grad = params
    return OP.impl(backend).forward(values, old_values, returns, mask, clip_eps, A.AGGREGATIONS[int(agg)],
                                    num_items, int(items), int(norm), need_grad != 0)


@_value_loss_op.register_fake
def _(values, old_values, returns, mask, num_items, params, backend):
    return A.fake_outputs(values, len(VALUE_STATS), params[-1] != 0)


A.register_loss_autograd(_value_loss_op)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_eps: float = 0.2,
               aggregation: str = "token-mean", num_items: int | Tensor | None = None,
               norm_length: int | None = None, backend: str | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped value loss, aggregated over the valid tokens, and its statistics.

    Per valid token, with ``v = values``, ``v_old = old_values``, ``R = returns``::

        v_clipped = clip(v, v_old - clip_eps, v_old + clip_eps)
        l = 0.5 * max((v - R)^2, (v_clipped - R)^2)

    then ``loss = aggregate(l, mask)``. The gradient flows to ``values`` only: ``(v - R) * w`` where the
    unclipped term is the larger (or they tie), 0 where the clipped one is.

    Args:
        values: ``(B, T)`` float32, bfloat16 or float16 (float64 on the torch backend): the value head's
            predictions. Differentiable.
        old_values: ``(B, T)``, any of those dtypes: predictions at rollout time. Data.
        returns: ``(B, T)``, any of those dtypes: the targets (e.g. GAE advantages + old values). Data.
        mask: ``(B, T)`` bool, float (weights >= 0) or integer (taken as float weights); positions
            with ``mask == 0`` never affect anything, whatever the other inputs hold there.
        clip_eps: a finite number > 0, the clip range around ``old_values``.
        aggregation, num_items, norm_length, backend: as in :func:`rlhf_fast.ppo_policy_loss`
            (token-mean ``sum(l * m) / sum(m)``; seq-mean-token-mean; seq-mean-token-sum ``sum(l * m) / B``;
            seq-mean-token-sum-norm ``sum(l * m) / (B * L)``; formulas in :mod:`rlhf_fast.ops._aggregation`).

    Returns:
        ``(loss, stats)``: ``loss`` a float32 scalar; ``stats`` a dict of detached float32 scalars over the
        valid tokens, weighted by the mask, computed in the same pass:

        - ``clip_frac``: fraction of tokens where the clipped term is the larger
        - ``explained_variance``: ``1 - Var[R - v] / Var[R]`` (population variances), 0 when ``Var[R] == 0``

        Without any valid token the loss is 0 with a zero gradient and both statistics are 0. As in
        ppo_policy_loss, the forward writes the per-token gradient (fp32, kept for the backward) when
        ``values`` requires grad, and gradients are first order only.
    """
    mask = A.check_loss_inputs("values", values, {"old_values": old_values, "returns": returns}, mask)
    clip_eps = V.check_positive_float("clip_eps", clip_eps)
    agg = A.check_aggregation(aggregation)
    items, items_int = A.check_num_items(num_items, values)
    norm = A.check_norm_length(norm_length)

    need_grad = values.requires_grad and torch.is_grad_enabled()
    name = OP.select([values, old_values, returns, mask], backend)
    params = [clip_eps, float(agg), float(items_int), float(norm), float(need_grad)]
    loss, stats, _, _ = _value_loss_op(values, old_values, returns, mask, items, params, name)
    return loss, dict(zip(VALUE_STATS, stats.unbind(0), strict=True))
