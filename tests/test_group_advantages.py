"""group_advantages against the reference for every backend that runs here (torch, and triton under
TRITON_INTERPRET=1), against hand-computed values and the formulas of TRL and verl; masks, dropped and
non-finite scores, constant and one-answer groups, flat scores with group ids, extreme scores, bad
inputs, opcheck and torch.compile."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, assert_close

import rlhf_fast
from rlhf_fast.ops.group_advantages import OP
from rlhf_fast.reference import ADVANTAGE_ALLOWED_SCALES, ADVANTAGE_MODES, group_advantages_ref

BACKENDS = [b for b in CPU_BACKENDS if b in OP.impls]
# every (mode, scale) the op accepts, scale None included (the mode's own)
MODE_SCALES = [(m, s) for m in ADVANTAGE_MODES for s in (None,) + ADVANTAGE_ALLOWED_SCALES[m]]
SHAPES = [(1, 1), (3, 4), (41, 7), (130, 16), (5, 300)]
TOL = dict(atol=2e-5, rtol=2e-5)


def make_scores(shape, dtype=torch.float32, *, drop=0.2, ties=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g) * 3
    if ties and shape[0] > 1:
        scores[0] = 0.5            # a constant group
        scores[1, ::2] = 1.0       # repeated values inside a group
    if ties:
        scores = scores.round(decimals=1)  # rewards are often coarse (0/1, rubric points)
    mask = torch.rand(shape, generator=g) >= drop
    return scores.to(dtype), mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("mode", "scale"), MODE_SCALES)
def test_matches_reference(backend, dtype, mode, scale):
    for shape in SHAPES:
        scores, mask = make_scores(shape, dtype)
        for m in (None, mask):
            got = rlhf_fast.group_advantages(scores, mode=mode, scale=scale, mask=m, backend=backend)
            want = group_advantages_ref(scores, mode=mode, scale=scale, mask=m)
            assert got.dtype == torch.float32 and got.shape == scores.shape
            assert_close(got, want, f"{backend} {mode}/{scale} {shape} mask={m is not None}", **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_values(backend):
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.0, 1.0, 7.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    run = lambda **kw: rlhf_fast.group_advantages(scores, mask=mask, backend=backend, **kw)
    std = math.sqrt(5 / 3)          # unbiased std of 1, 2, 3, 4
    centered = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [0, 0, 0, 0], [-0.5, 0.5, 0, 0]])
    std2 = math.sqrt(0.5)           # unbiased std of 0, 1
    group_std = torch.tensor([[std], [1.0], [std2]])
    assert_close(run(mode="grpo"), centered / (group_std + 1e-4), "grpo", **TOL)
    assert_close(run(mode="dr_grpo"), centered, "dr_grpo", **TOL)
    assert_close(run(mode="grpo", scale="none"), centered, "grpo none", **TOL)
    valid = torch.tensor([1.0, 2, 3, 4, 5, 5, 5, 5, 0, 1])
    assert_close(run(mode="grpo", scale="batch"), centered / (valid.std() + 1e-4), "grpo batch", **TOL)
    # leave-one-out: 1 - mean(2, 3, 4) = -2, ...; 0 - 1 = -1 in the two-answer group
    rloo = torch.tensor([[-2.0, -2 / 3, 2 / 3, 2.0], [0, 0, 0, 0], [-1.0, 1.0, 0, 0]])
    assert_close(run(mode="rloo"), rloo, "rloo", **TOL)
    flat = rloo[mask]
    assert_close(run(mode="rloo", scale="batch")[mask], (flat - flat.mean()) / (flat.std() + 1e-4), "rloo batch",
                 **TOL)
    assert_close(run(mode="reinforce_pp")[mask], (valid - valid.mean()) / (valid.std() + 1e-4), "reinforce_pp",
                 **TOL)
    base = centered[mask]
    assert_close(run(mode="reinforce_pp_baseline")[mask], (base - base.mean()) / (base.std() + 1e-4),
                 "reinforce_pp_baseline", **TOL)
    for mode in ADVANTAGE_MODES:
        assert torch.equal(run(mode=mode)[~mask], torch.zeros(2)), f"{mode}: a dropped answer must get 0"


def _trl_grpo(rewards, k, scale_rewards):
    """TRLs GRPOTrainer._generate_and_score_completions (sum_then_normalize), NaN = unscorable."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)  # TRL forces the unscorable completions' advantage to 0


