"""ranking_loss / pairwise_loss: the reward model's K-wise ranking loss of InstructGPT, and its K = 2 case.

Flow: public functions (validate; pairwise_loss stacks (chosen, rejected) into (P, 2) rewards) ->
custom op ``rlhf_fast::ranking_loss`` (fake impl + registered autograd, so it traces under
torch.compile and passes opcheck) -> the backend chosen by rlhf_fast.backends: torch
(reference.ranking_loss_ref), cpu (csrc/cpu/ranking_loss.cpp), cuda (csrc/cuda/ranking_loss.cu),
triton (rlhf_fast/kernels/ranking_loss.py). The pair math is rlhf_fast/ranking_math.h.

Cost model, P prompts of K candidates: the eager vectorized loss builds (P, K, K) fp32 pair matrices
(differences, softplus, masks: ~10 of them, 40 bytes * P * K^2 moved, ~15 kernel launches forward and
as many backward); a per-pair Python loop costs ~6 op calls per pair (P * K(K-1)/2 * 6, 220K calls at
P = 1024, K = 9). The kernels read the P * K rewards once per pass and keep the pairs in registers:
one task / warp / program per (group of) prompts, per-prompt sums added in a fixed order, two counts
saved for the backward, which recomputes the pairs from the rewards.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.reference import ranking_loss_backward_ref, ranking_loss_ref

OP = op_registry("ranking_loss")


class RankingStats(NamedTuple):
    """Statistics of a ranking / pairwise loss over all ranked pairs of the batch (no gradient)."""

    accuracy: Tensor     # () fp32: fraction of pairs with r_w > r_l (0 without pairs)
    num_pairs: Tensor    # () int64: ranked pairs
    mean_margin: Tensor  # () fp32: mean of r_w - r_l (0 without pairs)


def check_ranking_values(rewards: Tensor, num_candidates: Tensor | None, ranks: Tensor | None) -> None:
    """num_candidates in [0, K]; ranks of the candidates in use in [0, n_p) (one sync). The CPU kernel
    runs the same checks inside its pass, with the same messages."""
    n_prompts, k = rewards.shape
    if k < 2:
        raise ValueError(f"rewards: expected at least 2 answers per prompt (shape (P, K) with K >= 2) to form "
                         f"a ranked pair, got shape {tuple(rewards.shape)}")
    if num_candidates is not None:
        bad = (num_candidates < 0) | (num_candidates > k)
        if bool(bad.any()):
            p = int(bad.nonzero()[0, 0])
            raise ValueError(f"num_candidates: expected values in [0, {k}] (K = rewards.shape[1]), got "
                             f"{int(num_candidates[p])} at position {p}")
    if ranks is not None:
        n = num_candidates.view(-1, 1) if num_candidates is not None else torch.full_like(ranks[:, :1], k)
        in_use = torch.arange(k, device=ranks.device) < n
        bad = in_use & ((ranks < 0) | (ranks >= n))
        if bool(bad.any()):
            p, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"ranks: expected values in [0, {int(n[p, 0])}) for the {int(n[p, 0])} candidates of "
                             f"prompt {p}, got {int(ranks[p, i])} at ({p}, {i})")


def _margin_arg(margins: Tensor | None, margin: float):
    return margins if margins is not None else margin


# ---------------------------------------------------------------------------------------------
# Backends. forward(rewards (P, K) contiguous, num_candidates (P,) int64 | None, ranks (P, K) int64 |
# None, margins (P,) fp32 | None, margin float) -> (loss (), accuracy (), mean_margin () fp32,
# counts (2,) int64 = (pairs, ranked prompts)).
# backward(grad_loss () fp32, rewards, num_candidates, ranks, margins, margin, counts)
# -> grad_rewards (P, K) in the dtype of rewards.
# ---------------------------------------------------------------------------------------------

def _torch_forward(rewards, num_candidates, ranks, margins, margin):
    check_ranking_values(rewards, num_candidates, ranks)
    with torch.no_grad():
        return ranking_loss_ref(rewards, num_candidates=num_candidates, ranks=ranks,
                                margin=_margin_arg(margins, margin))


def _torch_backward(grad_loss, rewards, num_candidates, ranks, margins, margin, counts):
    return ranking_loss_backward_ref(grad_loss, rewards, num_candidates, ranks, _margin_arg(margins, margin),
                                     counts[1])


def _native_forward(rewards, num_candidates, ranks, margins, margin):
    if rewards.device.type != "cpu":  # the CPU kernel checks the values inside its pass
        check_ranking_values(rewards, num_candidates, ranks)
    return torch.ops.rlhf_fast_C.ranking_loss_fwd(rewards, num_candidates, ranks, margins, margin)


def _native_backward(grad_loss, rewards, num_candidates, ranks, margins, margin, counts):
    return torch.ops.rlhf_fast_C.ranking_loss_bwd(grad_loss, rewards, num_candidates, ranks, margins, margin, counts)


def _triton_forward(rewards, num_candidates, ranks, margins, margin):
    from rlhf_fast.kernels import ranking_loss as K

    check_ranking_values(rewards, num_candidates, ranks)
    return K.ranking_loss_fwd(rewards, num_candidates, ranks, margins, margin)


def _triton_backward(grad_loss, rewards, num_candidates, ranks, margins, margin, counts):
    from rlhf_fast.kernels import ranking_loss as K

    return K.ranking_loss_bwd(grad_loss, rewards, num_candidates, ranks, margins, margin, counts)


def _triton_limits(rewards, *_):
    from rlhf_fast.kernels.ranking_loss import MAX_K

    k = rewards.shape[-1]
    return [] if k <= MAX_K else [f"triton keeps a prompt's K x K pairs in registers: K <= {MAX_K}, got K = {k}"]


OP.register("torch", _torch_forward, _torch_backward)
OP.register("cpu", _native_forward, _native_backward)
OP.register("cuda", _native_forward, _native_backward)
OP.register("triton", _triton_forward, _triton_backward, limits=_triton_limits)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::ranking_loss", mutates_args=())
def _ranking_loss_op(rewards: Tensor, num_candidates: Tensor | None, ranks: Tensor | None, margins: Tensor | None,
                     margin: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(OP.impl(backend).forward(rewards, num_candidates, ranks, margins, margin))


@_ranking_loss_op.register_fake
def _(rewards, num_candidates, ranks, margins, margin, backend):
    scalar = lambda: rewards.new_empty((), dtype=torch.float32)
    return scalar(), scalar(), scalar(), rewards.new_empty((2,), dtype=torch.int64)


@torch.library.custom_op("rlhf_fast::ranking_loss_backward", mutates_args=())
def _ranking_loss_backward_op(grad_loss: Tensor, rewards: Tensor, num_candidates: Tensor | None,
                              ranks: Tensor | None, margins: Tensor | None, margin: float, counts: Tensor,
                              backend: str) -> Tensor:
    return OP.impl(backend).backward(grad_loss, rewards, num_candidates, ranks, margins, margin, counts)


@_ranking_loss_backward_op.register_fake
def _(grad_loss, rewards, num_candidates, ranks, margins, margin, counts, backend):
    return rewards.new_empty(rewards.shape)


def _setup_context(ctx, inputs, output):
    rewards, num_candidates, ranks, margins, margin, backend = inputs
    ctx.save_for_backward(rewards, num_candidates, ranks, margins, output[3])
    ctx.args = (margin, backend)


def _backward(ctx, grad_loss, _grad_acc, _grad_margin, _grad_counts):
    rewards, num_candidates, ranks, margins, counts = ctx.saved_tensors
    margin, backend = ctx.args
    if grad_loss is None:
        return None, None, None, None, None, None
    grad = _ranking_loss_backward_op(grad_loss.float().contiguous(), rewards, num_candidates, ranks, margins,
                                     margin, counts, backend)
    return grad, None, None, None, None, None


_ranking_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def _check_float_tensor(name: str, t) -> None:
    V.check_tensor(name, t)
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor (float32, bfloat16 or float16), "
                         f"got dtype {t.dtype}")


def _check_margin(margin, like_name: str, like: Tensor, shape: tuple, what: str):
    """-> (margins fp32 contiguous (prod(shape),) or None, margin float)."""
    if isinstance(margin, Tensor):
        _check_float_tensor("margin", margin)
        V.check_same_device("margin", margin, like_name, like)
        V.check_shape("margin", margin, shape, what)
        return margin.detach().reshape(-1).float().contiguous(), 0.0
    if isinstance(margin, bool):
        raise ValueError(f"margin: expected a float or a tensor, got {margin!r}")
    try:
        value = float(margin)
    except (TypeError, ValueError):
        raise ValueError(f"margin: expected a float or a tensor of shape {tuple(shape)}, got {margin!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"margin: expected a finite number, got {margin!r}")
    return None, value


def _run(rewards: Tensor, num_candidates, ranks, margins, margin: float, backend):
    name = OP.select([rewards], backend)
    loss, accuracy, mean_margin, counts = _ranking_loss_op(rewards, num_candidates, ranks, margins, margin, name)
    return loss, RankingStats(accuracy.detach(), counts[0], mean_margin.detach())


def ranking_loss(rewards: Tensor, *, num_candidates: Tensor | None = None, ranks: Tensor | None = None,
                 margin: float | Tensor = 0.0, backend: str | None = None) -> tuple[Tensor, RankingStats]:
    """The InstructGPT reward-model loss over K ranked answers per prompt.

    Args:
        rewards: ``(P, K)`` float32, bfloat16 or float16 (float64 on the torch backend): the reward
            model's scores of K answers to each of P prompts, ordered best -> worst unless ``ranks``.
        num_candidates: ``(P,)`` int32/int64 in [0, K]: prompt p uses candidates ``0 .. n_p - 1``; the
            entries past it are padding, never read (NaN is fine) and get a zero gradient.
        ranks: ``(P, K)`` int32/int64: rank of each candidate, 0 = best, lower is better, each in
            [0, n_p) for the candidates in use; equal ranks are a tie and form no pair.
        margin: a float, or a ``(P,)`` tensor of per-prompt margins (no gradient flows into it):
            a pair's loss is ``softplus(-(r_w - r_l - margin))``.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (Triton: K <= 64); default
            ``RLHF_FAST_BACKEND`` or the best available for the device.

    ::

        loss = mean over prompts with >= 1 ranked pair of
               (mean over the prompt's ranked pairs (w above l) of -log sigmoid(r_w - r_l - margin))

    computed in fp32 with a stable softplus (finite loss and gradient for rewards of any finite
    magnitude). K < 2 (one answer per prompt: no pair at all) raises ValueError. Prompts without a
    ranked pair (``num_candidates < 2``, all ties) are left out of the mean; if no prompt of the batch
    has one (or P = 0), the loss is 0 with a zero gradient and ``stats.num_pairs`` is 0: check it when
    such a batch must not happen (the kernels do not sync the host to look).

    Returns:
        ``(loss, stats)``: ``loss`` a 0-dim float32 tensor, differentiable w.r.t. ``rewards`` (the
        gradient has the dtype of ``rewards``); ``stats`` a :class:`RankingStats` (accuracy,
        num_pairs, mean_margin over all ranked pairs of the batch).
    """
    _check_float_tensor("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected a 2-D (P, K) tensor, got shape {tuple(rewards.shape)}")
    n_prompts, k = rewards.shape
    if k < 2:
        raise ValueError(f"rewards: expected at least 2 answers per prompt (shape (P, K) with K >= 2) to form "
                         f"a ranked pair, got shape {tuple(rewards.shape)}")
    if num_candidates is not None:
        V.check_tensor("num_candidates", num_candidates, (torch.int32, torch.int64))
        V.check_same_device("num_candidates", num_candidates, "rewards", rewards)
        V.check_shape("num_candidates", num_candidates, (n_prompts,), "rewards.shape[:1]")
        num_candidates = num_candidates.to(torch.int64).contiguous()
    if ranks is not None:
        V.check_tensor("ranks", ranks, (torch.int32, torch.int64))
        V.check_same_device("ranks", ranks, "rewards", rewards)
        V.check_shape("ranks", ranks, (n_prompts, k), "rewards.shape")
        ranks = ranks.to(torch.int64).contiguous()
    margins, margin_value = _check_margin(margin, "rewards", rewards, (n_prompts,), "one margin per prompt")
    return _run(rewards.contiguous(), num_candidates, ranks, margins, margin_value, backend)


def pairwise_loss(chosen: Tensor, rejected: Tensor, *, margin: float | Tensor | None = None,
                  backend: str | None = None) -> tuple[Tensor, RankingStats]:
    """Pairwise reward-model loss ``mean(-log sigmoid(chosen - rejected - margin))``: ranking_loss with
    K = 2 (the same kernels, on ``(P, 2)`` rewards stacked from the two arguments).

    Args:
        chosen, rejected: scores of the preferred and the rejected answer, same shape (any, P elements
            in all; e.g. (P,) or (P, 1)), float32/bfloat16/float16; different dtypes are promoted.
        margin: ``None`` (0), a float, or a tensor of per-pair margins shaped like ``chosen``
            (Llama 2's margin from the preference strength); no gradient flows into it.
        backend: as in :func:`ranking_loss`.

    Returns:
        ``(loss, stats)`` as :func:`ranking_loss`; gradients flow to ``chosen`` and ``rejected`` in
        their dtypes. Every element is one pair (K = 2 answers), so there is always a pair unless the
        batch is empty; an empty batch gives loss 0 with ``stats.num_pairs`` 0.
    """
    _check_float_tensor("chosen", chosen)
    _check_float_tensor("rejected", rejected)
    V.check_same_device("rejected", rejected, "chosen", chosen)
    V.check_shape("rejected", rejected, chosen.shape, "chosen.shape")
    margins, margin_value = _check_margin(0.0 if margin is None else margin, "chosen", chosen, tuple(chosen.shape),
                                          "chosen.shape: one margin per pair")
    dtype = torch.promote_types(chosen.dtype, rejected.dtype)
    rewards = torch.stack([chosen.reshape(-1).to(dtype), rejected.reshape(-1).to(dtype)], dim=1)  # (P, 2)
    return _run(rewards, None, None, margins, margin_value, backend)
