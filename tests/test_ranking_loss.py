"""ranking_loss and pairwise_loss against the per-pair Python loop reference, for every backend that
runs here (torch, cpu, and triton under TRITON_INTERPRET=1): K from 2 to 9, ties, variable K,
margins, dtypes, gradients, extreme rewards, prompts without pairs, bad inputs, opcheck, compile."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close, check_under_cpu_capability

import rlhf_fast
from rlhf_fast.reference import ranking_loss_backward_ref, ranking_loss_loop_ref, ranking_loss_ref

VARIANTS = ["ordered", "ranks_with_ties", "variable_k", "margin", "margin_per_prompt"]


def make_case(n_prompts, k, variant, dtype=torch.float32, *, scale=2.0, seed=0):
    """rewards (P, K) and the keyword arguments of one variant. Ranks are drawn in [0, n_p) for the
    candidates in use, so ties are frequent; variable K covers 0, 1 and K candidates."""
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(n_prompts, k, generator=g) * scale).to(dtype)
    kwargs = {}
    n = torch.full((n_prompts,), k)
    if variant in ("variable_k", "margin_per_prompt"):
        n = torch.randint(0, k + 1, (n_prompts,), generator=g)
        n[0] = k
        if n_prompts > 2:
            n[1], n[2] = 0, 1
        kwargs["num_candidates"] = n
    if variant in ("ranks_with_ties", "variable_k", "margin_per_prompt"):
        u = torch.rand(n_prompts, k, generator=g)
        kwargs["ranks"] = (u * n.clamp(min=1).unsqueeze(1)).long().clamp(max=k - 1)
    if variant == "margin":
        kwargs["margin"] = 0.5
    if variant == "margin_per_prompt":
        kwargs["margin"] = torch.rand(n_prompts, generator=g)
    return rewards, kwargs


def run_both(rewards, kwargs, backend, grad_scale=0.7):
    """(loss, stats, grad) of the op and of the loop reference, with a non-unit upstream gradient. The
    reference runs in fp32 on the same (rounded) rewards: its gradient is the exact one, which ours
    must match to one rounding of the rewards' dtype."""
    x = rewards.detach().clone().requires_grad_(True)
    loss, stats = rlhf_fast.ranking_loss(x, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss * grad_scale, x)
    xr = rewards.detach().float().requires_grad_(True)
    loss_r, acc_r, margin_r, counts_r = ranking_loss_loop_ref(xr, **kwargs)
    (grad_r,) = torch.autograd.grad(loss_r * grad_scale, xr, allow_unused=True)
    return (loss, stats, grad), (loss_r, (acc_r, counts_r[0], margin_r), grad_r)


