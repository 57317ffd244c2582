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


# ---------------------------------------------------------------------------------------------
# linear (the projections of a transformer's layers)
# ---------------------------------------------------------------------------------------------

def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` in the inputs' dtype: x (M, K), weight (N, K), bias (N,)."""
    out = x @ weight.t()
    return out if bias is None else out + bias


def linear_backward_ref(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of linear_ref w.r.t. x, weight and bias: ``grad @ weight``, ``grad.T @ x`` and the
    column sums of ``grad`` (M, N)."""
    return grad @ weight, grad.t() @ x, grad.sum(0)


# ---------------------------------------------------------------------------------------------
# GAE (generalized advantage estimation)
# ---------------------------------------------------------------------------------------------

GAE_WHITEN_EPS = 1e-8


def _gae_acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gae_whiten_ref(advantages: Tensor, mask: Tensor) -> Tensor:
    """Whitening of the valid advantages: ``(A - mean) / sqrt(var + 1e-8)`` with the mean and the
    UNBIASED variance (n - 1) over every position where ``mask`` is true; the variance is taken as 0
    with fewer than two valid positions (one valid token whitens to 0). Masked positions stay 0.
    Statistics in float64."""
    x = advantages.double()
    n = mask.sum()
    mean = torch.where(mask, x, 0.0).sum() / n.clamp(min=1)
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
    var = torch.where(n >= 2, var, torch.zeros_like(var))
    return torch.where(mask, (x - mean) * torch.rsqrt(var + GAE_WHITEN_EPS), 0.0).to(advantages.dtype)


def _gae_padded_loop(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    acc = _gae_acc_dtype(rewards, values)
    r, v, m = rewards.to(acc), values.to(acc), mask.bool()
    batch, steps = r.shape
    advantages = torch.zeros_like(r)
    next_adv = r.new_zeros(batch)     # A at the next valid position of each row (0 after the last)
    next_value = r.new_zeros(batch)   # V at the next valid position of each row (0 after the last)
    for t in reversed(range(steps)):
        valid = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv, 0.0)
        # a masked position passes the carry through unchanged
        next_adv = torch.where(valid, adv, next_adv)
        next_value = torch.where(valid, v[:, t], next_value)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


def gae_loop_ref(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95,
                 whiten: bool = False, cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GAE the way RL libraries write it, a Python loop over time steps (vectorized over the batch),
    extended to masks with holes: the readable ground truth of ``rlhf_fast.gae``.

    Padded: rewards, values, mask (B, T). Packed: (N,) with ``cu_seqlens`` (S+1,) offsets (turned
    into a padded batch by a Python loop). For valid t, with V' and A' the value and the advantage at
    the next valid position of the same sequence (0 after the last):
        delta_t = r_t + gamma * V' - V_t,   A_t = delta_t + gamma * lam * A',   R_t = A_t + V_t;
    masked positions are skipped (their rewards and values are never used) and get A = R = 0.
    Returns fp32 (advantages, returns); advantages whitened by gae_whiten_ref when ``whiten``.
    """
    if cu_seqlens is not None:
        bounds = [int(b) for b in cu_seqlens]
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        longest = max((e - s for s, e in spans), default=0)
        pad_r = rewards.new_zeros(len(spans), longest)
        pad_v = values.new_zeros(len(spans), longest)
        pad_m = torch.zeros(len(spans), longest, dtype=torch.bool, device=mask.device)
        for i, (s, e) in enumerate(spans):
            pad_r[i, :e - s], pad_v[i, :e - s], pad_m[i, :e - s] = rewards[s:e], values[s:e], mask[s:e].bool()
        adv, ret = gae_loop_ref(pad_r, pad_v, pad_m, gamma=gamma, lam=lam, whiten=whiten)
        flat = lambda x: torch.cat([x[i, :e - s] for i, (s, e) in enumerate(spans)]) if spans else x.new_zeros(0)
        return flat(adv), flat(ret)
    adv, ret = _gae_padded_loop(rewards, values, mask, gamma, lam)
    if whiten:
        adv = gae_whiten_ref(adv, mask.bool())
    return adv.float(), ret.float()


def _reverse_affine_scan(d: Tensor, k: Tensor) -> Tensor:
    """x_t = d_t + k_t * x_{t+1} along the last dim (x = 0 past the end), in log2(L) doubling steps
    (Hillis-Steele): after the step of width s, (d_t, k_t) is the composition of positions
    [t, t + 2s)."""
    steps = d.shape[-1]
    s = 1
    while s < steps:
        d = torch.cat([d[..., :-s] + k[..., :-s] * d[..., s:], d[..., -s:]], dim=-1)
        k = torch.cat([k[..., :-s] * k[..., s:], k[..., -s:]], dim=-1)
        s *= 2
    return d


def gae_ref(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95,
            whiten: bool = False, cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Vectorized GAE (the ``torch`` backend): same contract and results as gae_loop_ref, computed as
    two reverse linear scans in log2(T) doubling steps instead of T Python iterations.

    1. V' (value at the next valid position): y_t = V_t if valid else y_{t+1}, cut at sequence ends;
       V'_t = y_{t+1}.
    2. A: x_t = d_t + k_t x_{t+1} with (d, k) = (delta_t, gamma * lam) at valid positions and (0, 1) at
       masked ones (the carry passes through), k = 0 at the last position of each sequence.
    Packed inputs are scanned as one row with the sequence ends as cuts.
    """
    if rewards.numel() == 0:
        empty = torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
        return empty, empty.clone()
    acc = _gae_acc_dtype(rewards, values)
    m = mask.bool()
    r = torch.where(m, rewards.to(acc), 0.0)  # masked rewards and values are never used, even if NaN
    v = torch.where(m, values.to(acc), 0.0)
    if cu_seqlens is None:
        r, v, m = r.reshape(-1, r.shape[-1]), v.reshape(-1, v.shape[-1]), m.reshape(-1, m.shape[-1])
        last = torch.zeros_like(m)
        last[:, -1:] = True
    else:
        r, v, m = r.view(1, -1), v.view(1, -1), m.view(1, -1)
        last = torch.zeros_like(m)
        ends = cu_seqlens[1:].long()
        ends = ends[ends > cu_seqlens[:-1].long()] - 1      # last position of every non-empty sequence
        last[0, ends] = True
    y = _reverse_affine_scan(v, (~m & ~last).to(acc))
    next_value = torch.where(last, 0.0, torch.nn.functional.pad(y[:, 1:], (0, 1)))
    delta = torch.where(m, r + gamma * next_value - v, 0.0)
    k = torch.where(last, 0.0, torch.where(m, gamma * lam, 1.0)).to(acc)
    adv = torch.where(m, _reverse_affine_scan(delta, k), 0.0)
    ret = torch.where(m, adv + v, 0.0)
    adv, ret = adv.view(rewards.shape), ret.view(rewards.shape)
    if whiten:
        adv = gae_whiten_ref(adv, mask.bool())
    return adv.float(), ret.float()


# ---------------------------------------------------------------------------------------------
# Reward-model ranking loss (pairwise loss = its K = 2 case)
# ---------------------------------------------------------------------------------------------

def _ranking_pairs(rewards: Tensor, num_candidates: Tensor | None, ranks: Tensor | None):
    """valid (P, K): candidates in use; beats (P, K, K): candidate i ranked strictly above j."""
    n_prompts, k = rewards.shape
    pos = torch.arange(k, device=rewards.device)
    valid = pos < (num_candidates.view(-1, 1) if num_candidates is not None else k)
    valid = valid.expand(n_prompts, k)
    key = ranks if ranks is not None else pos.expand(n_prompts, k)
    beats = (key.unsqueeze(2) < key.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    return valid, beats


def _prompt_margin(margin, rewards: Tensor):
    return margin.float().view(-1, 1, 1) if isinstance(margin, Tensor) else float(margin)


def ranking_loss_ref(rewards: Tensor, *, num_candidates: Tensor | None = None, ranks: Tensor | None = None,
                     margin: float | Tensor = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The InstructGPT reward-model loss, vectorized over (P, K, K) pair matrices (the ``torch``
    backend and the eager baseline of the benchmarks).

    rewards (P, K): scores of K answers to each of P prompts, best -> worst unless ``ranks`` (P, K)
    (0 = best; equal ranks tie and form no pair) is given; ``num_candidates`` (P,) marks entries past
    it as padding (never read, even if NaN); ``margin`` a float or a (P,) tensor per prompt.
        loss = mean over prompts with >= 1 ranked pair of mean over its pairs (w above l) of
               softplus(-(r_w - r_l - margin))
    (0 if no prompt has a pair). Returns fp32 (loss (), accuracy () = fraction of pairs with
    r_w > r_l, mean_margin () = mean of r_w - r_l, counts (2,) int64 = (pairs, ranked prompts)).
    Differentiable in ``rewards`` through ordinary autograd.
    """
    valid, beats = _ranking_pairs(rewards, num_candidates, ranks)
    r = torch.where(valid, rewards.float(), 0.0)
    diff = r.unsqueeze(2) - r.unsqueeze(1)                                # (P, K, K): r_i - r_j
    pair_loss = torch.nn.functional.softplus(-(diff - _prompt_margin(margin, rewards)))
    pair_loss = torch.where(beats, pair_loss, 0.0)
    pairs = beats.sum((1, 2))                                             # (P,)
    ranked = (pairs > 0).sum()
    n_pairs = pairs.sum()
    loss = (pair_loss.sum((1, 2)) / pairs.clamp(min=1)).sum() / ranked.clamp(min=1)
    accuracy = (beats & (diff > 0)).sum() / n_pairs.clamp(min=1)
    mean_margin = torch.where(beats, diff, 0.0).sum() / n_pairs.clamp(min=1)
    return loss, accuracy.float().detach(), mean_margin.detach(), torch.stack([n_pairs, ranked]).long()


def ranking_loss_backward_ref(grad_loss: Tensor, rewards: Tensor, num_candidates: Tensor | None,
                              ranks: Tensor | None, margin: float | Tensor, ranked_prompts: int | Tensor) -> Tensor:
    """Gradient of ranking_loss_ref's loss w.r.t. rewards, (P, K) in their dtype:
        d/dr_w += -sigmoid(margin - (r_w - r_l)) * g / (pairs_p * ranked_prompts),  d/dr_l -= the same.
    (Autograd of ranking_loss_ref gives the same; tests check the two agree.)"""
    valid, beats = _ranking_pairs(rewards, num_candidates, ranks)
    r = torch.where(valid, rewards.float(), 0.0)
    diff = r.unsqueeze(2) - r.unsqueeze(1)
    pairs = beats.sum((1, 2)).clamp(min=1).view(-1, 1, 1)
    ranked = torch.as_tensor(ranked_prompts, device=rewards.device).clamp(min=1)
    w = -torch.sigmoid(_prompt_margin(margin, rewards) - diff) * (grad_loss.float() / ranked) / pairs
    w = torch.where(beats, w, 0.0)                                        # (P, K, K): d/dr_i of pair (i, j)
    return (w.sum(2) - w.sum(1)).to(rewards.dtype)


def ranking_loss_loop_ref(rewards: Tensor, *, num_candidates: Tensor | None = None, ranks: Tensor | None = None,
                          margin: float | Tensor = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ranking_loss_ref one pair at a time in Python: the readable ground truth (and the per-pair
    baseline of the benchmarks). Same arguments and results; differentiable through autograd."""
    n_prompts, k = rewards.shape
    prompt_losses = []
    n_pairs = n_correct = 0
    diff_sum = 0.0
    for p in range(n_prompts):
        n = k if num_candidates is None else int(num_candidates[p])
        m = float(margin[p]) if isinstance(margin, Tensor) else float(margin)
        terms = []
        for i in range(n):
            for j in range(i + 1, n):
                key_i, key_j = (int(ranks[p, i]), int(ranks[p, j])) if ranks is not None else (i, j)
                if key_i == key_j:
                    continue  # a tie: no pair
                w, l = (i, j) if key_i < key_j else (j, i)
                diff = rewards[p, w].float() - rewards[p, l].float()
                terms.append(torch.nn.functional.softplus(-(diff - m)))  # -log sigmoid(r_w - r_l - m)
                n_pairs += 1
                n_correct += int(diff.item() > 0)
                diff_sum += diff.item()
        if terms:
            prompt_losses.append(torch.stack(terms).mean())
    # no ranked pair anywhere: 0, still attached to rewards (with a zero gradient)
    loss = torch.stack(prompt_losses).mean() if prompt_losses else rewards.float()[:0].sum()
    accuracy = torch.tensor(n_correct / max(n_pairs, 1), dtype=torch.float32)
    mean_margin = torch.tensor(diff_sum / max(n_pairs, 1), dtype=torch.float32)
    return loss, accuracy, mean_margin, torch.tensor([n_pairs, len(prompt_losses)])


# ---------------------------------------------------------------------------------------------
# RL losses: kl_penalty, ppo_policy_loss, value_loss. Inputs (B, T) in any float dtype, computed in
# fp32; masks are bool or float (m != 0 marks a valid token). Positions with mask == 0 are replaced
# by neutral values before any math, so whatever they hold (padding, -inf, NaN) reaches neither the
# loss, nor the statistics, nor the gradient. Aggregation modes: rlhf_fast/ops/_aggregation.py.
# ---------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "abs", "k2", "k3")


def _kl_cap_value(cap, estimator: str) -> float | None:
    """kl_penalty's ``cap``: ``"default"`` is 10 for k3 and no cap for the others (verl's convention)."""
    if isinstance(cap, str):
        from rlhf_fast.ops._numerics import resolve_kl_cap

        return resolve_kl_cap("cap", cap, estimator)
    return cap


def kl_penalty_ref(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1",
                   clamp: float | None = None, cap: float | str | None = "default") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens, fp32.

    x = logprobs - ref_logprobs, clamped to [-clamp, clamp] first when clamp is given; then
        k1 = x,   abs = |x|,   k2 = x^2 / 2,   k3 = exp(-x) - 1 + x
    and the value clamped to [-cap, cap] when a cap is given (``"default"``: 10 for k3, none for the
    others). k3 is evaluated as expm1(-x) + x in float64: in fp32 the sum cancels to a relative error
    of about 1e-7 / |x| near x = 0, where k3 ~ x^2 / 2 (the kernels use a series there instead).
    Differentiable in `logprobs` only (the gradient is 0 where the clamp is active, |x| > clamp, and
    where the cap is, |k| > cap); `ref_logprobs` is treated as data.
    """
    cap = _kl_cap_value(cap, estimator)
    x = logprobs.float() - ref_logprobs.detach().float()
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    if estimator == "k1":
        k = x
    elif estimator == "abs":
        k = x.abs()
    elif estimator == "k2":
        k = 0.5 * x * x
    elif estimator == "k3":
        x64 = x.double()
        k = (torch.expm1(-x64) + x64).float()
    else:
        raise ValueError(f"estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")
    if cap is not None:
        # torch.where, not clamp: k3 of a very negative x is inf, whose gradient through clamp is NaN
        over = k.abs() > cap
        k = torch.where(over, torch.full_like(k, cap) * torch.sign(k).detach(), k)
    return k


def kl_penalty_backward_ref(grad: Tensor, logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1",
                            clamp: float | None = None, cap: float | str | None = "default") -> Tensor:
    """Gradient of kl_penalty_ref w.r.t. logprobs for the upstream gradient `grad`, in logprobs' dtype:
    grad * dk/dx with dk/dx = 1 (k1), sign(x) (abs), x (k2), 1 - exp(-x) (k3), and 0 where |x| > clamp
    or |k| > cap."""
    cap = _kl_cap_value(cap, estimator)
    x = logprobs.float() - ref_logprobs.float()
    if clamp is not None:
        active = x.abs() > clamp
        x = x.clamp(-clamp, clamp)
    if estimator == "k1":
        d = torch.ones_like(x)
    elif estimator == "abs":
        d = torch.sign(x)
    elif estimator == "k2":
        d = x
    else:
        d = -torch.expm1(-x)
    if clamp is not None:
        d = torch.where(active, torch.zeros_like(d), d)
    if cap is not None:
        k = kl_penalty_ref(logprobs.float().detach(), ref_logprobs, estimator=estimator, clamp=clamp, cap=None)
        d = torch.where(k.abs() > cap, torch.zeros_like(d), d)
    return (grad.float() * d).to(logprobs.dtype)


def _rl_valid_fp32(mask: Tensor, *tensors: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(valid (B, T) bool, m (B, T) fp32, the tensors in fp32 with 0 at invalid positions)."""
    valid = mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    return valid, mask.float(), [torch.where(valid, t.float(), zero) for t in tensors]


def _rl_masked_mean(x: Tensor, m: Tensor, valid: Tensor) -> Tensor:
    """sum(x * m) / sum(m) over valid positions, 0 when there are none."""
    n = m.sum()
    total = torch.where(valid, x * m, torch.zeros_like(x)).sum()
    return torch.where(n != 0, total / torch.where(n != 0, n, torch.ones_like(n)), torch.zeros_like(n))


def _rl_masked_extreme(x: Tensor, valid: Tensor, *, largest: bool) -> Tensor:
    """max (largest) or min of x over valid positions, 0 when there are none."""
    fill = float("-inf") if largest else float("inf")
    flat = torch.cat([torch.where(valid, x, fill).reshape(-1), x.new_full((1,), fill)])
    extreme = flat.amax() if largest else flat.amin()
    return torch.where(valid.any(), extreme, torch.zeros_like(extreme))


POLICY_OBJECTIVES = ("clip", "cispo")
RATIO_LEVELS = ("token", "sequence")


def sequence_log_ratio_ref(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """(B,) the mask-weighted mean over each sequence of ``logprobs - old_logprobs`` (0 for a row without valid
    tokens): the log of GSPO's sequence-level importance ratio ``(pi / pi_old)^(1 / |y|)``. Differentiable in
    ``logprobs``: each valid token of row b receives ``m_bt / sum_t m_bt`` of the row's gradient."""
    valid, m, (lp, old) = _rl_valid_fp32(mask, logprobs, old_logprobs.detach())
    return (m * (lp - old)).sum(1) / m.sum(1).clamp_min(torch.finfo(torch.float32).tiny)


def ppo_policy_loss_terms_ref(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                              clip_eps: float = 0.2, clip_eps_high: float | None = None,
                              dual_clip: float | None = None, log_ratio_clamp: float | None = 20.0,
                              objective: str = "clip", ratio_level: str = "token") -> dict[str, Tensor]:
    """Per-token terms of the PPO clipped-ratio objective, (B, T) fp32 each (0 at masked positions):

        d = clamp(logprobs - old_logprobs, -c, c)  (c = log_ratio_clamp; no clamp when None)
        r = exp(d),  A = advantages
        l_unclipped = -A * r,   l_clipped = -A * clip(r, 1 - clip_eps, 1 + clip_eps_high)
        loss = max(l_unclipped, l_clipped)                       clipped = l_clipped > l_unclipped
        with dual_clip = c > 1, for A < 0:  loss = min(loss, -A * c)   dual_clipped = A < 0 and loss > -A * c
        grad = d loss / d logprobs = -A * r where neither clip nor the log-ratio clamp is active, else 0
        k3 = exp(d) - 1 - d  (of the clamped d; expm1(d) - d in float64, as in kl_penalty_ref): the k3 estimate of
             KL(old || new), with x = old - new in kl_penalty_ref's k3

    objective="cispo" (MiniMax-M1's CISPO, TRL's loss_type="cispo"): a REINFORCE term weighted by the ratio capped
    above and detached, ``w = min(r, 1 + clip_eps_high)``, ``loss = -w * A * logprobs``, ``grad = -w * A``
    (everywhere: the weight is data, so neither the cap nor the log-ratio clamp stops the gradient),
    ``clipped = r > 1 + clip_eps_high``; clip_eps and dual_clip are unused.

    ratio_level="sequence" (GSPO): ``d`` of every token of row b is the row's sequence_log_ratio_ref (then
    clamped); the gradient reaches each token through that mean. Not with objective="cispo".

    Returns a dict with loss, grad, clipped, dual_clipped (0/1 floats), k3, ratio and valid (bool).
    `loss` is differentiable in `logprobs` through autograd; `grad` is its derivative written out (w.r.t. d for
    ratio_level="sequence": the derivative w.r.t. logprobs is then its row mean, which autograd takes).
    """
    if objective not in POLICY_OBJECTIVES:
        raise ValueError(f"objective: expected one of {POLICY_OBJECTIVES}, got {objective!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level: expected one of {RATIO_LEVELS}, got {ratio_level!r}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    valid, m, (lp, old, adv) = _rl_valid_fp32(mask, logprobs, old_logprobs.detach(), advantages.detach())
    log_ratio = lp - old
    if ratio_level == "sequence":
        if objective == "cispo":
            raise ValueError("ratio_level: 'sequence' is not defined for objective='cispo' (its loss is per token)")
        seq = sequence_log_ratio_ref(logprobs, old_logprobs, mask)
        log_ratio = torch.where(valid, seq[:, None].expand_as(lp), torch.zeros_like(lp))
    clamped = torch.zeros_like(valid)
    if log_ratio_clamp is not None:
        clamped = log_ratio.detach().abs() > log_ratio_clamp
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)  # gradient 0 outside the range
    ratio = torch.exp(log_ratio)
    d64 = log_ratio.detach().double()
    k3 = (torch.expm1(d64) - d64).float()
    if objective == "cispo":
        w = ratio.detach().clamp(max=1.0 + eps_high)
        grad = (-adv * w).detach()
        return dict(loss=grad * lp, grad=grad, clipped=(ratio.detach() > 1.0 + eps_high).float(),
                    dual_clipped=torch.zeros_like(lp), k3=k3, ratio=ratio.detach(), valid=valid, m=m)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip is not None:
        loss_dual = -adv * dual_clip
        dual_clipped = (adv < 0) & (loss > loss_dual)
        loss = torch.where(adv < 0, torch.minimum(loss, loss_dual), loss)
    grad = torch.where(clipped | dual_clipped | clamped, torch.zeros_like(ratio), -adv * ratio).detach()
    return dict(loss=loss, grad=grad, clipped=clipped.float(), dual_clipped=dual_clipped.float(), k3=k3,
                ratio=ratio.detach(), valid=valid, m=m)


PPO_POLICY_STATS = ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")


def ppo_policy_loss_ref(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_eps: float = 0.2, clip_eps_high: float | None = None,
                        dual_clip: float | None = None, aggregation: str = "token-mean", num_items=None,
                        norm_length: int | None = None, log_ratio_clamp: float | None = 20.0,
                        objective: str = "clip", ratio_level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped-ratio policy loss (per-token terms: ppo_policy_loss_terms_ref), aggregated by
    `aggregation` (rlhf_fast/ops/_aggregation.py), and its statistics over the valid tokens:
    clip_frac, dual_clip_frac, approx_kl (mean k3), ratio_mean (all weighted by the mask), ratio_min,
    ratio_max (over m != 0); every statistic is 0 when no token is valid.
    Returns (loss fp32 scalar, differentiable in logprobs; dict of detached fp32 scalars).
    """
    from rlhf_fast.ops._aggregation import aggregate

    t = ppo_policy_loss_terms_ref(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps,
                                  clip_eps_high=clip_eps_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp,
                                  objective=objective, ratio_level=ratio_level)
    return aggregate(t["loss"], mask, aggregation, num_items, norm_length), ppo_policy_stats_ref(t)


def ppo_policy_stats_ref(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """The statistics of ppo_policy_loss_ref from its per-token terms (fp32 scalars, 0 without valid tokens)."""
    with torch.no_grad():
        valid, m, ratio = terms["valid"], terms["m"], terms["ratio"]
        return {
            "clip_frac": _rl_masked_mean(terms["clipped"], m, valid),
            "dual_clip_frac": _rl_masked_mean(terms["dual_clipped"], m, valid),
            "approx_kl": _rl_masked_mean(terms["k3"], m, valid),
            "ratio_mean": _rl_masked_mean(ratio, m, valid),
            "ratio_min": _rl_masked_extreme(ratio, valid, largest=False),
            "ratio_max": _rl_masked_extreme(ratio, valid, largest=True),
        }


def value_loss_terms_ref(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
                         clip_eps: float = 0.2) -> dict[str, Tensor]:
    """Per-token terms of the clipped value loss, (B, T) fp32 each (0 at masked positions):

        v_clipped = clip(v, v_old - clip_eps, v_old + clip_eps)
        loss = 0.5 * max((v - R)^2, (v_clipped - R)^2)        clipped = (v_clipped - R)^2 > (v - R)^2
        grad = d loss / d v = v - R where not clipped, else 0 (v is then outside the clip range)

    Returns a dict with loss (differentiable in `values`), grad, clipped (0/1), values, returns, m, valid.
    """
    valid, m, (v, v_old, ret) = _rl_valid_fp32(mask, values, old_values.detach(), returns.detach())
    v_clipped = torch.clamp(v, v_old - clip_eps, v_old + clip_eps)
    loss_unclipped = (v - ret) ** 2
    loss_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    grad = torch.where(clipped, torch.zeros_like(v), v - ret).detach()
    return dict(loss=loss, grad=grad, clipped=clipped.float(), values=v.detach(), returns=ret, m=m, valid=valid)


VALUE_STATS = ("clip_frac", "explained_variance")


def value_loss_ref(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_eps: float = 0.2,
                   aggregation: str = "token-mean", num_items=None, norm_length: int | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (per-token terms: value_loss_terms_ref) aggregated by `aggregation`, and its
    statistics over the valid tokens, weighted by the mask:
        clip_frac           fraction of tokens where the clipped term is the larger
        explained_variance  1 - Var[R - v] / Var[R] (population variances), 0 when Var[R] == 0
    Returns (loss fp32 scalar, differentiable in values; dict of detached fp32 scalars).
    """
    from rlhf_fast.ops._aggregation import aggregate

    t = value_loss_terms_ref(values, old_values, returns, mask, clip_eps=clip_eps)
    return aggregate(t["loss"], mask, aggregation, num_items, norm_length), value_stats_ref(t)


def value_stats_ref(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """The statistics of value_loss_ref from its per-token terms (fp32 scalars, 0 without valid tokens)."""
    with torch.no_grad():
        valid, m, v, ret = terms["valid"], terms["m"], terms["values"], terms["returns"]
        err = ret - v
        var_ret = _rl_masked_mean((ret - _rl_masked_mean(ret, m, valid)) ** 2, m, valid)
        var_err = _rl_masked_mean((err - _rl_masked_mean(err, m, valid)) ** 2, m, valid)
        safe = torch.where(var_ret > 0, var_ret, torch.ones_like(var_ret))
        ev = torch.where(var_ret > 0, 1.0 - var_err / safe, torch.zeros_like(var_ret))
        return {"clip_frac": _rl_masked_mean(terms["clipped"], m, valid), "explained_variance": ev}


# ---------------------------------------------------------------------------------------------
# Attention (rlhf_fast/ops/attention/): softmax(q k^T * scale + mask) v, one masked-softmax core
# ---------------------------------------------------------------------------------------------

def _masked_attention_ref(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float):
    """q (..., Hq, T, D), k/v (..., Hkv, S, D), allowed: bool broadcastable to (..., Hq, T, S).

    Returns (out (..., Hq, T, D) in q.dtype, lse (..., Hq, T) fp32). A query row with no allowed key
    gets out 0 and lse -inf, and no gradient (never NaN). Math in fp32 (float64 stays float64).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if k.shape[-2] == 0:  # no key at all: every row is empty
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        return q * 0, lse.float() if acc == torch.float32 else lse
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3).to(acc)  # GQA: query head h reads key/value head h // group
    v = v.repeat_interleave(group, dim=-3).to(acc)
    s = (q.to(acc) @ k.transpose(-1, -2)) * scale  # (..., Hq, T, S)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an empty row: exp(-inf - 0) = 0
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    p = e / torch.where(has_key, denom, torch.ones_like(denom))
    out = (p @ v).to(q.dtype)
    lse = torch.where(has_key, m + torch.log(torch.where(has_key, denom, torch.ones_like(denom))),
                      torch.full_like(denom, float("-inf"))).squeeze(-1)
    return out, lse.float() if acc == torch.float32 else lse


def causal_mask_ref(t: int, s: int, device=None) -> Tensor:
    """(T, S) bool: query i sees key j iff j <= i + (S - T). The query block is aligned to the END of the
    keys (bottom-right, as flash-attn and KV-cache decoding): the last query sees every key; with T > S
    the first T - S queries see none."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return j <= i + (s - t)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, attention_mask: Tensor | None = None,
                  scale: float | None = None, return_lse: bool = False):
    """Reference of rlhf_fast.attention.

    q (B, Hq, T, D), k/v (B, Hkv, S, D) with Hq % Hkv == 0; attention_mask (B, S) bool or 0/1 marks the
    keys that exist (False/0: padding). out[b, h, i] = sum_j softmax_j(q_i . k_j * scale) v_j over the keys
    j allowed by causal_mask_ref (if causal) and attention_mask; rows with no allowed key give 0.
    Returns out (B, Hq, T, D) in q.dtype, and lse (B, Hq, T) fp32 (-inf for empty rows) if return_lse.
    """
    t, s = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = torch.ones(t, s, dtype=torch.bool, device=q.device)
    if causal:
        allowed = causal_mask_ref(t, s, q.device)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    out, lse = _masked_attention_ref(q, k, v, allowed, scale)
    return (out, lse) if return_lse else out


def varlen_attention_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                         causal: bool = True, scale: float | None = None, return_lse: bool = False):
    """Reference of rlhf_fast.varlen_attention: packed q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence i
    is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1] of k/v, attended
    exactly as attention_ref attends one (unpadded) batch element. Returns out (total_q, Hq, D) and, if
    return_lse, lse (Hq, total_q) fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)  # (Hq, Lq, D)
        ki, vi = k[ck[i]:ck[i + 1]].transpose(0, 1), v[ck[i]:ck[i + 1]].transpose(0, 1)
        o, lse = attention_ref(qi[None], ki[None], vi[None], causal=causal, scale=scale, return_lse=True)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return (out, lse) if return_lse else out


def shared_prefix_mask_ref(prompt_len: int, answer_lens, device=None) -> Tensor:
    """(L, L) bool over one group's tokens [prompt, answer_1, ..., answer_K], L = prompt_len + sum(answer_lens):
    prompt tokens attend causally inside the prompt; a token of answer j attends to the whole prompt and
    causally to the tokens of answer j before it (and itself), never to another answer."""
    # segment of each token: 0 for the prompt, j + 1 for answer j; position inside its segment
    seg = torch.cat([torch.zeros(prompt_len, dtype=torch.long)] +
                    [torch.full((n,), j + 1, dtype=torch.long) for j, n in enumerate(answer_lens)])
    idx = torch.arange(seg.numel())
    same_segment_causal = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    answer_sees_prompt = (seg[:, None] > 0) & (seg[None, :] == 0)
    return (same_segment_causal | answer_sees_prompt).to(device)


def shared_prefix_attention_ref(q: Tensor, k: Tensor, v: Tensor, prompt_lens, answer_lens, *,
                                scale: float | None = None, return_lse: bool = False):
    """Reference of rlhf_fast.shared_prefix_attention: packed q (total, Hq, D), k/v (total, Hkv, D) holding G
    groups one after the other, group g = [prompt (prompt_lens[g] tokens), answer_1, ..., answer_K]
    (answer_lens[g] = [len_1, ..., len_K]), attended with shared_prefix_mask_ref inside each group.
    Returns out (total, Hq, D) and, if return_lse, lse (Hq, total) fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses, start = [], [], 0
    for p, answers in zip(prompt_lens, answer_lens, strict=True):
        n = p + sum(answers)
        allowed = shared_prefix_mask_ref(p, answers, q.device)
        qg, kg, vg = (x[start:start + n].transpose(0, 1) for x in (q, k, v))  # (H, n, D)
        o, lse = _masked_attention_ref(qg, kg, vg, allowed, scale)
        outs.append(o.transpose(0, 1))
        lses.append(lse)
        start += n
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return (out, lse) if return_lse else out


def masked_attention_backward_ref(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float):
    """Gradients of _masked_attention_ref (the torch backend's backward): with P = softmax over the allowed
    keys (0 on rows with none), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    dQ = scale * dS K, dK = scale * dS^T Q; the query heads of a GQA group are summed into their kv head.
    Returns (dq, dk, dv) in the dtypes of q, k, v."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if k.shape[-2] == 0 or q.shape[-2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    hq, hkv = q.shape[-3], k.shape[-3]
    group = hq // hkv
    qf, do = q.to(acc), dout.to(acc)
    kf = k.repeat_interleave(group, dim=-3).to(acc)
    vf = v.repeat_interleave(group, dim=-3).to(acc)
    s = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = p @ vf
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    ds = p * (dp - (do * out).sum(dim=-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale

    def fold(x):  # (..., Hq, S, D) -> (..., Hkv, S, D): sum the query heads sharing a kv head
        return x.unflatten(-3, (hkv, group)).sum(dim=-3)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# group_advantages: GRPO / Dr. GRPO / RLOO / REINFORCE++ advantages from one score per answer
# ---------------------------------------------------------------------------------------------

ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ROLLOUT_IS_STATS = ("weight_mean", "clipped_frac", "log_diff_mean", "log_diff_max")


def rollout_importance_weights_ref(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *,
                                   mode: str = "sequence_mask", clip_max: float = 3.0,
                                   clip_min: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token importance weights that correct for rollouts sampled by another engine (TRL's
    vllm_importance_sampling_correction, verl's rollout_is), in float64 then fp32 (B, T):

        delta = old_logprobs - sampler_logprobs at valid tokens, 0 where the mask is 0 or delta is NaN
        token_*:    rho_t = exp(delta_t)             sequence_*: rho_t = exp(sum_t' delta_t') for every t of the row
        *_truncate: w = clamp(rho, clip_min, clip_max)
        *_mask:     w = rho where clip_min <= rho <= clip_max, else 0
        w = 0 at masked positions.

    Statistics over valid tokens (mask-weighted): weight_mean, clipped_frac (tokens whose rho was truncated or
    masked), log_diff_mean / log_diff_max (mean and max of |delta_t|); all 0 without a valid token.
    """
    valid = mask != 0
    m = mask.double()
    delta = torch.where(valid, old_logprobs.double() - sampler_logprobs.double(), torch.zeros((), dtype=torch.float64))
    delta = torch.nan_to_num(delta, nan=0.0)
    rho = torch.exp(delta) if mode.startswith("token") else torch.exp(delta.sum(1, keepdim=True)).expand_as(delta)
    lo = 0.0 if clip_min is None else clip_min
    out = (rho < lo) | (rho > clip_max)
    w = rho.clamp(lo, clip_max) if mode.endswith("truncate") else torch.where(out, torch.zeros_like(rho), rho)
    w = torch.where(valid, w, torch.zeros_like(w))
    n = m.sum()
    mean = lambda x: (x * m).sum() / n if n > 0 else torch.zeros((), dtype=torch.float64)
    absd = torch.where(valid, delta.abs(), torch.zeros_like(delta))
    stats = {"weight_mean": mean(w), "clipped_frac": mean((out & valid).double()), "log_diff_mean": mean(absd),
             "log_diff_max": absd.max() if absd.numel() else torch.zeros((), dtype=torch.float64)}
    return w.float(), {k: v.float() for k, v in stats.items()}


ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
ADVANTAGE_SCALES = ("group", "batch", "none")
# The scale each mode takes when none is given, and the scales it accepts.
ADVANTAGE_DEFAULT_SCALE = {"grpo": "group", "dr_grpo": "none", "rloo": "none", "reinforce_pp": "batch",
                           "reinforce_pp_baseline": "batch"}
ADVANTAGE_ALLOWED_SCALES = {"grpo": ("group", "batch", "none"), "dr_grpo": ("none",), "rloo": ("none", "batch"),
                            "reinforce_pp": ("batch",), "reinforce_pp_baseline": ("batch",)}


def _batch_stats(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, unbiased std (0 below two values), constant: fewer than two values or max == min) of the valid
    entries of x (float64)."""
    n = valid.sum()
    mean = torch.where(valid, x, 0.0).sum() / n.clamp(min=1)
    var = torch.where(valid, (x - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
    std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))
    hi = torch.where(valid, x, float("-inf")).max() if x.numel() else x.new_zeros(())
    lo = torch.where(valid, x, float("inf")).min() if x.numel() else x.new_zeros(())
    return mean, std, (n < 2) | (hi == lo)


def group_advantages_ref(scores: Tensor, *, mode: str = "grpo", scale: str | None = None, mask: Tensor | None = None,
                         group_ids: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages from one score per answer, fp32, shaped like ``scores``.

    ``scores`` (P, K): K answers to each of P prompts; or (N,) flat with ``group_ids`` (N,) (equal ids = one
    group). An answer is valid where ``mask`` is true (default all) and its score is finite; invalid answers
    get 0 and are left out of every statistic. Per group g with n valid answers, mean m_g and unbiased
    (Bessel, n - 1) std s_g; over the batch (all valid answers) mean m_B and unbiased std s_B:

        grpo                   c = r - m_g      scale group: c / (s_g + eps); batch: c / (s_B(r) + eps)
        dr_grpo                c = r - m_g      (no scale)
        rloo                   c = n / (n - 1) * (r - m_g) = r - mean of the other n - 1 answers
        reinforce_pp           c = r            scale batch: (c - m_B(c)) / (s_B(c) + eps)
        reinforce_pp_baseline  c = r - m_g      scale batch: (c - m_B(c)) / (s_B(c) + eps)
        rloo, scale batch      (c - m_B(c)) / (s_B(c) + eps)
        scale none             c

    A group with fewer than two valid answers or whose valid answers all score the same gives c = 0
    (all modes but reinforce_pp, which has no groups); a batch whose values are all equal whitens to 0.
    Statistics in float64 (finite for any finite fp32 score).
    """
    scale = ADVANTAGE_DEFAULT_SCALE[mode] if scale is None else scale
    r = scores.detach().double().reshape(-1)
    valid = torch.isfinite(r)
    if mask is not None:
        valid = valid & (mask.reshape(-1) != 0)
    r = torch.where(valid, r, 0.0)
    if r.numel() == 0:
        return r.float().reshape(scores.shape)
    if group_ids is None:  # (P, K): one group per row, reductions along the rows
        rows, keep = r.view(-1, scores.shape[-1]), valid.view(-1, scores.shape[-1])
        n = keep.sum(dim=1, keepdim=True).double()
        mean = rows.sum(dim=1, keepdim=True) / n.clamp(min=1)
        dev = torch.where(keep, rows - mean, 0.0)
        std = ((dev * dev).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        hi = torch.where(keep, rows, float("-inf")).amax(dim=1, keepdim=True)
        lo = torch.where(keep, rows, float("inf")).amin(dim=1, keepdim=True)
        flat = lambda x: x.expand_as(rows).reshape(-1)
        n, std, constant, dev = flat(n), flat(std), flat((n < 2) | (hi == lo)), dev.reshape(-1)
    else:  # flat answers: segment sums over the groups, numbered 0 .. G-1 in order of their ids
        _, index = torch.unique(group_ids.reshape(-1), return_inverse=True)
        groups = int(index.max()) + 1
        zeros = lambda: r.new_zeros(groups)
        n = zeros().index_add_(0, index, valid.double())
        mean = zeros().index_add_(0, index, r) / n.clamp(min=1)
        dev = torch.where(valid, r - mean[index], 0.0)
        std = (zeros().index_add_(0, index, dev * dev) / (n - 1).clamp(min=1)).sqrt()
        hi = zeros().fill_(float("-inf")).scatter_reduce_(0, index, torch.where(valid, r, float("-inf")), "amax")
        lo = zeros().fill_(float("inf")).scatter_reduce_(0, index, torch.where(valid, r, float("inf")), "amin")
        n, std, constant = n[index], std[index], ((n < 2) | (hi == lo))[index]

    if mode == "reinforce_pp":
        c = r
    elif mode == "rloo":
        c = dev * n / (n - 1).clamp(min=1)
    else:
        c = dev
    if mode != "reinforce_pp":
        c = torch.where(constant, 0.0, c)
    c = torch.where(valid, c, 0.0)
    # a zero divisor (eps = 0) only meets zero numerators (constant groups / batches): 0, never 0 / 0
    safe = lambda d: torch.where(d > 0, d, torch.ones_like(d))
    if scale == "group":
        c = c / safe(std + eps)
    elif scale == "batch" and mode == "grpo":
        _, std_b, _ = _batch_stats(r, valid)
        c = c / safe(std_b + eps)
    elif scale == "batch":
        mean_b, std_b, constant_b = _batch_stats(c, valid)
        c = torch.where(constant_b, 0.0, (c - mean_b) / safe(std_b + eps))
    c = torch.where(valid, c, 0.0)
    return c.float().reshape(scores.shape)


# ---------------------------------------------------------------------------------------------
# dpo_loss: the DPO family of pairwise losses on sequence log-probs (TRL's DPOTrainer formulas)
# ---------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")


def dpo_logits_ref(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                   ref_rejected_logps: Tensor, *, loss_type: str = "sigmoid", chosen_lengths: Tensor | None = None,
                   rejected_lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(delta (P,), chosen log-ratio (P,), rejected log-ratio (P,)) in fp32: log-ratios ``pi - ref``; for
    "ipo" and "sigmoid_norm" with lengths, each log-ratio is divided by its length (clamped to >= 1) before
    the difference. Gradients flow to the policy log-probs only."""
    lc = policy_chosen_logps.float() - ref_chosen_logps.detach().float()
    lr = policy_rejected_logps.float() - ref_rejected_logps.detach().float()
    sc, sr = lc, lr
    if loss_type in ("ipo", "sigmoid_norm") and chosen_lengths is not None:
        sc = lc / chosen_lengths.float().clamp(min=1.0)
        sr = lr / rejected_lengths.float().clamp(min=1.0)
    return sc - sr, lc, lr


def dpo_loss_ref(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, chosen_lengths: Tensor | None = None,
                 rejected_lengths: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-family loss over P preference pairs, fp32, differentiable w.r.t. the policy log-probs.

    With ``d`` the delta of :func:`dpo_logits_ref` and ``ls`` the label smoothing::

        sigmoid       -(1 - ls) log sigmoid(beta d) - ls log sigmoid(-beta d)          (cDPO when ls > 0)
        robust        (-(1 - ls) log sigmoid(beta d) + ls log sigmoid(-beta d)) / (1 - 2 ls)
        hinge         relu(1 - beta d)
        ipo           (d - 1 / (2 beta))^2                       (d per token with lengths)
        sigmoid_norm  -log sigmoid(beta d)                       (d per token: lengths required)

    loss = mean over pairs (0 for P = 0). Stats (no gradient): chosen/rejected rewards ``beta * log-ratio``
    (P,), reward accuracy ``mean(chosen > rejected)`` and reward margin ``mean(chosen - rejected)``.
    """
    import torch.nn.functional as F

    d, lc, lr = dpo_logits_ref(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               loss_type=loss_type, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    ls = label_smoothing
    if loss_type == "sigmoid":
        per_pair = -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d)
    elif loss_type == "robust":
        per_pair = (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        per_pair = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "sigmoid_norm":
        per_pair = -F.logsigmoid(beta * d)
    else:
        raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    loss = per_pair.sum() / max(per_pair.numel(), 1)
    with torch.no_grad():
        chosen, rejected = beta * lc.detach(), beta * lr.detach()
        p = max(chosen.numel(), 1)
        stats = dict(chosen_rewards=chosen, rejected_rewards=rejected,
                     reward_accuracy=(chosen > rejected).float().sum() / p,
                     reward_margin=(chosen - rejected).sum() / p)
    return loss, stats


def dpo_loss_dlogits_ref(delta: Tensor, *, beta: float, loss_type: str, label_smoothing: float = 0.0) -> Tensor:
    """d(per-pair loss)/d(delta) of dpo_loss_ref, fp32 (hinge: 0 where 1 - beta d <= 0, as torch.relu)."""
    ls = label_smoothing
    x = beta * delta.float()
    if loss_type == "sigmoid":
        return beta * (-(1 - ls) * torch.sigmoid(-x) + ls * torch.sigmoid(x))
    if loss_type == "robust":
        return beta * (-(1 - ls) * torch.sigmoid(-x) - ls * torch.sigmoid(x)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.where(1 - x > 0, torch.full_like(x, -beta), torch.zeros_like(x))
    if loss_type == "ipo":
        return 2 * (delta.float() - 1 / (2 * beta))
    if loss_type == "sigmoid_norm":
        return -beta * torch.sigmoid(-x)
    raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
