"""ppo_policy_loss against the reference, for every backend that runs here (torch, cpu, and triton under
TRITON_INTERPRET=1): loss, statistics and gradient for every aggregation, dtypes, clip-higher and dual
clip, masks (random, fully masked rows, a fully masked batch, garbage under the mask, float masks),
extreme log-ratios, split batches with num_items, bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close
from loss_helpers import check_empty_inputs, check_loss_result, check_split_batch, masked_inputs, run_op_and_ref

import rlhf_fast
from rlhf_fast.ops._aggregation import AGGREGATIONS
from rlhf_fast.reference import PPO_POLICY_STATS, ppo_policy_loss_ref, ppo_policy_loss_terms_ref


def make_inputs(shape, dtype, *, log_ratio_scale=0.3, mask_kind="bool", masked_rows=(1,), seed_garbage=True):
    """(logprobs, old_logprobs, advantages, mask) with ratios on both sides of the clip range, some
    fully masked rows, and inf/NaN garbage at masked positions (which must never matter)."""
    lp = (torch.randn(shape) * 0.5 - 1.5).to(dtype)
    old = (lp.float() + torch.randn(shape) * log_ratio_scale).to(dtype)
    adv = torch.randn(shape).to(dtype)
    return masked_inputs((lp, old, adv), (float("nan"), float("-inf"), float("inf")), masked_rows=masked_rows,
                         mask_kind=mask_kind, seed_garbage=seed_garbage)


def run_both(inputs, backend, grad_scale=1.7, **kw):
    """((loss, stats, grad) of the op, the same of the reference), with upstream gradient grad_scale."""
    op = lambda *a, **k: rlhf_fast.ppo_policy_loss(*a, **k, backend=backend)
    return run_op_and_ref(op, ppo_policy_loss_ref, PPO_POLICY_STATS, inputs, grad_scale, **kw)


def check(result, dtype, what=""):
    check_loss_result(result, dtype, PPO_POLICY_STATS, what)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_matches_reference(backend, dtype, aggregation):
    inputs = make_inputs((6, 77), dtype)
    check(run_both(inputs, backend, aggregation=aggregation, clip_eps=0.2, clip_eps_high=0.28), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dual_clip_and_every_branch(backend):
    """Large log-ratios and both signs of advantage: the clipped branch, the dual clip and the
    unclipped branch are all active somewhere; stats and gradients as the reference."""
    inputs = make_inputs((5, 200), torch.float32, log_ratio_scale=1.5)
    result = run_both(inputs, backend, clip_eps=0.1, clip_eps_high=0.3, dual_clip=2.0)
    check(result, torch.float32)
    stats = dict(zip(PPO_POLICY_STATS, result[0][1], strict=True))
    assert 0.05 < stats["clip_frac"] < 0.95 and stats["dual_clip_frac"] > 0.01
    assert stats["ratio_min"] < 1 - 0.1 < 1 + 0.3 < stats["ratio_max"]
    # dual clip never raises the loss: with it the loss is <= the loss without
    lp, old, adv, mask = inputs
    plain, _ = rlhf_fast.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.1, clip_eps_high=0.3, backend=backend)
    assert result[0][0] <= plain


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_fully_masked_rows_and_batch(backend, aggregation):
    """Fully masked rows contribute nothing; a fully masked batch gives loss 0, zero gradient, stats 0
    (never NaN), even with inf/NaN stored at every masked position."""
    inputs = make_inputs((4, 50), torch.float32, masked_rows=(0, 2))
    check(run_both(inputs, backend, aggregation=aggregation, dual_clip=3.0), torch.float32)
    lp, old, adv, mask = inputs
    dead = torch.zeros_like(mask)
    (loss, stats, g), _ = run_both((lp, old, adv, dead), backend, aggregation=aggregation, dual_clip=3.0)
    assert loss.item() == 0.0 and torch.equal(stats, torch.zeros(6)) and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_log_ratios(backend):
    """Log-ratios of +-50 (ratios of 5e21 and 2e-22): finite loss, statistics and gradient."""
    lp = torch.zeros(3, 8)
    old = torch.tensor([50.0, -50.0, 20.0, -20.0, 0.0, 1e-6, -30.0, 40.0]).expand(3, 8).clone()
    adv = torch.tensor([1.0, -1.0, -2.0, 0.5]).repeat(2).expand(3, 8).clone()
    mask = torch.ones(3, 8, dtype=torch.bool)
    for dual in (None, 3.0):
        result = run_both((lp, old, adv, mask), backend, dual_clip=dual)
        loss, stats, g = result[0]
        assert torch.isfinite(loss) and torch.isfinite(stats).all() and torch.isfinite(g).all()
        check(result, torch.float32)


LOG_RATIOS = [-80.0, -25.0, -15.0, -0.3, 0.0, 0.3, 15.0, 25.0, 80.0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("log_ratio_clamp", [20.0, None, 5.0], ids=lambda c: f"clamp={c}")
@pytest.mark.parametrize("dual_clip", [None, 3.0], ids=lambda d: f"dual={d}")
def test_log_ratio_clamp_at_extreme_log_ratios(backend, log_ratio_clamp, dual_clip):
    """Log-ratios of +-15, +-25, +-80 with positive and negative advantages: finite loss, statistics and
    gradient, equal to the reference; the gradient is exactly 0 where the clamp is active."""
    d = torch.tensor(LOG_RATIOS)
    lp = torch.full((2, d.numel()), -2.0)
    old = lp - d
    adv = torch.stack([torch.ones_like(d), -torch.ones_like(d)])
    mask = torch.ones_like(lp, dtype=torch.bool)
    result = run_both((lp, old, adv, mask), backend, log_ratio_clamp=log_ratio_clamp, dual_clip=dual_clip)
    loss, stats, g = result[0]
    assert torch.isfinite(loss) and torch.isfinite(stats).all() and torch.isfinite(g).all()
    check(result, torch.float32)
    if log_ratio_clamp is not None:
        active = (lp - old).abs() > log_ratio_clamp
        assert (g[active] == 0).all()
        assert stats[PPO_POLICY_STATS.index("ratio_max")] <= torch.tensor(log_ratio_clamp).exp() * (1 + 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_log_ratio_clamp_default_matches_peers(backend):
    """At a log-ratio of 25 with advantage -1 the unclamped loss is exp(25) = 7.2e10; with the default
    clamp (20, as verl and OpenRLHF) it is exp(20) = 4.85e8 and the token has no gradient."""
    lp, old = torch.tensor([[0.0]]), torch.tensor([[-25.0]])
    adv, mask = torch.tensor([[-1.0]]), torch.ones(1, 1, dtype=torch.bool)
    x = lp.clone().requires_grad_(True)
    loss, stats = rlhf_fast.ppo_policy_loss(x, old, adv, mask, backend=backend)
    loss.backward()
    assert abs(loss.item() / torch.tensor(20.0).exp().item() - 1) < 1e-5 and x.grad.item() == 0
    assert abs(stats["ratio_max"].item() / torch.tensor(20.0).exp().item() - 1) < 1e-5
    raw, _ = rlhf_fast.ppo_policy_loss(lp, old, adv, mask, log_ratio_clamp=None, backend=backend)
    assert abs(raw.item() / torch.tensor(25.0).exp().item() - 1) < 1e-5




@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_split_batch_with_num_items_matches_full_batch(backend, aggregation):
    inputs = make_inputs((9, 40), torch.float32, masked_rows=(4, 5))
    check_split_batch(lambda *a, **k: rlhf_fast.ppo_policy_loss(*a, **k, backend=backend), inputs, aggregation)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_num_items_and_norm_length(backend):
    inputs = make_inputs((4, 30), torch.float32)
    for kw in (dict(num_items=17), dict(num_items=torch.tensor(17.5)), dict(num_items=0),
               dict(aggregation="seq-mean-token-sum-norm", norm_length=64),
               dict(aggregation="seq-mean-token-sum-norm", norm_length=64,
                    num_items=torch.tensor(3, dtype=torch.int32)),
               dict(aggregation="seq-mean-token-mean", num_items=torch.tensor(2.0, dtype=torch.float64))):
        result = run_both(inputs, backend, **kw)
        check(result, torch.float32, f" {kw}")
    (loss, _, g), _ = run_both(inputs, backend, num_items=0)
    assert loss.item() == 0.0 and not g.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float_mask_and_mixed_dtypes(backend, dtype):
    """A float mask (weights), low-precision log-probs with fp32 old log-probs and advantages."""
    lp, old, adv, mask = make_inputs((5, 64), dtype, mask_kind="float")
    mask = mask * torch.rand(mask.shape).add(0.5)  # weights in [0.5, 1.5) on valid tokens
    check(run_both((lp, old.float(), adv.float(), mask), backend, dual_clip=2.5), dtype)
    check(run_both((lp, old, adv, mask.to(dtype)), backend, aggregation="seq-mean-token-mean"), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_integer_mask_is_taken_as_its_weights(backend):
    lp, old, adv, mask = make_inputs((4, 33), torch.float32)
    want = rlhf_fast.ppo_policy_loss(lp, old, adv, mask, backend=backend, aggregation="seq-mean-token-mean")
    for dtype in (torch.int64, torch.int32, torch.uint8):
        got = rlhf_fast.ppo_policy_loss(lp, old, adv, mask.to(dtype), backend=backend,
                                        aggregation="seq-mean-token-mean")
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1]["clip_frac"], want[1]["clip_frac"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_rows_and_strided_inputs(backend):
    """Rows of several tiles on every backend (4096 columns on CPU, 2048 on GPU), inputs that are
    column slices of wider tensors, and an expanded (stride-0) mask."""
    lp, old, adv, _ = make_inputs((3, 9001), torch.float32, seed_garbage=False)
    mask = (torch.rand(1, 9001) < 0.7).expand(3, 9001)
    wide = torch.randn(3, 9002)
    adv = wide[:, 1:]
    assert not adv.is_contiguous() and mask.stride(0) == 0
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        check(run_both((lp, old, adv, mask), backend, aggregation=aggregation, dual_clip=3.0), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_path_stats_detached_inputs_untouched(backend):
    lp, old, adv, mask = make_inputs((3, 40), torch.bfloat16)
    before = [t.clone() for t in (lp, old, adv, mask)]
    with torch.no_grad():
        loss_ng, stats_ng = rlhf_fast.ppo_policy_loss(lp, old, adv, mask, backend=backend)
    x = lp.clone().requires_grad_(True)
    o, a = old.clone().requires_grad_(True), adv.clone().requires_grad_(True)
    loss, stats = rlhf_fast.ppo_policy_loss(x, o, a, mask, backend=backend)
    assert loss.requires_grad and not any(s.requires_grad for s in stats.values())
    assert set(stats) == set(PPO_POLICY_STATS)
    assert torch.equal(loss.detach(), loss_ng) and all(torch.equal(stats[k], stats_ng[k]) for k in stats)
    loss.backward()
    assert x.grad is not None and o.grad is None and a.grad is None
    for t, b in zip((lp, old, adv, mask), before, strict=True):
        assert torch.equal(t.nan_to_num(), b.nan_to_num()), "a caller's tensor was modified"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_inputs(backend):
    check_empty_inputs(lambda *a: rlhf_fast.ppo_policy_loss(*a, backend=backend))


def _args(**over):
    base = dict(logprobs=torch.randn(2, 3), old_logprobs=torch.randn(2, 3), advantages=torch.randn(2, 3),
                mask=torch.ones(2, 3, dtype=torch.bool))
    base.update(over)
    return base


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (_args(logprobs=torch.randn(2, 3, 4), old_logprobs=torch.randn(2, 3, 4), advantages=torch.randn(2, 3, 4),
               mask=torch.ones(2, 3, 4)), r"logprobs: expected a 2-D \(B, T\) tensor"),
        (_args(old_logprobs=torch.randn(2, 4)), r"old_logprobs: expected shape \(2, 3\)"),
        (_args(advantages=torch.randn(3, 3)), r"advantages: expected shape \(2, 3\)"),
        (_args(mask=torch.ones(2, 4)), r"mask: expected shape \(2, 3\)"),
        (_args(logprobs=torch.zeros(2, 3, dtype=torch.long)), "logprobs: expected dtype"),
        (_args(advantages=torch.zeros(2, 3, dtype=torch.int32)), "advantages: expected dtype"),
        (_args(mask=torch.ones(2, 3, dtype=torch.complex64)), "mask: expected dtype"),
        (_args(old_logprobs=torch.randn(2, 3, device="meta")), "old_logprobs: expected a tensor on cpu"),
        (_args(mask=torch.ones(2, 3, device="meta")), "mask: expected a tensor on cpu"),
        (_args(clip_eps=0.0), "clip_eps: expected a finite number > 0"),
        (_args(clip_eps=-0.2), "clip_eps: expected a finite number > 0"),
        (_args(clip_eps_high=0.0), "clip_eps_high: expected a finite number > 0"),
        (_args(dual_clip=1.0), "dual_clip: expected a finite number > 1"),
        (_args(dual_clip=0.5), "dual_clip: expected a finite number > 1"),
        (_args(aggregation="mean"), "aggregation: expected one of"),
        (_args(num_items=-1), "num_items: expected an int >= 0"),
        (_args(num_items=2.5), "num_items: expected an int >= 0"),
        (_args(num_items=torch.ones(2)), "num_items: expected an int or a 0-dim tensor"),
        (_args(num_items=torch.tensor(3.0, device="meta")), "num_items: expected a tensor on cpu"),
        (_args(norm_length=0), "norm_length: expected an int > 0"),
        (_args(log_ratio_clamp=0.0), "log_ratio_clamp: expected a finite number > 0, got 0.0"),
        (_args(log_ratio_clamp=-20.0), "log_ratio_clamp: expected a finite number > 0, got -20.0"),
        (_args(log_ratio_clamp=float("inf")), "log_ratio_clamp: expected a finite number > 0, got inf"),
    ],
)
def test_bad_input(kwargs, match):
    args = [kwargs.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        rlhf_fast.ppo_policy_loss(*args, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    lp, old, adv, mask = make_inputs((4, 40), torch.float32, seed_garbage=False)
    # params: clip_eps_low, clip_eps_high, dual_clip (0: none), log_ratio_clamp (0: none), aggregation code,
    # num_items (-1: none), norm_length (-1: T), objective (0: clip, 1: cispo), need_grad
    for params, items in (([0.2, 0.28, 0.0, 20.0, 0, -1, -1, 0, 1], None),
                          ([0.2, 0.28, 3.0, 0.0, 1, 5, -1, 0, 1], None),
                          ([0.1, 0.2, 2.0, 0.1, 3, -1, -1, 0, 1], torch.tensor(7.0)),
                          ([0.2, 4.0, 0.0, 20.0, 0, -1, -1, 1, 1], None)):
        torch.library.opcheck(torch.ops.rlhf_fast.ppo_policy_loss.default,
                              (lp.clone().requires_grad_(True), old, adv, mask, items, params, backend))
    torch.library.opcheck(torch.ops.rlhf_fast.ppo_policy_loss.default,
                          (lp, old, adv, mask, None, [0.2, 0.2, 0.0, 20.0, 2, -1, 50, 0, 0], backend))
    torch.library.opcheck(torch.ops.rlhf_fast.ppo_policy_loss.default,
                          (lp.to(torch.bfloat16).requires_grad_(True), old, adv, mask.float(), None,
                           [0.2, 0.2, 0.0, 20.0, 0, -1, -1, 0, 1], backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    lp, old, adv, mask = make_inputs((3, 40), torch.bfloat16)

    def loss_fn(x, items):
        loss, stats = rlhf_fast.ppo_policy_loss(x, old, adv, mask, clip_eps_high=0.28, dual_clip=3.0,
                                                aggregation="seq-mean-token-mean", num_items=items, backend=backend)
        return 2.0 * loss, stats

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    items = (mask.sum(-1) > 0).sum()
    x1, x2 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    (l1, s1), (l2, s2) = compiled(x1, items), loss_fn(x2, items)
    l1.backward()
    l2.backward()
    assert_close(l1, l2, "loss", **OUT_TOL)
    for k in PPO_POLICY_STATS:
        assert_close(s1[k], s2[k], k, **OUT_TOL)
    assert_close(x1.grad, x2.grad, "grad", **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("log_ratio_clamp", [None, 20.0, 0.5])
def test_reference_terms_gradient_matches_autograd(dual_clip, log_ratio_clamp):
    """The per-token gradient written out in ppo_policy_loss_terms_ref (what the kernels compute)
    equals autograd of its per-token loss."""
    lp, old, adv, mask = make_inputs((4, 60), torch.float32, log_ratio_scale=1.0)
    x = lp.clone().requires_grad_(True)
    t = ppo_policy_loss_terms_ref(x, old, adv, mask, clip_eps=0.2, clip_eps_high=0.3, dual_clip=dual_clip,
                                  log_ratio_clamp=log_ratio_clamp)
    (auto,) = torch.autograd.grad(t["loss"].sum(), x)
    assert_close(t["grad"], auto, "grad", atol=1e-6, rtol=1e-6)