def check(ours, ref, dtype):
    (loss, stats, grad), (loss_r, (acc_r, pairs_r, margin_r), grad_r) = ours, ref
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == dtype
    assert_close(loss, loss_r, "loss", **OUT_TOL)
    assert_close(stats.accuracy, acc_r, "accuracy", **OUT_TOL)
    assert int(stats.num_pairs) == int(pairs_r)
    assert_close(stats.mean_margin, margin_r, "mean_margin", atol=1e-4, rtol=1e-4)
    assert_close(grad, grad_r, "grad_rewards", **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", range(2, 10))
def test_matches_loop_reference(backend, variant, k):
    rewards, kwargs = make_case(11, k, variant, seed=k)
    check(*run_both(rewards, kwargs, backend), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_dtypes(backend, dtype, variant):
    rewards, kwargs = make_case(23, 9, variant, dtype, seed=1)
    check(*run_both(rewards, kwargs, backend), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_instructgpt_batch(backend):
    """P = 300 prompts with K in [4, 9] answers each, ranked with ties."""
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(300, 9, generator=g)
    n = torch.randint(4, 10, (300,), generator=g)
    ranks = (torch.rand(300, 9, generator=g) * n.unsqueeze(1)).long()
    loss, stats = rlhf_fast.ranking_loss(rewards, num_candidates=n, ranks=ranks, backend=backend)
    loss_r, acc_r, margin_r, counts_r = ranking_loss_ref(rewards, num_candidates=n, ranks=ranks)
    assert_close(loss, loss_r, "loss", **OUT_TOL)
    assert_close(stats.accuracy, acc_r, "accuracy", **OUT_TOL)
    assert_close(stats.mean_margin, margin_r, "mean_margin", atol=1e-4, rtol=1e-4)
    assert int(stats.num_pairs) == int(counts_r[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_rewards(backend, dtype):
    """Rewards of +-1e4: the stable softplus and sigmoid give a finite loss and gradient."""
    rewards, kwargs = make_case(8, 6, "ranks_with_ties", dtype, seed=3)
    rewards = (rewards.float().sign() * 1e4).to(dtype)
    rewards[0] = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0, 5.0]).to(dtype)
    (loss, stats, grad), ref = run_both(rewards, kwargs, backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(stats.mean_margin)
    assert loss > 1e3  # pairs ranked against the scores pay ~2e4 each
    check((loss, stats, grad), ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prompts_without_pairs(backend):
    """All ties and num_candidates < 2 form no pair: excluded from the mean; a batch without any pair
    gives loss 0, num_pairs 0 and a zero (not NaN) gradient."""
    rewards = torch.randn(4, 5)
    ranks = torch.randint(0, 5, (4, 5))
    ranks[1] = 2  # all ties
    ranks[2, 0] = 0  # the single candidate of prompt 2 (prompt 3 has none: its ranks are not read)
    n = torch.tensor([5, 5, 1, 0])
    (loss, stats, grad), ref = run_both(rewards, dict(num_candidates=n, ranks=ranks), backend)
    check((loss, stats, grad), ref, torch.float32)
    only_first, _ = rlhf_fast.ranking_loss(rewards[:1], ranks=ranks[:1], backend=backend)
    assert_close(loss, only_first, "loss equals that of the only ranked prompt", **OUT_TOL)
    assert (grad[1:] == 0).all()
    for kwargs in (dict(ranks=torch.zeros(4, 5, dtype=torch.long)), dict(num_candidates=torch.tensor([1, 0, 1, 0]))):
        x = rewards.clone().requires_grad_(True)
        loss, stats = rlhf_fast.ranking_loss(x, backend=backend, **kwargs)
        loss.backward()
        assert loss == 0 and int(stats.num_pairs) == 0 and stats.accuracy == 0 and stats.mean_margin == 0
        assert (x.grad == 0).all()
    x = torch.randn(0, 4, requires_grad=True)
    loss, stats = rlhf_fast.ranking_loss(x, backend=backend)
    loss.backward()
    assert loss == 0 and x.grad.shape == (0, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_is_never_read(backend):
    rewards, kwargs = make_case(9, 7, "variable_k", seed=4)
    n = kwargs["num_candidates"]
    pad = torch.arange(7).unsqueeze(0) >= n.unsqueeze(1)
    dirty = rewards.clone()
    dirty[pad] = float("nan")
    ranks = kwargs["ranks"].clone()
    ranks[pad] = -5  # padding ranks are not checked either
    (loss, stats, grad), _ = run_both(dirty, dict(kwargs, ranks=ranks), backend)
    (loss_c, stats_c, grad_c), _ = run_both(rewards, kwargs, backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, loss_c, "loss", **OUT_TOL)
    assert_close(grad, grad_c, "grad_rewards", **GRAD_TOL[torch.float32])
    assert (grad[pad] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int32_indices_and_caller_tensors(backend):
    rewards, kwargs = make_case(6, 5, "variable_k", seed=5)
    before = {k: v.clone() for k, v in kwargs.items()}
    r_before = rewards.clone()
    a, _ = rlhf_fast.ranking_loss(rewards, backend=backend, **kwargs)
    b, _ = rlhf_fast.ranking_loss(rewards, backend=backend,
                                  **{k: v.int() for k, v in kwargs.items()})
    assert torch.equal(a, b)
    assert torch.equal(rewards, r_before) and all(torch.equal(kwargs[k], before[k]) for k in kwargs)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_many_candidates(backend):
    """K = 80 (past Triton's register tile, which refuses it with a reason)."""
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} not available")
    rewards, kwargs = make_case(3, 80, "ranks_with_ties", seed=6)
    check(*run_both(rewards, kwargs, backend), torch.float32)


def test_triton_refuses_large_k():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not available")
    with pytest.raises(ValueError, match=r"backend 'triton' .* K <= 64, got K = 65"):
        rlhf_fast.ranking_loss(torch.randn(2, 65), backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_backward_matches_autograd(dtype):
    for variant in VARIANTS:
        rewards, kwargs = make_case(10, 6, variant, dtype, seed=7)
        x = rewards.clone().requires_grad_(True)
        loss, _, _, counts = ranking_loss_ref(x, **kwargs)
        (auto,) = torch.autograd.grad(loss * 1.3, x)
        manual = ranking_loss_backward_ref(torch.tensor(1.3), rewards, kwargs.get("num_candidates"),
                                           kwargs.get("ranks"), kwargs.get("margin", 0.0), counts[1])
        assert manual.dtype == dtype
        assert_close(manual, auto, f"grad ({variant})", **GRAD_TOL[dtype])


# ---------------------------------------------------------------------------------------------
# pairwise_loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin", [None, 0.3, "per_pair"])
def test_pairwise(backend, dtype, margin):
    g = torch.Generator().manual_seed(8)
    chosen = (torch.randn(37, generator=g) * 3).to(dtype)
    rejected = (torch.randn(37, generator=g) * 3).to(dtype)
    m = torch.rand(37, generator=g) if margin == "per_pair" else margin
    c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    loss, stats = rlhf_fast.pairwise_loss(c, r, margin=m, backend=backend)
    (loss * 0.5).backward()
    cr, rr = chosen.float().requires_grad_(True), rejected.float().requires_grad_(True)
    diff = cr - rr
    expected = torch.nn.functional.softplus(-(diff - (0.0 if m is None else m))).mean()
    (expected * 0.5).backward()
    assert_close(loss, expected, "loss", **OUT_TOL)
    assert_close(stats.accuracy, (diff > 0).float().mean(), "accuracy", **OUT_TOL)
    assert_close(stats.mean_margin, diff.mean(), "mean_margin", atol=1e-5, rtol=1e-5)
    assert int(stats.num_pairs) == 37
    assert c.grad.dtype == dtype and r.grad.dtype == dtype
    assert_close(c.grad, cr.grad, "grad_chosen", **GRAD_TOL[dtype])
    assert_close(r.grad, rr.grad, "grad_rejected", **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pairwise_is_ranking_with_two_candidates(backend):
    chosen, rejected = torch.randn(5, 1) * 1e4, torch.randn(5, 1) * 1e4  # (P, 1), as reward heads emit
    margin = torch.rand(5, 1)
    c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    loss, stats = rlhf_fast.pairwise_loss(c, r, margin=margin, backend=backend)
    loss.backward()
    assert c.grad.shape == (5, 1) and torch.isfinite(c.grad).all()
    x = torch.cat([chosen, rejected], 1).requires_grad_(True)
    loss_k, stats_k = rlhf_fast.ranking_loss(x, margin=margin.view(-1), backend=backend)
    loss_k.backward()
    assert_close(loss, loss_k, "loss", **OUT_TOL)
    assert_close(c.grad, x.grad[:, :1], "grad_chosen", **GRAD_TOL[torch.float32])
    assert_close(r.grad, x.grad[:, 1:], "grad_rejected", **GRAD_TOL[torch.float32])
    mixed, _ = rlhf_fast.pairwise_loss(chosen.bfloat16(), rejected, backend=backend)  # promoted to float32
    assert mixed.dtype == torch.float32
    empty, _ = rlhf_fast.pairwise_loss(torch.zeros(0), torch.zeros(0), backend=backend)
    assert empty == 0


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------

REW = torch.randn(3, 4)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((REW[0],), {}, r"rewards: expected a 2-D \(P, K\) tensor"),
        ((REW.long(),), {}, "rewards: expected a floating-point tensor"),
        (([[1.0, 2.0]],), {}, "rewards: expected a torch.Tensor"),
        ((REW,), dict(num_candidates=torch.tensor([1, 2])), r"num_candidates: expected shape \(3,\)"),
        ((REW,), dict(num_candidates=torch.tensor([1.0, 2.0, 3.0])), "num_candidates: expected dtype in"),
        ((REW,), dict(num_candidates=torch.tensor([1, 2, 3], device="meta")), "num_candidates: expected a tensor on"),
        ((REW,), dict(ranks=torch.zeros(3, 5, dtype=torch.long)), r"ranks: expected shape \(3, 4\)"),
        ((REW,), dict(ranks=torch.zeros(3, 4)), "ranks: expected dtype in"),
        ((REW,), dict(margin=torch.zeros(4)), r"margin: expected shape \(3,\)"),
        ((REW,), dict(margin=torch.zeros(3, dtype=torch.long)), "margin: expected a floating-point tensor"),
        ((REW,), dict(margin=float("inf")), "margin: expected a finite number"),
        ((REW,), dict(margin="big"), "margin: expected a float or a tensor"),
        ((REW,), dict(margin=True), "margin: expected a float or a tensor"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rlhf_fast.ranking_loss(*args, **kwargs)


@pytest.mark.parametrize(
    "chosen, rejected, margin, match",
    [
        (torch.randn(3), torch.randn(4), None, r"rejected: expected shape \(3,\)"),
        (torch.randn(3), torch.randint(0, 2, (3,)), None, "rejected: expected a floating-point tensor"),
        (torch.randn(3), torch.randn(3, device="meta"), None, "rejected: expected a tensor on cpu"),
        (torch.randn(3), torch.randn(3), torch.randn(2), r"margin: expected shape \(3,\)"),
        ((1.0, 2.0), torch.randn(2), None, "chosen: expected a torch.Tensor"),
    ],
)
def test_pairwise_bad_input(chosen, rejected, margin, match):
    with pytest.raises(ValueError, match=match):
        rlhf_fast.pairwise_loss(chosen, rejected, margin=margin)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [0, 1])
def test_fewer_than_two_answers_raise(backend, k):
    """One answer per prompt (a (P, 1) reward head's output passed as rewards) forms no pair: an error
    naming rewards, not a loss of 0 that trains nothing."""
    with pytest.raises(ValueError, match=rf"rewards: expected at least 2 answers per prompt .*got shape \(3, {k}\)"):
        rlhf_fast.ranking_loss(torch.randn(3, k), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_candidates=torch.tensor([4, -1, 2])),
         r"num_candidates: expected values in \[0, 4\] .*got -1 at position 1"),
        (dict(num_candidates=torch.tensor([4, 2, 5])),
         r"num_candidates: expected values in \[0, 4\] .*got 5 at position 2"),
        (dict(ranks=torch.tensor([[0, 1, 2, 3], [0, -1, 0, 0], [0, 0, 0, 0]])),
         r"ranks: expected values in \[0, 4\) for the 4 candidates of prompt 1, got -1 at \(1, 1\)"),
        (dict(ranks=torch.tensor([[0, 1, 2, 4], [0, 0, 0, 0], [0, 0, 0, 0]])),
         r"ranks: expected values in \[0, 4\) for the 4 candidates of prompt 0, got 4 at \(0, 3\)"),
        (dict(num_candidates=torch.tensor([4, 2, 0]), ranks=torch.tensor([[0, 1, 2, 3], [0, 2, 0, 0], [9, 9, 9, 9]])),
         r"ranks: expected values in \[0, 2\) for the 2 candidates of prompt 1, got 2 at \(1, 1\)"),
    ],
)
def test_values_out_of_range(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rlhf_fast.ranking_loss(REW, backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    rewards, kwargs = make_case(7, 5, "margin_per_prompt", seed=9)
    x = rewards.requires_grad_(True)
    n, ranks, margins = kwargs["num_candidates"], kwargs["ranks"], kwargs["margin"]
    for args in ((x, n, ranks, margins, 0.1, backend), (x, None, None, None, 0.0, backend)):
        torch.library.opcheck(torch.ops.rlhf_fast.ranking_loss.default, args)
    loss, _, _, counts = torch.ops.rlhf_fast.ranking_loss(x.detach(), n, ranks, margins, 0.1, backend)
    torch.library.opcheck(torch.ops.rlhf_fast.ranking_loss_backward.default,
                          (torch.tensor(0.7), x.detach(), n, ranks, margins, 0.1, counts, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    rewards, kwargs = make_case(9, 6, "margin_per_prompt", seed=10)
    chosen, rejected = torch.randn(9), torch.randn(9)

    def rm_loss(r, n, ranks, margin, c, j):
        loss, stats = rlhf_fast.ranking_loss(r, num_candidates=n, ranks=ranks, margin=margin, backend=backend)
        pair, pair_stats = rlhf_fast.pairwise_loss(c, j, margin=0.2, backend=backend)
        return loss + pair, stats.accuracy + pair_stats.accuracy, stats.num_pairs

    compiled = torch.compile(rm_loss, fullgraph=True, backend="inductor")
    outs = []
    for fn in (compiled, rm_loss):
        x, c, j = (t.clone().requires_grad_(True) for t in (rewards, chosen, rejected))
        loss, acc, pairs = fn(x, kwargs["num_candidates"], kwargs["ranks"], kwargs["margin"], c, j)
        loss.backward()
        outs.append((loss, acc, pairs, x.grad, c.grad))
    for a, b, what in zip(outs[0], outs[1], ("loss", "accuracy", "pairs", "grad", "grad_chosen"), strict=True):
        assert_close(a, b, what, **OUT_TOL)


CAPABILITY_CHECK = r"""
import torch, rlhf_fast
from rlhf_fast.reference import ranking_loss_ref
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for k in (2, 5, 9):
        r = torch.randn(33, k).to(dtype)
        n = torch.randint(0, k + 1, (33,))
        ranks = (torch.rand(33, k) * n.clamp(min=1)[:, None]).long()
        x = r.clone().requires_grad_(True)
        loss, stats = rlhf_fast.ranking_loss(x, num_candidates=n, ranks=ranks, margin=0.1, backend="cpu")
        loss.backward()
        xr = r.clone().requires_grad_(True)
        lr, acc, mm, counts = ranking_loss_ref(xr, num_candidates=n, ranks=ranks, margin=0.1)
        lr.backward()
        assert torch.allclose(loss, lr, atol=5e-5, rtol=5e-5), (dtype, k)
        assert torch.allclose(x.grad.float(), xr.grad.float(), atol=1e-5, rtol=1.6e-2), (dtype, k)
        assert int(stats.num_pairs) == int(counts[0])
print("ok")
"""


@pytest.mark.skipif(not rlhf_fast.has_native(), reason="native extension not built")
@pytest.mark.parametrize("cap", ["AVX2", "DEFAULT"])
def test_other_simd_builds(cap):
    """The AVX2 and scalar-fallback builds of the CPU kernels (selected like ATen's own kernels)."""
    check_under_cpu_capability(cap, CAPABILITY_CHECK)
