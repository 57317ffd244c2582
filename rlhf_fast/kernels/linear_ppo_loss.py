"""linear_ppo_loss on the Triton kernels of linear_logprobs: the PPO-ptx loss of a batch and its
gradients straight from the lm_head, never materializing the (N, V) logits.

Shapes: rows (R, H) -- policy rows [0, n_policy) then ptx rows --, weight (V, H), bias (V,) or None,
all fp32 / bf16 / fp16 and contiguous; labels (R,) int64 (range-checked by the caller); row_weight,
old, adv (R,) fp32 and ref (R,) fp32 or None. Codes and sums as rlhf_fast/ops/linear_ppo_loss.py.

Flow, per call:
  1. linear_logprobs_fwd (rlhf_fast/kernels/linear_logprobs.py): log-prob, entropy and lse of every kept row
     (label kept and weight != 0), one fused GEMM + online-softmax pass over the vocabulary;
  2. the per-token loss terms, g_lp = dL/dlogprob and g_h = dL/dentropy, and the 13 statistics sums
     (float64), in PyTorch element-wise ops over R values -- the formulas of
     csrc/include/rlhf_fast/ppo_losses_math.h (policy_token, kl_token, the k3 series near 0), as
     linear_ppo::row_step applies them in the CPU / CUDA backends. No host sync;
  3. with compute_grad, linear_logprobs_bwd with those per-token gradients: recompute the logits,
     dL/dlogits in registers, grad_hidden / grad_weight / grad_bias.

Cost: 4 GEMM passes over the lm_head (1 forward + 3 backward, the backward recomputing the logits),
not the 3 of the CPU / CUDA backends, which keep a row block's logits in memory between the fold and
the gradient (csrc/include/rlhf_fast/linear_ppo_loss_tiled.h). At N = 8192, H = 4096, V = 128256 bf16
on an H100 that is 4 x 8.6 TFLOP; step 2's ~40 element-wise launches over R floats are noise next to
them. A 3-pass GPU kernel -- the row block's loss step fused in registers between the fold and the
gradient GEMMs, which needs the whole vocabulary's statistics of a row before its gradient -- is
future work.
"""

from __future__ import annotations

import torch

from rlhf_fast.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

# KL estimator codes (ppo::Estimator; KL_ESTIMATORS in rlhf_fast/reference.py).
K1, ABS, K2, K3 = 0, 1, 2, 3
N_SUMS = 13  # SUMS in rlhf_fast/ops/linear_ppo_loss.py


def _exp_parts(y):
    """(e^y, e^y - 1, e^y - 1 - y); the last two from the Taylor series for |y| < 1/2 (no cancellation)."""
    p = y * (1.0 / 3628800.0) + (1.0 / 362880.0)
    for c in (1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5):
        p = p * y + c
    series = y * y * p
    e = torch.exp(y)
    small = y.abs() < 0.5
    return e, torch.where(small, y + series, e - 1.0), torch.where(small, series, (e - 1.0) - y)


def _kl_token(x, estimator: int, cap: float):
    """(kl, d kl / d logprobs) at x = logprobs - ref_logprobs; the value clamped to [-cap, cap] when
    cap > 0, the derivative 0 where that is active."""
    if estimator == K1:
        kl, dkl = x, torch.ones_like(x)
    elif estimator == ABS:
        kl, dkl = x.abs(), torch.sign(x)
    elif estimator == K2:
        kl, dkl = 0.5 * x * x, x
    else:
        _, em1, q = _exp_parts(-x)  # k3 = e^-x - 1 + x, derivative 1 - e^-x
        kl, dkl = q, -em1
    if cap > 0:
        over = kl.abs() > cap
        kl = torch.where(kl > cap, cap, torch.where(kl < -cap, -cap, kl))
        dkl = torch.where(over, 0.0, dkl)
    return kl, dkl


