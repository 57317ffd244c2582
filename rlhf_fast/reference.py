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


def kl_penalty_ref(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1",
                   clamp: float | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens, fp32.

    x = logprobs - ref_logprobs, clamped to [-clamp, clamp] first when clamp is given; then
        k1 = x,   abs = |x|,   k2 = x^2 / 2,   k3 = exp(-x) - 1 + x
    k3 is evaluated as expm1(-x) + x in float64: in fp32 the sum cancels to a relative error of about
    1e-7 / |x| near x = 0, where k3 ~ x^2 / 2 (the kernels use a series there instead).
    Differentiable in `logprobs` only (the gradient is 0 where the clamp is active, |x| > clamp);
    `ref_logprobs` is treated as data.
    """
    x = logprobs.float() - ref_logprobs.detach().float()
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    if estimator == "k1":
        return x
    if estimator == "abs":
        return x.abs()
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        x64 = x.double()
        return (torch.expm1(-x64) + x64).float()
    raise ValueError(f"estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_penalty_backward_ref(grad: Tensor, logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1",
                            clamp: float | None = None) -> Tensor:
    """Gradient of kl_penalty_ref w.r.t. logprobs for the upstream gradient `grad`, in logprobs' dtype:
    grad * dk/dx with dk/dx = 1 (k1), sign(x) (abs), x (k2), 1 - exp(-x) (k3), and 0 where |x| > clamp."""
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


def ppo_policy_loss_terms_ref(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                              clip_eps: float = 0.2, clip_eps_high: float | None = None,
                              dual_clip: float | None = None) -> dict[str, Tensor]:
    """Per-token terms of the PPO clipped-ratio objective, (B, T) fp32 each (0 at masked positions):

        d = logprobs - old_logprobs,  r = exp(d),  A = advantages
        l_unclipped = -A * r,   l_clipped = -A * clip(r, 1 - clip_eps, 1 + clip_eps_high)
        loss = max(l_unclipped, l_clipped)                       clipped = l_clipped > l_unclipped
        with dual_clip = c > 1, for A < 0:  loss = min(loss, -A * c)   dual_clipped = A < 0 and loss > -A * c
        grad = d loss / d logprobs = -A * r where neither clip is active, else 0
        k3 = exp(d) - 1 - d  (expm1(d) - d in float64, as in kl_penalty_ref): the k3 estimate of
             KL(old || new), with x = old - new in kl_penalty_ref's k3

    Returns a dict with loss, grad, clipped, dual_clipped (0/1 floats), k3, ratio and valid (bool).
    `loss` is differentiable in `logprobs` through autograd; `grad` is its derivative written out.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    valid, m, (lp, old, adv) = _rl_valid_fp32(mask, logprobs, old_logprobs.detach(), advantages.detach())
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip is not None:
        loss_dual = -adv * dual_clip
        dual_clipped = (adv < 0) & (loss > loss_dual)
        loss = torch.where(adv < 0, torch.minimum(loss, loss_dual), loss)
    grad = torch.where(clipped | dual_clipped, torch.zeros_like(ratio), -adv * ratio).detach()
    d64 = log_ratio.detach().double()
    k3 = (torch.expm1(d64) - d64).float()
    return dict(loss=loss, grad=grad, clipped=clipped.float(), dual_clipped=dual_clipped.float(), k3=k3,
                ratio=ratio.detach(), valid=valid, m=m)


PPO_POLICY_STATS = ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")


def ppo_policy_loss_ref(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_eps: float = 0.2, clip_eps_high: float | None = None,
                        dual_clip: float | None = None, aggregation: str = "token-mean", num_items=None,
                        norm_length: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped-ratio policy loss (per-token terms: ppo_policy_loss_terms_ref), aggregated by
    `aggregation` (rlhf_fast/ops/_aggregation.py), and its statistics over the valid tokens:
    clip_frac, dual_clip_frac, approx_kl (mean k3), ratio_mean (all weighted by the mask), ratio_min,
    ratio_max (over m != 0); every statistic is 0 when no token is valid.
    Returns (loss fp32 scalar, differentiable in logprobs; dict of detached fp32 scalars).
    """
    from rlhf_fast.ops._aggregation import aggregate

    t = ppo_policy_loss_terms_ref(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps,
                                  clip_eps_high=clip_eps_high, dual_clip=dual_clip)
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
