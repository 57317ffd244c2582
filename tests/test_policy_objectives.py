"""The policy-loss options of the GRPO family: CISPO (objective="cispo"), GSPO's sequence-level ratio
(ratio_level="sequence"), the two-sided clip (TRL's delta = our dual_clip), and the rollout importance weights
(rlhf_fast.rollout_importance_weights), each against the reference for every backend that runs here, and
against TRL's GRPOTrainer formulas written out below as an independent oracle."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close
from loss_helpers import check_loss_result, masked_inputs, run_op_and_ref

import rlhf_fast
from rlhf_fast.reference import (
    PPO_POLICY_STATS,
    ROLLOUT_IS_MODES,
    ROLLOUT_IS_STATS,
    ppo_policy_loss_ref,
    ppo_policy_loss_terms_ref,
    rollout_importance_weights_ref,
)

VARIANTS = [dict(objective="cispo", clip_eps_high=0.5), dict(ratio_level="sequence"),
            dict(ratio_level="sequence", dual_clip=2.0)]
VARIANT_IDS = ["cispo", "gspo", "gspo+dual"]


def make_inputs(shape, dtype, *, log_ratio_scale=0.3, masked_rows=(1,)):
    lp = (torch.randn(shape) * 0.5 - 1.5).to(dtype)
    old = (lp.float() + torch.randn(shape) * log_ratio_scale).to(dtype)
    adv = torch.randn(shape).to(dtype)
    return masked_inputs((lp, old, adv), (float("nan"), float("-inf"), float("inf")), masked_rows=masked_rows,
                         mask_kind="bool", seed_garbage=True)


def run_both(inputs, backend, **kw):
    op = lambda *a, **k: rlhf_fast.ppo_policy_loss(*a, **k, backend=backend)
    return run_op_and_ref(op, ppo_policy_loss_ref, PPO_POLICY_STATS, inputs, 1.3, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_matches_reference(backend, dtype, variant, aggregation):
    inputs = make_inputs((6, 77), dtype, log_ratio_scale=0.6)
    check_loss_result(run_both(inputs, backend, aggregation=aggregation, **variant), dtype, PPO_POLICY_STATS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cispo_gradient_is_the_capped_weight_everywhere(backend):
    """d loss / d logprobs = -A * min(r, 1 + eps_high) / n on every valid token, clipped or not, also where the
    log-ratio clamp is active; clip_frac counts r > 1 + eps_high."""
    lp = torch.zeros(2, 6)
    old = torch.tensor([[0.0, -0.5, -2.0, 1.0, -30.0, 0.3], [-1.0, 0.2, 0.0, -3.0, 2.0, 25.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 0.5, -1.0, 1.0], [0.3, -2.0, 1.0, 1.0, -1.0, 2.0]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    x = lp.clone().requires_grad_(True)
    loss, stats = rlhf_fast.ppo_policy_loss(x, old, adv, mask, objective="cispo", clip_eps_high=1.0, backend=backend)
    loss.backward()
    r = torch.exp((-old).clamp(-20, 20))
    expected = -adv * r.clamp(max=2.0) / 12
    assert_close(x.grad, expected, "grad", atol=1e-7, rtol=1e-6)
    assert abs(stats["clip_frac"].item() - float((r > 2.0).float().mean())) < 1e-6
    assert (x.grad != 0).all(), "CISPO drops no token's gradient"
    assert loss.item() == 0.0  # logprobs are 0: the surrogate's value is -w A logprobs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sequence_level_ratio_is_the_geometric_mean(backend):
    """Every token of a row sees the row's ratio exp(mean log-ratio); the gradient of each token of a row is
    the same (the row's, shared through the mean)."""
    lp, old, adv, mask = make_inputs((4, 30), torch.float32, log_ratio_scale=0.5, masked_rows=(2,))
    adv = adv[:, :1].expand_as(adv).contiguous()  # one advantage per answer, as in GRPO
    x = lp.clone().requires_grad_(True)
    loss, stats = rlhf_fast.ppo_policy_loss(x, old, adv, mask, ratio_level="sequence", backend=backend)
    loss.backward()
    m = mask.float()
    seq = (torch.where(mask, lp - old, 0.0) * m).sum(1) / m.sum(1).clamp_min(1)
    r = torch.exp(seq)
    valid_rows = mask.any(1)
    assert abs(stats["ratio_min"].item() - r[valid_rows].min().item()) < 1e-5
    assert abs(stats["ratio_max"].item() - r[valid_rows].max().item()) < 1e-5
    for b in range(4):
        g = x.grad[b][mask[b]]
        if g.numel():
            assert torch.allclose(g, g[0].expand_as(g), atol=1e-7)
    assert (x.grad[~mask] == 0).all()


def _trl_policy_loss(lp, old, adv, mask, *, loss_type, level="token", eps=0.2, eps_high=0.2, delta=None):
    """TRL 1.x GRPOTrainer._compute_loss (policy term, no KL), written out as there: adv (B,) per answer."""
    log_ratio = lp - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    a = adv.unsqueeze(1)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=eps_high).detach() * a * lp
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * a, coef_2 * a)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["grpo", "gspo", "cispo", "delta"])
def test_matches_trl_formulas(backend, case):
    """Ours equals TRL's GRPOTrainer loss and gradient, options mapped: GSPO = ratio_level "sequence"; CISPO's
    epsilon_high (the cap itself) = 1 + clip_eps_high; TRL's delta = dual_clip (for delta > 1 + epsilon_high)."""
    torch.manual_seed(3)
    b, t = 5, 24
    lengths = torch.tensor([24, 7, 15, 1, 20])
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    lp = torch.randn(b, t) * 0.4 - 1.0
    old = lp + torch.randn(b, t) * 0.5
    adv = torch.randn(b) * 1.5
    trl_kw = dict(grpo=dict(loss_type="grpo"), gspo=dict(loss_type="grpo", level="sequence"),
                  cispo=dict(loss_type="cispo", eps_high=1.3), delta=dict(loss_type="dapo", eps_high=0.28, delta=1.5))
    ours_kw = dict(grpo=dict(aggregation="seq-mean-token-mean"),
                   gspo=dict(aggregation="seq-mean-token-mean", ratio_level="sequence"),
                   cispo=dict(objective="cispo", clip_eps_high=0.3), delta=dict(clip_eps_high=0.28, dual_clip=1.5))
    x1, x2 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    ref = _trl_policy_loss(x1, old, adv, mask, **trl_kw[case])
    ours, _ = rlhf_fast.ppo_policy_loss(x2, old, adv[:, None].expand(b, t), mask, **ours_kw[case], backend=backend)
    ref.backward()
    ours.backward()
    assert_close(ours, ref, "loss", atol=1e-6, rtol=1e-5)
    assert_close(x2.grad, x1.grad, "grad", atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_extreme_log_ratios_stay_finite(backend, variant):
    lp = torch.zeros(3, 8)
    old = torch.tensor([80.0, -80.0, 25.0, -25.0, 15.0, -15.0, 0.0, 1e-6]).expand(3, 8).clone()
    adv = torch.tensor([[1.0], [-1.0], [3.0]]).expand(3, 8).clone()
    for clamp in (20.0, None):
        if clamp is None and variant.get("objective") != "cispo" and variant.get("ratio_level") != "sequence":
            continue
        x = lp.clone().requires_grad_(True)
        loss, stats = rlhf_fast.ppo_policy_loss(x, old, adv, torch.ones(3, 8), log_ratio_clamp=clamp, **variant,
                                                backend=backend)
        loss.backward()
        assert loss.isfinite() and x.grad.isfinite().all()
        assert all(v.isfinite() for v in stats.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_and_compile(backend):
    lp, old, adv, mask = make_inputs((3, 40), torch.float32)
    torch.library.opcheck(torch.ops.rlhf_fast.ppo_policy_loss.default,
                          (lp.clone().requires_grad_(True), old, adv, mask, None,
                           [0.2, 0.5, 0.0, 20.0, 1, -1, -1, 1, 1], backend))

    def loss_fn(x):
        a, _ = rlhf_fast.ppo_policy_loss(x, old, adv, mask, objective="cispo", clip_eps_high=0.5, backend=backend)
        b, _ = rlhf_fast.ppo_policy_loss(x, old, adv, mask, ratio_level="sequence", backend=backend)
        return a + b

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    x1, x2 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    l1, l2 = compiled(x1), loss_fn(x2)
    l1.backward()
    l2.backward()
    assert_close(l1, l2, "loss", **OUT_TOL)
    assert_close(x1.grad, x2.grad, "grad", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("kwargs, match", [
    (dict(objective="ppo"), "objective: expected one of"),
    (dict(ratio_level="answer"), "ratio_level: expected one of"),
    (dict(objective="cispo", dual_clip=3.0), "dual_clip: not used with objective='cispo'"),
    (dict(objective="cispo", ratio_level="sequence"), "ratio_level: 'sequence' is not defined"),
])
def test_bad_options(kwargs, match):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        rlhf_fast.ppo_policy_loss(x, x, x, torch.ones(2, 3), **kwargs)


def test_reference_cispo_gradient_matches_autograd():
    lp, old, adv, mask = make_inputs((4, 60), torch.float32, log_ratio_scale=1.0)
    x = lp.clone().requires_grad_(True)
    t = ppo_policy_loss_terms_ref(x, old, adv, mask, clip_eps_high=0.4, objective="cispo")
    (auto,) = torch.autograd.grad(t["loss"].sum(), x)
    assert_close(t["grad"], auto, "grad", atol=1e-6, rtol=1e-6)


# -- rollout importance weights ----------------------------------------------------------------

def _rollout_inputs(dtype=torch.float32):
    torch.manual_seed(1)
    old = (torch.randn(4, 20) * 0.5 - 1.0).to(dtype)
    sampler = (old.float() + torch.randn(4, 20) * 0.3).to(dtype)
    mask = torch.ones(4, 20, dtype=torch.bool)
    mask[1, 12:] = False
    mask[3] = False
    sampler[1, 15] = float("nan")   # under the mask: never read
    sampler[0, 3] = float("nan")    # a valid token the sampler gave no log-prob for: weight of delta 0
    return old, sampler, mask


@pytest.mark.parametrize("mode", ROLLOUT_IS_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_rollout_importance_weights_match_reference(mode, dtype, clip_min):
    old, sampler, mask = _rollout_inputs(dtype)
    w, st = rlhf_fast.rollout_importance_weights(old, sampler, mask, mode=mode, clip_max=1.5, clip_min=clip_min)
    w_r, st_r = rollout_importance_weights_ref(old, sampler, mask, mode=mode, clip_max=1.5, clip_min=clip_min)
    assert w.dtype == torch.float32 and not w.requires_grad
    assert_close(w, w_r, "weights", atol=1e-6, rtol=1e-5)
    for k in ROLLOUT_IS_STATS:
        assert_close(st[k], st_r[k], k, atol=1e-6, rtol=1e-5)
    assert (w[~mask] == 0).all() and (w[3] == 0).all()
    if mode.startswith("sequence"):
        for b in range(3):
            row = w[b][mask[b]]
            assert torch.equal(row, row[0].expand_as(row))
    if mode.endswith("truncate"):
        assert (w[mask] <= 1.5 + 1e-6).all() and (w[mask] > 0).all()
    assert 0.0 <= st["clipped_frac"].item() <= 1.0


def test_rollout_importance_weights_extremes_and_equal_policies():
    old = torch.zeros(2, 6)
    sampler = torch.tensor([[80.0, -80.0, 25.0, -25.0, 0.0, 1e-6]] * 2)
    mask = torch.ones(2, 6)
    for mode in ROLLOUT_IS_MODES:
        w, st = rlhf_fast.rollout_importance_weights(old, sampler, mask, mode=mode, clip_max=3.0, clip_min=0.1)
        assert w.isfinite().all() and all(v.isfinite() for v in st.values())
    w, st = rlhf_fast.rollout_importance_weights(old, sampler, mask, mode="token_truncate", clip_max=3.0)
    assert torch.allclose(w[0], torch.tensor([math.exp(-80.0), 3.0, math.exp(-25.0), 3.0, 1.0,
                                              math.exp(-1e-6)]), rtol=1e-5, atol=0)
    same = torch.randn(3, 5)
    w, st = rlhf_fast.rollout_importance_weights(same, same.clone(), torch.ones(3, 5), mode="sequence_mask")
    assert torch.equal(w, torch.ones(3, 5)) and st["clipped_frac"].item() == 0.0
    w, st = rlhf_fast.rollout_importance_weights(same, same, torch.zeros(3, 5))
    assert torch.equal(w, torch.zeros(3, 5)) and all(v.item() == 0.0 for v in st.values())


def test_rollout_importance_weights_compile():
    old, sampler, mask = _rollout_inputs()
    fn = lambda o, s, m: rlhf_fast.rollout_importance_weights(o, s, m, mode="token_mask", clip_max=1.3, clip_min=0.7)
    (w1, s1), (w2, s2) = torch.compile(fn, fullgraph=True)(old, sampler, mask), fn(old, sampler, mask)
    assert_close(w1, w2, "weights", atol=1e-6, rtol=1e-6)
    for k in ROLLOUT_IS_STATS:
        assert_close(s1[k], s2[k], k, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="token"), "mode: expected one of"),
    (dict(clip_max=0.0), "clip_max: expected a finite number > 0"),
    (dict(clip_max=None), "clip_max: expected a finite number > 0"),
    (dict(clip_min=5.0), r"clip_min: expected a number in \(0, clip_max"),
    (dict(sampler_logprobs=torch.zeros(2, 4)), r"sampler_logprobs: expected shape \(2, 3\)"),
    (dict(mask=torch.ones(3, 3)), r"mask: expected shape \(2, 3\)"),
    (dict(old_logprobs=torch.zeros(2, 3, dtype=torch.long)), "old_logprobs: expected dtype"),
])
def test_rollout_importance_weights_bad_input(kwargs, match):
    args = dict(old_logprobs=torch.zeros(2, 3), sampler_logprobs=torch.zeros(2, 3), mask=torch.ones(2, 3))
    args.update(kwargs)
    a = [args.pop(k) for k in ("old_logprobs", "sampler_logprobs", "mask")]
    with pytest.raises(ValueError, match=match):
        rlhf_fast.rollout_importance_weights(*a, **args)
