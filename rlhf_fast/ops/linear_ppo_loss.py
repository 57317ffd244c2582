"""linear_ppo_loss: the fused RL head. The PPO-ptx objective straight from the lm_head — each
token's log-prob and entropy, the clipped-ratio policy loss, the KL term, the entropy bonus and the
pretraining (ptx) log-likelihood — with the gradients of hidden, ptx_hidden and weight produced in
the forward, without materializing the logits.

Flow: public function (validates, builds per-row weights from the aggregation) -> custom op
``rlhf_fast::linear_ppo_loss`` (returns the loss, statistics sums and the gradients; its registered
backward only scales those gradients by the upstream gradient) -> backend:
  torch   composition of the references; materializes the (N, V) logits (the eager baseline)
  cpu     csrc/cpu/linear_ppo_loss.cpp     } the tiled host algorithm of
                                           } csrc/include/rlhf_fast/linear_ppo_loss_tiled.h
  triton  rlhf_fast/kernels/linear_ppo_loss.py: the Triton kernels of linear_logprobs (forward, then backward
          with the per-token gradients), the loss step in PyTorch element-wise ops

Cost: every token's loss is local, so its gradient is known as soon as its log-prob is. The cpu
backend processes rows in blocks spanning the vocabulary (one (rows x V) fp32 buffer of at most
a quarter of the rows, see block_rows): per vocabulary chunk one GEMM for the logits and the fold; the per-token
loss and gradient; then per chunk the gradient transform and two GEMMs into grad_hidden and
grad_weight — 3 GEMMs per token instead of the 4 of linear_logprobs (forward + backward, which must
recompute the logits) followed by the separate losses. The triton backend keeps no logits between
its forward and backward kernels, so it pays those 4 GEMM passes (its fused GEMM + softmax kernels
hold a tile's logits in registers only); a 3-pass Triton kernel is future work. Rows whose label is
ignored or whose weight is 0 (prompt and padding tokens) are skipped by every pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.ops import _numerics as N
from rlhf_fast.ops._aggregation import check_aggregation, check_dual_clip, row_weights
from rlhf_fast.reference import (
    KL_ESTIMATORS,
    kl_penalty_backward_ref,
    kl_penalty_ref,
    linear_logprobs_backward_ref,
    linear_logprobs_ref,
    ppo_policy_loss_terms_ref,
)

OP = op_registry("linear_ppo_loss")
# Row blocks span the vocabulary and their fp32 logits stay in memory until the block's log-probs
# are final (block_rows). At most a quarter of the rows: the buffer is then ~1/18 of eager's peak
# (which holds ~4.5 (N, V) fp32 tensors), whatever N and V. Within that, at most TILE_ELEMS (64 MB)
# of logits, except that CPU blocks get at least MIN_TILE_ROWS rows: the weight gradient's GEMM
# contracts over the block's rows, and at N=2048, V=65536 blocks of 256 rows (what 64 MB gives) made
# it ~8% slower and the whole op ~3.5% slower than blocks of 512, with twice the parallel regions
# (at V=32768, 512-row blocks are ~10% faster than 128). Taller blocks gain little more.
# (The cuda backend keeps the 64 MB bound: not measured there.)
MIN_TILE_ROWS = 512
TILE_ELEMS = 1 << 24
# The sums the backends return, in order (csrc/include/rlhf_fast/linear_ppo_loss_tiled.h: enum Sum).
SUMS = ("loss", "count", "clipped", "dual_clipped", "k3", "ratio", "ratio_min", "ratio_max", "policy_loss", "kl",
        "entropy", "ptx_nll", "ptx_count")
STATS = ("policy_loss", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "kl",
         "entropy", "ptx_loss")


def block_rows(n_rows: int, vocab: int, backend: str) -> int:
    """Rows per block of the cpu / cuda backends: at most ceil(n_rows / 4), and within that at most
    TILE_ELEMS // vocab, but on cpu at least MIN_TILE_ROWS."""
    floor = MIN_TILE_ROWS if backend == "cpu" else 1
    return max(1, min(-(-n_rows // 4), max(floor, TILE_ELEMS // max(vocab, 1))))


# ---------------------------------------------------------------------------------------------
# Backends: forward(rows (R, H), weight (V, H), bias (V,) or None, labels (R,), row_weight (R,), old (R,),
# adv (R,), ref (R,) or None, n_policy, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high,
# dual_clip, temperature, ignore_index, compute_grad, tile_rows, log_ratio_clamp (0: none), kl_cap (0: none))
#   -> (loss (), sums (13,) f64, grad_rows, grad_weight, grad_bias) (gradients (0,) without compute_grad
#      or, for grad_bias, without a bias)
# ---------------------------------------------------------------------------------------------

def _torch_forward(rows, weight, bias, labels, row_weight, old, adv, ref, n_policy, kl_coef, kl_estimator, entropy_coef,
                   clip_low, clip_high, dual_clip, temperature, ignore_index, compute_grad, tile_rows, log_ratio_clamp,
                   kl_cap):
    V.check_label_range(labels, weight.shape[0], ignore_index)
    valid = (labels != ignore_index) & (row_weight != 0)
    lab = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    with torch.no_grad():
        lp, ent, lse = linear_logprobs_ref(rows, weight, lab, bias=bias, temperature=temperature,
                                           ignore_index=ignore_index, return_entropy=True)
    is_pol = torch.arange(rows.shape[0], device=rows.device) < n_policy
    pol, ptx = valid & is_pol, valid & ~is_pol
    terms = ppo_policy_loss_terms_ref(lp, old, adv, pol, clip_eps=clip_low, clip_eps_high=clip_high,
                                      dual_clip=dual_clip if dual_clip > 0 else None,
                                      log_ratio_clamp=log_ratio_clamp if log_ratio_clamp > 0 else None)
    est = KL_ESTIMATORS[kl_estimator]
    cap = kl_cap if kl_cap > 0 else None
    zero = torch.zeros_like(lp)
    kl = torch.where(pol, kl_penalty_ref(lp, ref, estimator=est, cap=cap), zero) if ref is not None else zero
    dkl = (torch.where(pol, kl_penalty_backward_ref(torch.ones_like(lp), lp, ref, estimator=est, cap=cap), zero)
           if ref is not None else zero)
    w = row_weight.float()
    g_lp = torch.where(pol, w * (terms["grad"] + kl_coef * dkl), torch.where(ptx, -w, zero))
    g_h = torch.where(pol, -w * entropy_coef, zero)
    per_token = torch.where(pol, w * (terms["loss"].detach() + kl_coef * kl - entropy_coef * ent),
                            torch.where(ptx, -w * lp, zero))
    f64 = lambda t: t.double().sum()
    ratio_valid = terms["ratio"][pol]
    sums = torch.stack([
        f64(per_token), f64(pol.float()), f64(terms["clipped"]), f64(terms["dual_clipped"]), f64(terms["k3"] * pol),
        f64(terms["ratio"] * pol), ratio_valid.min().double() if ratio_valid.numel() else f64(zero[:0]),
        ratio_valid.max().double() if ratio_valid.numel() else f64(zero[:0]),
        f64(torch.where(pol, w * terms["loss"].detach(), zero)), f64(kl), f64(torch.where(pol, ent, zero)),
        f64(torch.where(ptx, -lp, zero)), f64(ptx.float())])
    loss = per_token.sum()
    if not compute_grad:
        return loss, sums, rows.new_empty((0,)), weight.new_empty((0,)), weight.new_empty((0,))
    gh, gw, gb = linear_logprobs_backward_ref(g_lp, g_h, rows, weight, bias, lab, lse, ent, temperature=temperature,
                                              ignore_index=ignore_index)
    return loss, sums, gh, gw, weight.new_empty((0,)) if gb is None else gb


def _cpu_forward(*args):
    return torch.ops.rlhf_fast_C.linear_ppo_loss_clamped_fwd(*args)



def _triton_forward(rows, weight, bias, labels, row_weight, old, adv, ref, n_policy, kl_coef, kl_estimator,
                    entropy_coef, clip_low, clip_high, dual_clip, temperature, ignore_index, compute_grad, tile_rows,
                    log_ratio_clamp, kl_cap):
    from rlhf_fast.kernels import linear_ppo_loss as K

    V.check_label_range(labels, weight.shape[0], ignore_index)
    return K.linear_ppo_loss_fwd(rows, weight, bias, labels, row_weight, old, adv, ref, n_policy, kl_coef,
                                 kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, temperature,
                                 ignore_index, compute_grad, log_ratio_clamp, kl_cap)


OP.register("torch", _torch_forward)
OP.register("cpu", _cpu_forward, native_op="linear_ppo_loss_clamped_fwd")
OP.register("triton", _triton_forward)


# ---------------------------------------------------------------------------------------------
# Custom op: the forward returns the gradients; the backward scales them by the upstream gradient.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::linear_ppo_loss", mutates_args=())
def _linear_ppo_loss_op(rows: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, row_weight: Tensor,
                        old: Tensor, adv: Tensor, ref: Tensor | None, n_policy: int, kl_coef: float,
                        kl_estimator: int, entropy_coef: float, clip_low: float, clip_high: float, dual_clip: float,
                        temperature: float, ignore_index: int, compute_grad: bool, tile_rows: int,
                        log_ratio_clamp: float, kl_cap: float, backend: str
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, sums, gh, gw, gb = OP.impl(backend).forward(rows, weight, bias, labels, row_weight, old, adv, ref, n_policy,
                                                      kl_coef, kl_estimator, entropy_coef, clip_low, clip_high,
                                                      dual_clip, temperature, ignore_index, compute_grad, tile_rows,
                                                      log_ratio_clamp, kl_cap)
    return loss.float(), sums.double(), gh, gw, gb


@_linear_ppo_loss_op.register_fake
def _(rows, weight, bias, labels, row_weight, old, adv, ref, n_policy, kl_coef, kl_estimator, entropy_coef, clip_low,
      clip_high, dual_clip, temperature, ignore_index, compute_grad, tile_rows, log_ratio_clamp, kl_cap, backend):
    gh = rows.new_empty(rows.shape) if compute_grad else rows.new_empty((0,))
    gw = weight.new_empty(weight.shape) if compute_grad else weight.new_empty((0,))
    gb = bias.new_empty(bias.shape) if compute_grad and bias is not None else weight.new_empty((0,))
    return rows.new_empty((), dtype=torch.float32), rows.new_empty((len(SUMS),), dtype=torch.float64), gh, gw, gb


def _setup_context(ctx, inputs, output):
    _, sums, grad_rows, grad_weight, grad_bias = output
    # Only the loss is differentiable; without this autograd would feed the backward zero-filled
    # (R, H) and (V, H) gradients for the other outputs.
    ctx.mark_non_differentiable(sums, grad_rows, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(grad_rows, grad_weight, grad_bias)


def _backward(ctx, grad_loss, _g_sums, _g_rows, _g_weight, _g_bias):
    grads = ctx.saved_tensors  # rows, weight, bias
    if grad_loss is None:
        return (None,) * 22
    if grads[0].numel() == 0 and grads[1].numel() == 0:
        raise RuntimeError("linear_ppo_loss: the forward ran without gradients (no input required grad)")
    if not ctx.has_bias:
        grads = (grads[0], grads[1], None)
    nones = (None,) * 19
    # (a plain CPU tensor: not while compile / AOT tracing, where the value is not known)
    if (type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
            and float(grad_loss) == 1.0):
        # loss.backward(): hand the forward's gradients over as they are. Without retain_graph the
        # saved tensors are released before autograd accumulates, so the (V, H) weight gradient
        # becomes weight.grad without a copy (a scaled copy would hold two of them at once).
        return grads + nones
    scale = grad_loss.float()
    return tuple(None if g is None else (g * scale).to(g.dtype) for g in grads) + nones


_linear_ppo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def linear_ppo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logprobs: Tensor, advantages: Tensor,
                    mask: Tensor, *, ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
                    kl_estimator: str = "k1", entropy_coef: float = 0.0, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None, dual_clip: float | None = None,
                    aggregation: str = "token-mean", num_items=None, norm_length: int | None = None,
                    ptx_hidden: Tensor | None = None, ptx_labels: Tensor | None = None, ptx_coef: float = 0.0,
                    temperature: float = 1.0, ignore_index: int = -100, bias: Tensor | None = None,
                    log_ratio_clamp: float | None = N.LOG_RATIO_CLAMP, kl_cap: float | str | None = "default",
                    backend: str | None = None):
    """The PPO-ptx loss of a batch straight from the lm_head, as one op.

    Args:
        hidden: ``(B, T, H)`` last hidden states of the sampled responses; ``weight`` ``(V, H)`` the lm_head.
        labels: ``(B, T)`` the sampled tokens (read where ``mask`` is set).
        old_logprobs, advantages, mask: ``(B, T)`` as in :func:`rlhf_fast.ppo_policy_loss`.
        ref_logprobs: ``(B, T)`` reference-policy log-probs for the KL term (``kl_coef * kl``, estimator
            ``kl_estimator`` of :func:`rlhf_fast.kl_penalty`); required when ``kl_coef != 0``.
        entropy_coef: weight of the entropy bonus (``- entropy_coef * H`` per token).
        clip_eps, clip_eps_high, dual_clip, aggregation, num_items, norm_length: as in ppo_policy_loss;
            the aggregation weights the whole per-token loss ``l_pol + kl_coef * kl - entropy_coef * H``.
        ptx_hidden, ptx_labels: ``(..., H)`` / ``(...)`` pretraining text for the PPO-ptx term
            ``ptx_coef * mean(-log p(ptx_labels))`` over tokens with ``ptx_labels != ignore_index``.
        temperature: divides the logits.
        bias: optional ``(V,)`` lm_head bias (logits ``hidden @ weight.T + bias``), weight's dtype;
            differentiable like weight.
        log_ratio_clamp: the clamp of ``logprob - old_logprobs`` before ``exp``, default 20, ``None``
            for none: as in :func:`rlhf_fast.ppo_policy_loss` (gradient 0 where it is active).
        kl_cap: the cap of the KL term's value, as ``cap`` of :func:`rlhf_fast.kl_penalty`:
            ``"default"`` (10 for k3, none for k1 / abs / k2), ``None`` or a number > 0.
            The cuda backend computes the defaults of both only; other values run on another backend
            (explicitly asking for cuda raises).

    Returns:
        ``(loss, stats)``: the fp32 scalar loss (differentiable w.r.t. hidden, ptx_hidden and weight)
        and a dict of detached fp32 scalars: policy_loss (the aggregated clipped-ratio term),
        clip_frac, dual_clip_frac, approx_kl, ratio_mean/min/max (over valid tokens, as
        ppo_policy_loss), kl and entropy (means over valid tokens), ptx_loss (mean NLL).
        Equal to composing linear_logprobs with the separate losses, to fp32 rounding.
        Without any valid token (mask all 0, or every label ignore_index) and no ptx token, the loss
        is 0 with zero gradients and every statistic is 0 (``ptx_loss`` too without ptx tokens).
    """
    V.check_tensor("hidden", hidden, (torch.float32, torch.bfloat16, torch.float16))
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape (B, T, H), got {tuple(hidden.shape)}")
    b, t, hdim = hidden.shape
    V.check_tensor("weight", weight, (hidden.dtype,))
    if weight.dim() != 2 or weight.shape[1] != hdim:
        raise ValueError(f"weight: expected shape (V, {hdim}), got {tuple(weight.shape)}")
    if bias is not None:
        V.check_tensor("bias", bias, (weight.dtype,))
        V.check_same_device("bias", bias, "weight", weight)
        V.check_shape("bias", bias, (weight.shape[0],), "(weight.shape[0],)")
    for name, x in (("labels", labels), ("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        V.check_tensor(name, x)
        V.check_same_device(name, x, "hidden", hidden)
        V.check_shape(name, x, (b, t), "hidden.shape[:2]")
    V.check_tensor("labels", labels, (torch.int32, torch.int64))
    kl_coef, entropy_coef, ptx_coef = float(kl_coef), float(entropy_coef), float(ptx_coef)
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs: required when kl_coef != 0")
    if ref_logprobs is not None:
        V.check_shape("ref_logprobs", ref_logprobs, (b, t), "hidden.shape[:2]")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    clip_low = V.check_positive_float("clip_eps", clip_eps)
    clip_high = clip_low if clip_eps_high is None else V.check_positive_float("clip_eps_high", clip_eps_high)
    dual = 0.0 if dual_clip is None else check_dual_clip(dual_clip)
    check_aggregation(aggregation)
    clamp = N.check_log_ratio_clamp(log_ratio_clamp)
    cap = N.resolve_kl_cap("kl_cap", kl_cap, kl_estimator)
    temperature = V.check_positive_float("temperature", temperature)
    ignore_index = V.check_int("ignore_index", ignore_index)

    valid = mask != 0
    w_row = row_weights(mask, aggregation, num_items, norm_length)                # (B,)
    row_weight = (w_row.unsqueeze(1) * mask.float()).reshape(-1)
    lab = torch.where(valid, labels.long(), torch.full_like(labels.long(), ignore_index)).reshape(-1)
    rows = hidden.reshape(-1, hdim)
    old = old_logprobs.float().reshape(-1)
    adv = advantages.float().reshape(-1)
    ref = None if ref_logprobs is None else ref_logprobs.float().reshape(-1)
    n_policy = rows.shape[0]
    grads_wanted = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                                or (bias is not None and bias.requires_grad))
    if ptx_hidden is not None and ptx_coef != 0:
        if ptx_labels is None:
            raise ValueError("ptx_labels: required with ptx_hidden")
        V.check_tensor("ptx_hidden", ptx_hidden, (hidden.dtype,))
        if ptx_hidden.shape[-1] != hdim:
            raise ValueError(f"ptx_hidden: expected shape (..., {hdim}), got {tuple(ptx_hidden.shape)}")
        V.check_shape("ptx_labels", ptx_labels, ptx_hidden.shape[:-1], "ptx_hidden.shape[:-1]")
        ptx_lab = ptx_labels.reshape(-1).long()
        n_ptx = (ptx_lab != ignore_index).sum().clamp_min(1).float()
        rows = torch.cat([rows, ptx_hidden.reshape(-1, hdim)])
        lab = torch.cat([lab, ptx_lab])
        row_weight = torch.cat([row_weight, (ptx_coef / n_ptx).expand(ptx_lab.shape[0])])
        pad = old.new_zeros(ptx_lab.shape[0])
        old, adv = torch.cat([old, pad]), torch.cat([adv, pad])
        ref = None if ref is None else torch.cat([ref, pad])
        grads_wanted = grads_wanted or (torch.is_grad_enabled() and ptx_hidden.requires_grad)
    rows = rows.contiguous()
    w = weight.contiguous()
    name = OP.select([rows, w], backend)
    tile_rows = block_rows(rows.shape[0], w.shape[0], name)
    bias = None if bias is None else bias.contiguous()
    loss, sums, *_ = _linear_ppo_loss_op(rows, w, bias, lab, row_weight.float().contiguous(), old.contiguous(),
                                         adv.contiguous(), None if ref is None else ref.contiguous(), n_policy,
                                         kl_coef, KL_ESTIMATORS.index(kl_estimator), entropy_coef, clip_low,
                                         clip_high, dual, temperature, ignore_index, grads_wanted, tile_rows,
                                         clamp or 0.0, cap or 0.0, name)
    s = dict(zip(SUMS, sums.float().unbind(), strict=True))
    count = s["count"].clamp_min(1)
    stats = {
        "policy_loss": s["policy_loss"], "clip_frac": s["clipped"] / count, "dual_clip_frac": s["dual_clipped"] / count,
        "approx_kl": s["k3"] / count, "ratio_mean": s["ratio"] / count, "ratio_min": s["ratio_min"],
        "ratio_max": s["ratio_max"], "kl": s["kl"] / count, "entropy": s["entropy"] / count,
        "ptx_loss": s["ptx_nll"] / s["ptx_count"].clamp_min(1),
    }
    return loss, stats
