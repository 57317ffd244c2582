"""value_loss against the reference, for every backend that runs here (torch, cpu, and triton under
TRITON_INTERPRET=1): loss, statistics and gradient for every aggregation, dtypes, masks (random, fully
masked rows, a fully masked batch, garbage under the mask, float masks), the explained variance in
its hard cases, split batches with num_items, bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close
from loss_helpers import check_empty_inputs, check_loss_result, check_split_batch, masked_inputs, run_op_and_ref

import rlhf_fast
from rlhf_fast.ops._aggregation import AGGREGATIONS
from rlhf_fast.reference import VALUE_STATS, value_loss_ref, value_loss_terms_ref


def make_inputs(shape, dtype, *, mask_kind="bool", masked_rows=(1,), offset=0.0, seed_garbage=True):
    """(values, old_values, returns, mask): predictions inside and outside the clip range of the old
    ones, returns around `offset`, fully masked rows and inf/NaN garbage at masked positions."""
    old = (torch.randn(shape) + offset).to(dtype)
    values = (old.float() + torch.randn(shape) * 0.3).to(dtype)
    returns = (old.float() + torch.randn(shape)).to(dtype)
    return masked_inputs((values, old, returns), (float("nan"), float("inf"), float("-inf")),
                         masked_rows=masked_rows, mask_kind=mask_kind, seed_garbage=seed_garbage)


def run_both(inputs, backend, grad_scale=0.7, **kw):
    op = lambda *a, **k: rlhf_fast.value_loss(*a, **k, backend=backend)
    return run_op_and_ref(op, value_loss_ref, VALUE_STATS, inputs, grad_scale, **kw)


def check(result, dtype, what="", stats_tol=OUT_TOL):
    check_loss_result(result, dtype, VALUE_STATS, what, stats_tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_matches_reference(backend, dtype, aggregation):
    result = run_both(make_inputs((6, 77), dtype), backend, aggregation=aggregation, clip_eps=0.2)
    check(result, dtype)
    assert 0 < result[0][1][0] < 1  # some tokens clipped, some not


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_fully_masked_rows_and_batch(backend, aggregation):
    inputs = make_inputs((4, 50), torch.float32, masked_rows=(0, 3))
    check(run_both(inputs, backend, aggregation=aggregation), torch.float32)
    v, old, ret, mask = inputs
    (loss, stats, g), _ = run_both((v, old, ret, torch.zeros_like(mask)), backend, aggregation=aggregation)
    assert loss.item() == 0.0 and torch.equal(stats, torch.zeros(2)) and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explained_variance_hard_cases(backend):
    """Constant returns: Var[R] == 0 gives 0. Perfect predictions: 1 and a zero loss. Returns far
    from 0 next to their spread (1e4 +- 1): no E[x^2] - E[x]^2 cancellation (checked in float64)."""
    mask = torch.ones(3, 70, dtype=torch.bool)
    v = torch.randn(3, 70)
    _, stats = rlhf_fast.value_loss(v, v, torch.full((3, 70), 2.5), mask, backend=backend)
    assert stats["explained_variance"].item() == 0.0
    ret = torch.randn(3, 70)
    loss, stats = rlhf_fast.value_loss(ret, ret, ret, mask, backend=backend)
    assert loss.item() == 0.0 and stats["explained_variance"].item() == 1.0 and stats["clip_frac"].item() == 0.0
    ret = 1e4 + torch.randn(3, 70)
    v = ret - 0.5 * torch.randn(3, 70)
    _, stats = rlhf_fast.value_loss(v, v, ret, mask, backend=backend)
    r64, e64 = ret.double(), (ret - v).double()
    exact = 1 - e64.var(unbiased=False) / r64.var(unbiased=False)
    assert abs(stats["explained_variance"].item() - exact.item()) < 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_split_batch_with_num_items_matches_full_batch(backend, aggregation):
    inputs = make_inputs((9, 40), torch.float32, masked_rows=(4, 5))
    check_split_batch(lambda *a, **k: rlhf_fast.value_loss(*a, **k, backend=backend), inputs, aggregation)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_num_items_and_norm_length(backend):
    inputs = make_inputs((4, 30), torch.float32)
    for kw in (dict(num_items=17), dict(num_items=torch.tensor(17.5)), dict(num_items=0),
               dict(aggregation="seq-mean-token-sum-norm", norm_length=64),
               dict(aggregation="seq-mean-token-sum", num_items=torch.tensor(9, dtype=torch.int64))):
        check(run_both(inputs, backend, **kw), torch.float32, f" {kw}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float_mask_and_mixed_dtypes(backend, dtype):
    v, old, ret, mask = make_inputs((5, 64), dtype, mask_kind="float")
    mask = mask * torch.rand(mask.shape).add(0.5)
    check(run_both((v, old.float(), ret.float(), mask), backend, clip_eps=0.5), dtype)
    check(run_both((v, old, ret, mask.to(dtype)), backend, aggregation="seq-mean-token-mean"), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_integer_mask_is_taken_as_its_weights(backend):
    v, old, ret, mask = make_inputs((4, 33), torch.float32)
    want = rlhf_fast.value_loss(v, old, ret, mask, backend=backend, aggregation="seq-mean-token-mean")
    for dtype in (torch.int64, torch.int32, torch.uint8):
        got = rlhf_fast.value_loss(v, old, ret, mask.to(dtype), backend=backend, aggregation="seq-mean-token-mean")
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1]["explained_variance"], want[1]["explained_variance"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_rows_and_strided_inputs(backend):
    """Several tiles per row on every backend, a large offset in the returns (the moments are merged
    across tiles), a column slice and an expanded mask."""
    v, old, _, _ = make_inputs((3, 9001), torch.float32, seed_garbage=False, offset=300.0)
    ret = (old + torch.randn(3, 9002)[:, 1:])
    mask = (torch.rand(1, 9001) < 0.7).expand(3, 9001)
    for aggregation in ("token-mean", "seq-mean-token-sum"):
        check(run_both((v, old, ret, mask), backend, aggregation=aggregation), torch.float32,
              stats_tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_path_stats_detached(backend):
    v, old, ret, mask = make_inputs((3, 40), torch.float16)
    with torch.no_grad():
        loss_ng, stats_ng = rlhf_fast.value_loss(v, old, ret, mask, backend=backend)
    x, o, r = (t.clone().requires_grad_(True) for t in (v, old, ret))
    loss, stats = rlhf_fast.value_loss(x, o, r, mask, backend=backend)
    assert loss.requires_grad and not any(s.requires_grad for s in stats.values())
    assert torch.equal(loss.detach(), loss_ng) and all(torch.equal(stats[k], stats_ng[k]) for k in stats)
    loss.backward()
    assert x.grad is not None and o.grad is None and r.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_inputs(backend):
    check_empty_inputs(lambda *a: rlhf_fast.value_loss(*a, backend=backend))


def _args(**over):
    base = dict(values=torch.randn(2, 3), old_values=torch.randn(2, 3), returns=torch.randn(2, 3),
                mask=torch.ones(2, 3, dtype=torch.bool))
    base.update(over)
    return base


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (_args(values=torch.randn(6), old_values=torch.randn(6), returns=torch.randn(6), mask=torch.ones(6)),
         r"values: expected a 2-D \(B, T\) tensor"),
        (_args(old_values=torch.randn(2, 4)), r"old_values: expected shape \(2, 3\)"),
        (_args(returns=torch.randn(1, 3)), r"returns: expected shape \(2, 3\)"),
        (_args(mask=torch.ones(3, 2)), r"mask: expected shape \(2, 3\)"),
        (_args(values=torch.zeros(2, 3, dtype=torch.int64)), "values: expected dtype"),
        (_args(mask=torch.ones(2, 3, dtype=torch.complex64)), "mask: expected dtype"),
        (_args(returns=torch.randn(2, 3, device="meta")), "returns: expected a tensor on cpu"),
        (_args(clip_eps=0), "clip_eps: expected a finite number > 0"),
        (_args(clip_eps=float("nan")), "clip_eps: expected a finite number > 0"),
        (_args(aggregation="sum"), "aggregation: expected one of"),
        (_args(num_items=True), "num_items: expected an int >= 0"),
        (_args(norm_length=-3), "norm_length: expected an int > 0"),
    ],
)
def test_bad_input(kwargs, match):
    args = [kwargs.pop(k) for k in ("values", "old_values", "returns", "mask")]
    with pytest.raises(ValueError, match=match):
        rlhf_fast.value_loss(*args, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    v, old, ret, mask = make_inputs((4, 40), torch.float32, seed_garbage=False)
    # params: clip_eps, aggregation code, num_items (-1: none), norm_length (-1: T), need_grad
    for params, items in (([0.2, 0, -1, -1, 1], None), ([0.2, 1, -1, -1, 1], torch.tensor(3)),
                          ([0.5, 3, 6, 64, 1], None), ([0.2, 2, -1, -1, 0], None)):
        torch.library.opcheck(torch.ops.rlhf_fast.value_loss.default,
                              (v.clone().requires_grad_(params[-1] == 1), old, ret, mask, items, params, backend))
    torch.library.opcheck(torch.ops.rlhf_fast.value_loss.default,
                          (v.to(torch.float16).requires_grad_(True), old, ret, mask, None, [0.2, 0, -1, -1, 1],
                           backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_all_three_losses(backend):
    """The three RL losses together in one compiled graph, as a PPO step uses them."""
    v, old_v, ret, mask = make_inputs((3, 40), torch.float32, seed_garbage=False)
    lp = torch.randn(3, 40) - 1
    old_lp = lp + 0.2 * torch.randn(3, 40)
    ref_lp = lp + 0.2 * torch.randn(3, 40)
    adv = torch.randn(3, 40)

    def step(x, values):
        pl, ps = rlhf_fast.ppo_policy_loss(x, old_lp, adv, mask, backend=backend)
        kl = rlhf_fast.kl_penalty(x, ref_lp, estimator="k3", backend=backend)
        vl, vs = rlhf_fast.value_loss(values, old_v, ret, mask, clip_eps=0.3, backend=backend)
        return pl + 0.5 * vl + 0.05 * (kl * mask).sum() / mask.sum(), ps["clip_frac"], vs["explained_variance"]

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x1, x2 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    v1, v2 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    o1, o2 = compiled(x1, v1), step(x2, v2)
    o1[0].backward()
    o2[0].backward()
    for a, b, what in zip(o1, o2, ("loss", "clip_frac", "explained_variance"), strict=True):
        assert_close(a, b, what, **OUT_TOL)
    assert_close(x1.grad, x2.grad, "grad_logprobs", **GRAD_TOL[torch.float32])
    assert_close(v1.grad, v2.grad, "grad_values", **GRAD_TOL[torch.float32])


def test_reference_terms_gradient_matches_autograd():
    v, old, ret, mask = make_inputs((4, 60), torch.float32)
    x = v.clone().requires_grad_(True)
    t = value_loss_terms_ref(x, old, ret, mask, clip_eps=0.2)
    (auto,) = torch.autograd.grad(t["loss"].sum(), x)
    assert_close(t["grad"], auto, "grad", atol=1e-6, rtol=1e-6)