def _trl_rloo(rewards, k, normalize):
    """TRL's RLOOTrainer advantage computation, NaN = unscorable."""
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, k)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    adv = rewards - baselines
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_trl(backend):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(1)
    p, k = 64, 8
    scores = torch.randn(p, k, generator=g, dtype=torch.float64)
    mask = torch.rand(p, k, generator=g) > 0.2
    mask[:, :2] = True  # every group keeps two distinct answers (where TRL and we agree by design)
    nan_scores = torch.where(mask, scores, float("nan"))
    for scale in ("group", "batch", "none"):
        want = _trl_grpo(nan_scores.reshape(-1), k, scale).view(p, k)
        got = rlhf_fast.group_advantages(scores.float(), mode="grpo", scale=scale, mask=mask, backend=backend)
        assert_close(got, want, f"TRL grpo scale_rewards={scale}", **TOL)
        # TRL marks unscorable completions with NaN scores: the same answers dropped
        got_nan = rlhf_fast.group_advantages(nan_scores.float(), mode="grpo", scale=scale, backend=backend)
        assert torch.equal(got_nan, got)
    for normalize in (False, True):
        want = _trl_rloo(nan_scores.reshape(-1), k, normalize).view(p, k)
        got = rlhf_fast.group_advantages(scores.float(), mode="rloo", scale="batch" if normalize else "none",
                                         mask=mask, backend=backend)
        assert_close(got, want, f"TRL rloo normalize_advantages={normalize}", **TOL)