def _policy_token(lp, old, adv, lo: float, hi: float, dual_clip: float, log_ratio_clamp: float):
    """(loss, grad, clipped, dual_clipped, k3, ratio) per token (ppo::policy_token); the log-ratio
    clamped to [-c, c] before exp when c = log_ratio_clamp > 0, the gradient 0 where that is active."""
    d = lp - old
    clamped = torch.zeros_like(d, dtype=torch.bool)
    if log_ratio_clamp > 0:
        clamped = d.abs() > log_ratio_clamp
        d = d.clamp(-log_ratio_clamp, log_ratio_clamp)
    r, _, k3 = _exp_parts(d)
    l1 = -adv * r
    l2 = -adv * r.clamp(lo, hi)
    clipped = l2 > l1
    loss = torch.maximum(l1, l2)
    grad = torch.where(clipped | clamped, 0.0, l1)  # d(-A e^d)/dd = l1
    dual = torch.zeros_like(clipped)
    if dual_clip > 0:
        l3 = -adv * dual_clip
        dual = (adv < 0) & (loss > l3)
        loss = torch.where(dual, l3, loss)
        grad = torch.where(dual, 0.0, grad)
    return loss, grad, clipped, dual, k3, r


def linear_ppo_loss_fwd(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        row_weight: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, ref: torch.Tensor | None,
                        n_policy: int, kl_coef: float, kl_estimator: int, entropy_coef: float, clip_low: float,
                        clip_high: float, dual_clip: float, temperature: float, ignore_index: int,
                        compute_grad: bool, log_ratio_clamp: float = 20.0, kl_cap: float = 0.0):
    """(loss () fp32, sums (13,) float64, grad_rows, grad_weight, grad_bias) as the op's other backends:
    gradients in the inputs' dtypes, (0,) tensors without compute_grad (grad_bias also without a bias).
    log_ratio_clamp, kl_cap: 0 for none (the caller resolves kl_cap's per-estimator default)."""
    n_rows = rows.shape[0]
    f32 = dict(dtype=torch.float32, device=rows.device)
    w = row_weight.float()
    valid = (labels != ignore_index) & (w != 0)
    lab = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    # Ignored rows come back with logprob 0, entropy 0, lse -inf; the steps below select them away.
    lp, ent, lse = linear_logprobs_fwd(rows, weight, bias, lab, temperature, None, ignore_index, True)

    with torch.no_grad():
        is_pol = torch.arange(n_rows, device=rows.device) < n_policy
        pol, ptx = valid & is_pol, valid & ~is_pol
        zero = torch.zeros((), **f32)
        # Rows outside the policy read zeros: whatever padding old / adv / ref hold reaches nothing.
        lp_p = torch.where(pol, lp, zero)
        loss_p, grad_p, clipped, dual, k3, ratio = _policy_token(lp_p, torch.where(pol, old.float(), zero),
                                                                 torch.where(pol, adv.float(), zero),
                                                                 1.0 - clip_low, 1.0 + clip_high, dual_clip,
                                                                 log_ratio_clamp)
        if ref is not None:
            kl, dkl = _kl_token(lp_p - torch.where(pol, ref.float(), zero), kl_estimator, kl_cap)
        else:
            kl, dkl = torch.zeros_like(lp), torch.zeros_like(lp)
        g_lp = torch.where(pol, w * (grad_p + kl_coef * dkl), torch.where(ptx, -w, zero))
        g_h = torch.where(pol, -w * entropy_coef, zero)
        per_row = torch.where(pol, w.double() * (loss_p + kl_coef * kl - entropy_coef * ent).double(),
                              torch.where(ptx, -w.double() * lp.double(), 0.0))

        def total(x, where):
            return torch.where(where, x.double(), 0.0).sum()

        count = pol.sum().double()
        inf = torch.tensor([float("inf")], dtype=torch.float64, device=rows.device)
        ratio_min = torch.cat([torch.where(pol, ratio.double(), inf), inf]).amin()
        ratio_max = torch.cat([torch.where(pol, ratio.double(), -inf), -inf]).amax()
        sums = torch.stack([
            per_row.sum(), count, total(clipped, pol), total(dual, pol), total(k3, pol), total(ratio, pol),
            torch.where(count > 0, ratio_min, 0.0), torch.where(count > 0, ratio_max, 0.0),
            total(w * loss_p, pol), total(kl, pol), total(ent, pol), total(-lp, ptx), ptx.sum().double()])
    loss = sums[0].float()
    empty = lambda t: t.new_empty((0,))  # noqa: E731
    if not compute_grad:
        return loss, sums, empty(rows), empty(weight), empty(weight)
    # g_h is zero everywhere without an entropy bonus: compile the entropy term out of the backward.
    gh, gw, gb = linear_logprobs_bwd(g_lp, g_h if entropy_coef != 0 else None, rows, weight, bias, lab, lse, ent,
                                     temperature, None, ignore_index)
    return loss, sums, gh, gw, empty(weight) if gb is None else gb
