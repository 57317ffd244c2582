"""Pure-PyTorch references of every rlhf_fast op: the ground truth the kernels are tested against,
the ``torch`` backend, and the eager baseline of the benchmarks.

They favour clarity over speed (they materialize full fp32 intermediates) and follow the numerics
contract of the fused kernels: fp32 results, defined values for ignored positions and for rows
whose logits are all -inf.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gather_logprobs_ref(logits: Tensor, labels: Tensor, *, temperature: float = 1.0,
                        ignore_index: int = -100, return_entropy: bool = False
                        ) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-token log-probs (and entropy) of `labels` under softmax(logits / temperature).

    logits (N, V) any float dtype, labels (N,) integer. Returns fp32 (logprobs (N,),
    entropy (N,) or None, lse (N,)) where lse = logsumexp(logits / temperature).
    Ignored positions (label == ignore_index) give logprob 0 and entropy 0; a row of all -inf
    logits gives lse = -inf, logprob -inf (0 if ignored), entropy 0 and no gradient.
    Differentiable in `logits` through ordinary autograd.
    """
    z = logits.float() / temperature                                    # (N, V)
    keep = labels != ignore_index
    # A dead row (all -inf) would give NaN in logsumexp and in its gradient: compute it on zeros
    # instead, then report lse = -inf and logprob = -inf with no gradient flowing into it.
    dead = z.amax(dim=-1, keepdim=True) == float("-inf")               # (N, 1)
    z = torch.where(dead, torch.zeros_like(z), z)
    lse = torch.logsumexp(z, dim=-1)                                    # (N,)
    logp = z - lse.unsqueeze(-1)                                        # (N, V) log-softmax
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    label_logp = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    dead = dead.squeeze(-1)
    neg_inf = torch.full_like(label_logp, float("-inf"))
    zero = torch.zeros_like(label_logp)
    logprobs = torch.where(keep, torch.where(dead, neg_inf, label_logp), zero)
    entropy = None
    if return_entropy:
        p = logp.exp()
        # p * log p is 0 where p == 0 (logit -inf); mask log p first so the gradient is 0, not NaN
        plogp = p * torch.where(p > 0, logp, torch.zeros_like(logp))
        entropy = torch.where(keep & ~dead, -plogp.sum(-1), zero)
    lse = torch.where(dead, neg_inf, lse)
    return logprobs, entropy, lse.detach()


def gather_logprobs_backward_ref(grad_logprobs: Tensor, grad_entropy: Tensor | None, logits: Tensor,
                                 labels: Tensor, lse: Tensor, entropy: Tensor | None, *,
                                 temperature: float = 1.0, ignore_index: int = -100) -> Tensor:
    """Gradient of gather_logprobs_ref w.r.t. logits, from the saved per-row lse and entropy.

    With z = logits / T, p = softmax(z):
        dL/dlogits_j = (g_lp * ([j == label] - p_j) - g_H * p_j * (log p_j + H)) / T
    zero on ignored rows and on rows whose logits are all -inf. Returns (N, V) in logits' dtype.
    (Autograd of gather_logprobs_ref gives the same; tests check the two agree.)
    """
    z = logits.float() / temperature                                    # (N, V)
    live = (labels != ignore_index) & torch.isfinite(lse)              # (N,)
    safe_lse = torch.where(live, lse, torch.zeros_like(lse)).unsqueeze(-1)
    logp = torch.clamp(z - safe_lse, min=torch.finfo(torch.float32).min)  # -inf logits -> p = 0
    p = logp.exp()
    g_lp = torch.where(live, grad_logprobs.float(), torch.zeros_like(lse)).unsqueeze(-1)
    grad = -g_lp * p
    safe_labels = torch.where(live, labels, torch.zeros_like(labels)).long().unsqueeze(-1)
    grad = grad.scatter_add(-1, safe_labels, g_lp)
    if grad_entropy is not None:
        g_h = torch.where(live, grad_entropy.float(), torch.zeros_like(lse)).unsqueeze(-1)
        grad = grad - g_h * p * (logp + entropy.float().unsqueeze(-1))
    return (grad / temperature).to(logits.dtype)


def linear_logits_ref(hidden: Tensor, weight: Tensor, bias: Tensor | None = None,
                      logit_softcap: float | None = None) -> Tensor:
    """fp32 logits of an lm_head: ``hidden @ weight.T + bias``, then Gemma-style soft-capping
    ``c * tanh(logits / c)`` when ``logit_softcap = c`` is given. hidden (N, H), weight (V, H)."""
    logits = hidden.float() @ weight.float().t()                         # (N, V)
    if bias is not None:
        logits = logits + bias.float()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


def linear_logprobs_ref(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                        temperature: float = 1.0, logit_softcap: float | None = None, ignore_index: int = -100,
                        return_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
    """gather_logprobs_ref of the lm_head's logits (materialized in fp32): the ground truth of
    linear_logprobs. hidden (N, H), weight (V, H), labels (N,). Returns (logprobs, entropy, lse)."""
    return gather_logprobs_ref(linear_logits_ref(hidden, weight, bias, logit_softcap), labels,
                               temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)


def linear_logprobs_backward_ref(grad_logprobs: Tensor, grad_entropy: Tensor | None, hidden: Tensor, weight: Tensor,
                                 bias: Tensor | None, labels: Tensor, lse: Tensor, entropy: Tensor | None, *,
                                 temperature: float = 1.0, logit_softcap: float | None = None,
                                 ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of linear_logprobs_ref w.r.t. hidden, weight and bias (in their dtypes).

    With raw logits l = hidden @ weight.T + bias, capped c = C tanh(l / C) and z = c / T, the
    gradient w.r.t. z is gather_logprobs_backward_ref's; then dL/dl = dL/dz * (1 - tanh(l / C)^2)
    (1 without a cap), dL/dhidden = dL/dl @ weight, dL/dweight = dL/dl.T @ hidden,
    dL/dbias = sum over rows of dL/dl.
    """
    raw = linear_logits_ref(hidden, weight, bias)                        # (N, V) fp32
    capped = raw if logit_softcap is None else logit_softcap * torch.tanh(raw / logit_softcap)
    grad = gather_logprobs_backward_ref(grad_logprobs, grad_entropy, capped, labels, lse, entropy,
                                        temperature=temperature, ignore_index=ignore_index)
    if logit_softcap is not None:
        grad = grad * (1 - torch.tanh(raw / logit_softcap) ** 2)
    grad_hidden = (grad @ weight.float()).to(hidden.dtype)
    grad_weight = (grad.t() @ hidden.float()).to(weight.dtype)
    grad_bias = None if bias is None else grad.sum(0).to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