def _verl(scores, index, mode, epsilon=1e-6):
    """verl core_algos.compute_grpo_outcome_advantage / compute_rloo_outcome_advantage / the Dr. GRPO variant
    (norm_adv_by_std_in_grpo=False), on one score per response."""
    groups = defaultdict(list)
    for i, idx in enumerate(index):
        groups[idx].append(scores[i])
    out = scores.clone()
    for i, idx in enumerate(index):
        g = torch.stack(groups[idx])
        n = len(groups[idx])
        if mode == "grpo":
            out[i] = (scores[i] - g.mean()) / (g.std() + epsilon)
        elif mode == "dr_grpo":
            out[i] = scores[i] - g.mean()
        else:
            out[i] = scores[i] * n / (n - 1) - g.mean() * n / (n - 1)
    return out


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_matches_verl_with_group_ids(mode):
    g = torch.Generator().manual_seed(2)
    sizes = torch.randint(2, 9, (40,), generator=g)  # groups of 2..8 answers, shuffled together
    ids = torch.repeat_interleave(torch.arange(40) * 7 + 3, sizes)
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    scores = torch.randn(ids.numel(), generator=g, dtype=torch.float64)
    want = _verl(scores, ids.tolist(), mode)
    got = rlhf_fast.group_advantages(scores.float(), mode=mode, group_ids=ids, eps=1e-6)
    assert_close(got, want, f"verl {mode}", **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_ids_equal_the_rows(backend):
    scores, mask = make_scores((37, 6))
    perm = torch.randperm(scores.numel())
    ids = torch.arange(37).repeat_interleave(6)
    for mode, scale in MODE_SCALES:
        rows = rlhf_fast.group_advantages(scores, mode=mode, scale=scale, mask=mask, backend=backend)
        flat = rlhf_fast.group_advantages(scores.reshape(-1)[perm], mode=mode, scale=scale,
                                          mask=mask.reshape(-1)[perm], group_ids=ids[perm].int())
        assert_close(flat, rows.reshape(-1)[perm], f"{mode}/{scale}: group_ids", **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("mode", "scale"), MODE_SCALES)
def test_constant_and_single_answer_groups_give_zero(backend, mode, scale):
    scores = torch.tensor([[0.1, 0.1, 0.1, 0.1], [3.0, -1.0, 2.0, 9.0], [7.0, 7.0, 7.0, 7.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    for eps in (1e-4, 0.0):
        got = rlhf_fast.group_advantages(scores, mode=mode, scale=scale, mask=mask, eps=eps, backend=backend)
        assert torch.isfinite(got).all(), f"{mode}/{scale} eps={eps}: {got}"
        if mode != "reinforce_pp":  # no groups there: the batch is whitened as a whole
            assert torch.equal(got, torch.zeros_like(got)), f"{mode}/{scale} eps={eps}: {got}"
        # all answers of the batch equal: every mode, reinforce_pp too, gives 0
        same = rlhf_fast.group_advantages(torch.full((3, 5), 0.3), mode=mode, scale=scale, eps=eps, backend=backend)
        assert torch.equal(same, torch.zeros(3, 5)), f"{mode}/{scale} eps={eps}: {same}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_scores_are_dropped(backend):
    scores, mask = make_scores((20, 8), drop=0.0)
    bad = torch.zeros(20, 8, dtype=torch.bool)
    bad[::3, 1] = True
    bad[1::4, 5] = True
    poisoned = scores.clone()
    poisoned[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(20)[: int(bad.sum())]
    for mode, scale in MODE_SCALES:
        got = rlhf_fast.group_advantages(poisoned, mode=mode, scale=scale, backend=backend)
        want = rlhf_fast.group_advantages(scores, mode=mode, scale=scale, mask=~bad, backend=backend)
        assert torch.equal(got, want), f"{mode}/{scale}"
        # a masked answer's score is never read: NaN there changes nothing
        assert torch.equal(rlhf_fast.group_advantages(poisoned, mode=mode, scale=scale, mask=~bad, backend=backend),
                           want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e20, 3e38])
def test_extreme_scores_stay_finite(backend, magnitude):
    g = torch.Generator().manual_seed(3)
    scores = (torch.rand(16, 8, generator=g) - 0.5) * 2 * magnitude
    for mode, scale in MODE_SCALES:
        if scale in ("none",) or (scale is None and mode in ("dr_grpo", "rloo")):
            if magnitude > 1e38:
                continue  # unscaled advantages r - mean are of the scores' magnitude: past fp32's range
        got = rlhf_fast.group_advantages(scores, mode=mode, scale=scale, backend=backend)
        assert torch.isfinite(got).all(), f"{mode}/{scale} at {magnitude}"
        assert_close(got, group_advantages_ref(scores, mode=mode, scale=scale), f"{mode}/{scale} at {magnitude}",
                     atol=2e-5 if magnitude > 1 or scale != "none" else 0, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_caller_tensors_untouched(backend):
    for shape in ((0, 4), (3, 0)):
        got = rlhf_fast.group_advantages(torch.randn(shape), backend=backend)
        assert got.shape == shape and got.dtype == torch.float32
    scores, mask = make_scores((9, 5), torch.bfloat16)
    scores.requires_grad_(True)
    keep_s, keep_m = scores.detach().clone(), mask.clone()
    out = rlhf_fast.group_advantages(scores, mask=mask, mode="reinforce_pp", backend=backend)
    assert not out.requires_grad
    assert torch.equal(scores.detach(), keep_s) and torch.equal(mask, keep_m)
    out.add_(1.0)  # the result is a fresh tensor
    assert torch.equal(scores.detach(), keep_s)
    numeric = rlhf_fast.group_advantages(scores, mask=mask.float(), backend=backend)  # nonzero = valid
    assert torch.equal(numeric, rlhf_fast.group_advantages(scores, mask=mask, backend=backend))


def test_triton_takes_the_rows_layout_only():
    if "triton" not in BACKENDS:
        pytest.skip("triton does not run here")
    scores = torch.randn(12)
    ids = torch.arange(12) // 4
    with pytest.raises(ValueError, match="group_ids run on the torch backend"):
        rlhf_fast.group_advantages(scores, group_ids=ids, backend="triton")
    with pytest.raises(ValueError, match="K <= 4096"):
        rlhf_fast.group_advantages(torch.randn(1, 4097), backend="triton")
    assert rlhf_fast.select_backend("group_advantages", scores) == "torch"


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(scores=[1.0, 2.0]), "scores: expected a torch.Tensor"),
    (dict(scores=torch.ones(2, 3, dtype=torch.int64)), r"scores: expected dtype in"),
    (dict(scores=torch.ones(6)), r"scores: expected a 2-D \(P, K\) tensor"),
    (dict(scores=torch.ones(2, 3, 1)), r"scores: expected a 2-D"),
    (dict(scores=torch.ones(2, 3), mode="ppo"), r"mode: expected one of .*got 'ppo'"),
    (dict(scores=torch.ones(2, 3), scale="prompt"), r"scale: expected one of .*got 'prompt'"),
    (dict(scores=torch.ones(2, 3), mode="dr_grpo", scale="group"), r"scale: mode='dr_grpo' accepts \('none',\)"),
    (dict(scores=torch.ones(2, 3), mode="rloo", scale="group"), r"scale: mode='rloo' accepts"),
    (dict(scores=torch.ones(2, 3), mode="reinforce_pp", scale="group"), r"scale: mode='reinforce_pp' accepts"),
    (dict(scores=torch.ones(2, 3), eps=-1.0), r"eps: expected a finite number >= 0, got -1.0"),
    (dict(scores=torch.ones(2, 3), eps=float("nan")), r"eps: expected a finite number >= 0"),
    (dict(scores=torch.ones(2, 3), eps="small"), r"eps: expected a finite number >= 0, got 'small'"),
    (dict(scores=torch.ones(2, 3), mask=torch.ones(3, 2, dtype=torch.bool)),
     r"mask: expected shape \(2, 3\) \(scores.shape\), got \(3, 2\)"),
    (dict(scores=torch.ones(2, 3), mask=[[True] * 3] * 2), "mask: expected a torch.Tensor"),
    (dict(scores=torch.ones(6), group_ids=torch.zeros(5, dtype=torch.int64)),
     r"group_ids: expected shape \(6,\) \(scores.shape\), got \(5,\)"),
    (dict(scores=torch.ones(6), group_ids=torch.zeros(6)), r"group_ids: expected dtype in \(int32, int64\)"),
    (dict(scores=torch.ones(2, 3), group_ids=torch.zeros(6, dtype=torch.int64)),
     r"scores: expected a 1-D \(N,\) tensor with group_ids, got shape \(2, 3\)"),
    (dict(scores=torch.ones(2, 3), backend="cuda"), r"group_advantages: backend 'cuda' .* cannot run"),
])
def test_bad_input(kwargs, match):
    scores = kwargs.pop("scores")
    with pytest.raises(ValueError, match=match):
        rlhf_fast.group_advantages(scores, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    scores, mask = make_scores((6, 5))
    op = torch.ops.rlhf_fast.group_advantages.default
    for mode, scale in [("grpo", "group"), ("grpo", "batch"), ("rloo", "none"), ("reinforce_pp", "batch")]:
        torch.library.opcheck(op, (scores, mask, None, mode, scale, 1e-4, backend))
        torch.library.opcheck(op, (scores.to(torch.bfloat16), None, None, mode, scale, 1e-6, backend))
    if backend == "torch":
        ids = torch.arange(30) % 7
        torch.library.opcheck(op, (scores.reshape(-1), mask.reshape(-1), ids, "grpo", "group", 1e-4, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    scores, mask = make_scores((8, 4))
    logprobs = torch.randn(8, 4, requires_grad=True)

    def loss_fn(s, lp):  # a REINFORCE-style surrogate on the advantages
        adv = rlhf_fast.group_advantages(s, mode="grpo", mask=mask, backend=backend)
        return -(adv * lp).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    lp1, lp2 = logprobs.detach().clone().requires_grad_(True), logprobs.detach().clone().requires_grad_(True)
    l1, l2 = compiled(scores, lp1), loss_fn(scores, lp2)
    l1.backward()
    l2.backward()
    assert_close(l1, l2, "loss", **TOL)
    assert_close(lp1.grad, lp2.grad, "grad", **TOL)
