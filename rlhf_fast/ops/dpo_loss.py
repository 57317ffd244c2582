"""dpo_loss: the DPO family of preference losses (sigmoid, IPO, hinge, robust, length-normalized) on
sequence log-probs, with the reward statistics trainers log.

Flow: public function (validates, flattens to (P,)) -> custom op ``rlhf_fast::dpo_loss`` (fake impl +
registered autograd, so it traces under torch.compile and passes opcheck) -> the backend chosen by
rlhf_fast.backends: torch (reference.dpo_loss_ref's formulas, with the derivative written in the same
pass; tests/test_dpo_loss.py holds them equal). There is no kernel: see below.

Cost model, P pairs: the inputs are four (P,) vectors of sequence log-probs (P is the batch size,
tens to thousands), so the op is bound by launches, not bytes: the eager formula as TRL writes it is
~12 launches forward (log-ratios, difference, logsigmoid, weights, mean, and the four statistics)
and as many backward. The forward here computes the per-pair derivative d loss / d log-prob (fp32,
4 bytes per pair and side) together with the loss, so the backward is one multiply per side (fused by
inductor with its neighbours under torch.compile) and never re-evaluates the sigmoid. The tokens'
log-probs that feed it (rlhf_fast.linear_logprobs / gather_logprobs) are where the bytes are.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.reference import DPO_LOSS_TYPES

OP = op_registry("dpo_loss")
LOSS_CODES = {name: code for code, name in enumerate(DPO_LOSS_TYPES)}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# loss types that take lengths (and that need them), and those that take label smoothing
_LENGTH_TYPES = ("ipo", "sigmoid_norm")
_SMOOTHING_TYPES = ("sigmoid", "robust")


class DPOStats(NamedTuple):
    """Reward statistics of a DPO batch, as TRL logs them (no gradient, fp32)."""

    chosen_rewards: Tensor    # (P,): beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards: Tensor  # (P,): beta * (policy_rejected_logps - ref_rejected_logps)
    reward_accuracy: Tensor   # (): fraction of pairs with chosen_rewards > rejected_rewards (0 for P = 0)
    reward_margin: Tensor     # (): mean of chosen_rewards - rejected_rewards (0 for P = 0)


# ---------------------------------------------------------------------------------------------
# Backends. forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected (P,) of any float dtypes,
# chosen_lengths, rejected_lengths (P,) or None, beta, loss_type, label_smoothing, need_grad)
# -> (loss (), chosen_rewards (P,), rejected_rewards (P,), accuracy (), margin (), d_chosen (P,),
# d_rejected (P,)), all fp32; d_* = d loss / d policy_*_logps, or (0,) without need_grad.
# ---------------------------------------------------------------------------------------------

def _torch_forward(pc, pr, rc, rr, len_c, len_r, beta, loss_type, label_smoothing, need_grad):
    # reference.dpo_loss_ref's formulas (tested equal to it), evaluated once: the loss and its derivative
    # share the log-ratios and the sigmoid, and the label-smoothing terms are skipped when ls = 0.
    with torch.no_grad():
        lc, lr = pc.float() - rc.float(), pr.float() - rr.float()
        normalized = loss_type in _LENGTH_TYPES and len_c is not None
        if normalized:
            inv_c, inv_r = 1.0 / len_c.float().clamp(min=1.0), 1.0 / len_r.float().clamp(min=1.0)
            x = beta * (lc * inv_c - lr * inv_r)
        else:
            x = beta * (lc - lr)
        ls = label_smoothing
        if loss_type in ("sigmoid", "robust", "sigmoid_norm"):
            per_pair = -F.logsigmoid(x)  # -log sigmoid(x)
            d = -torch.sigmoid(-x)       # d/dx of it
            if ls:
                sign = 1.0 if loss_type == "sigmoid" else -1.0
                per_pair = (1 - ls) * per_pair + sign * ls * (-F.logsigmoid(-x))
                d = (1 - ls) * d + sign * ls * torch.sigmoid(x)
            if loss_type == "robust":
                per_pair, d = per_pair / (1 - 2 * ls), d / (1 - 2 * ls)
            d = d * beta
        elif loss_type == "hinge":
            per_pair = torch.relu(1 - x)
            d = torch.where(x < 1, -beta, 0.0)
        else:  # ipo: (h - 1 / (2 beta))^2 with h = x / beta
            shifted = x / beta - 1 / (2 * beta)
            per_pair, d = shifted * shifted, 2 * shifted
        p = x.shape[0]
        chosen, rejected = beta * lc, beta * lr
        if p:
            loss, accuracy, margin = per_pair.mean(), (chosen > rejected).float().mean(), (chosen - rejected).mean()
        else:
            loss, accuracy, margin = (x.new_zeros(()) for _ in range(3))
        if need_grad:
            d = d / max(p, 1)
            d_c, d_r = (d * inv_c, -d * inv_r) if normalized else (d, -d)
        else:
            d_c, d_r = x.new_empty((0,)), x.new_empty((0,))  # two tensors: outputs never alias
        return loss, chosen, rejected, accuracy, margin, d_c, d_r


OP.register("torch", _torch_forward)


# ---------------------------------------------------------------------------------------------
# Custom op. The scalar arguments travel as one float list (beta, loss type code, label smoothing,
# need_grad): torch.library's per-call cost grows with the number of arguments (see ppo_policy_loss.py).
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::dpo_loss", mutates_args=())
def _dpo_loss_op(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                 chosen_lengths: Tensor | None, rejected_lengths: Tensor | None, params: list[float],
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    beta, code, label_smoothing, need_grad = params
    return tuple(OP.impl(backend).forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                                          rejected_lengths, beta, DPO_LOSS_TYPES[int(code)], label_smoothing,
                                          need_grad != 0))


@_dpo_loss_op.register_fake
def _(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, params, backend):
    p = policy_chosen.shape[0]
    new = lambda *shape: policy_chosen.new_empty(shape, dtype=torch.float32)
    g = p if params[-1] != 0 else 0
    return new(), new(p), new(p), new(), new(), new(g), new(g)


def _setup_context(ctx, inputs, output):
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.pairs = inputs[0].shape[0]
    d_c, d_r = output[5], output[6]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(d_c, d_r)


def _backward(ctx, grad_loss, *_):
    # The derivatives were written by the forward; the backward only scales them by the upstream gradient.
    d_c, d_r = ctx.saved_tensors
    none = (None,) * 6
    if grad_loss is None:
        return (None, None) + none
    if d_c.shape[0] != ctx.pairs:
        raise RuntimeError("dpo_loss: no derivative was saved (the forward ran without grad)")
    g = grad_loss.float()
    return (g * d_c).to(ctx.dtypes[0]), (g * d_r).to(ctx.dtypes[1]), *none


_dpo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _check_lengths(name: str, t, like: Tensor) -> Tensor:
    V.check_tensor(name, t, (torch.int32, torch.int64) + _FLOAT_DTYPES)
    V.check_same_device(name, t, "policy_chosen_logps", like)
    V.check_shape(name, t, like.shape, "policy_chosen_logps.shape")
    return t.detach().reshape(-1)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             backend: str | None = None) -> tuple[Tensor, DPOStats]:
    """DPO-family preference loss over P (chosen, rejected) pairs from sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(P,)`` (any shape, P elements; the four shapes
            equal) float32, bfloat16 or float16 (float64 on the torch backend): summed log-probs of the
            chosen / rejected answer under the policy. Differentiable.
        ref_chosen_logps, ref_rejected_logps: the same under the reference model; treated as data
            (no gradient flows into them, as in TRL where they come from a no-grad forward).
        beta: the DPO temperature (finite, > 0); for "ipo" the regularisation tau.
        loss_type: ``"sigmoid"`` (DPO), ``"ipo"``, ``"hinge"`` (SLiC), ``"robust"`` (rDPO) or
            ``"sigmoid_norm"`` (DPO on per-token log-ratios).
        label_smoothing: in [0, 0.5): the assumed probability that a label is flipped, for "sigmoid"
            (conservative DPO) and "robust"; must be 0 for the other types.
        chosen_lengths, rejected_lengths: ``(P,)`` token counts of the answers (ints or floats, clamped to
            >= 1), for "ipo" (optional) and "sigmoid_norm" (required): each log-ratio is divided by its
            length before the difference. Both or neither; other loss types refuse them.
        backend: ``"torch"``; default ``RLHF_FAST_BACKEND`` or the best available.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (per token for ipo / sigmoid_norm with lengths:
    ``(pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r``) and ``ls`` the label smoothing::

        sigmoid       -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)
        robust        (-(1 - ls) log sigmoid(beta h) + ls log sigmoid(-beta h)) / (1 - 2 ls)
        hinge         relu(1 - beta h)
        ipo           (h - 1 / (2 beta))^2
        sigmoid_norm  -log sigmoid(beta h)
        loss          mean over the P pairs (0 for P = 0)

    These are TRL DPOTrainer's formulas: "hinge", "robust" and "sigmoid_norm" as in TRL 1.x, "ipo" with
    lengths as TRL 1.x (per-token log-ratios; without lengths: the IPO paper's and TRL 0.x's sequence
    form), "sigmoid" with ``ls = 0`` as TRL 1.x and with ``ls > 0`` as TRL 0.x's cDPO (TRL 1.x dropped
    label smoothing from "sigmoid"). log sigmoid is evaluated stably (finite for any finite h).

    Returns:
        ``(loss, stats)``: ``loss`` 0-dim float32, differentiable w.r.t. the policy log-probs (their
        gradients in their dtypes; the forward writes d loss / d log-prob, the backward multiplies it by
        the upstream gradient); ``stats`` a :class:`DPOStats` (chosen / rejected rewards, reward accuracy,
        reward margin: TRL's ``rewards/*`` metrics, on the sequence log-ratios even for ipo/sigmoid_norm).
        The caller's tensors are never written to.
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, t in zip(names, tensors, strict=True):
        V.check_tensor(name, t, _FLOAT_DTYPES)
    for name, t in zip(names[1:], tensors[1:], strict=True):
        V.check_same_device(name, t, names[0], tensors[0])
        V.check_shape(name, t, tensors[0].shape, "policy_chosen_logps.shape")
    if loss_type not in LOSS_CODES:
        raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    beta = V.check_positive_float("beta", beta)
    if isinstance(label_smoothing, bool):
        raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {label_smoothing!r}")
    try:
        ls = float(label_smoothing)
    except (TypeError, ValueError):
        raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {label_smoothing!r}") from None
    if not (math.isfinite(ls) and 0.0 <= ls < 0.5):
        raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {label_smoothing!r}")
    if ls != 0.0 and loss_type not in _SMOOTHING_TYPES:
        raise ValueError(f"label_smoothing: loss_type={loss_type!r} takes none (only {_SMOOTHING_TYPES} do), "
                         f"got {label_smoothing!r}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        missing = "rejected_lengths" if rejected_lengths is None else "chosen_lengths"
        raise ValueError(f"{missing}: expected a tensor when the other length tensor is given, got None")
    if chosen_lengths is not None:
        if loss_type not in _LENGTH_TYPES:
            raise ValueError(f"chosen_lengths: loss_type={loss_type!r} takes no lengths (only {_LENGTH_TYPES} do), "
                             f"got a tensor")
        chosen_lengths = _check_lengths("chosen_lengths", chosen_lengths, policy_chosen_logps)
        rejected_lengths = _check_lengths("rejected_lengths", rejected_lengths, policy_chosen_logps)
    elif loss_type == "sigmoid_norm":
        raise ValueError("chosen_lengths: loss_type='sigmoid_norm' needs chosen_lengths and rejected_lengths, "
                         "got None")

    flat = [t.reshape(-1) for t in tensors]
    name = OP.select(flat, backend)
    need_grad = torch.is_grad_enabled() and (policy_chosen_logps.requires_grad or policy_rejected_logps.requires_grad)
    params = [beta, float(LOSS_CODES[loss_type]), ls, float(need_grad)]
    loss, chosen, rejected, accuracy, margin, _, _ = _dpo_loss_op(*flat, chosen_lengths, rejected_lengths, params,
                                                                  name)
    return loss, DPOStats(chosen, rejected, accuracy, margin)
