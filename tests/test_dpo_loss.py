"""dpo_loss against the reference (loss, statistics and both gradients) for every loss type, against
TRL's DPOTrainer formulas and hand-computed values; awkward shapes, fp32/bf16/fp16 and mixed dtypes,
lengths, extreme log-ratios, empty batches, bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS
from helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close

import rlhf_fast
from rlhf_fast.ops.dpo_loss import LOSS_CODES, OP
from rlhf_fast.reference import DPO_LOSS_TYPES, dpo_loss_dlogits_ref, dpo_loss_ref

BACKENDS = [b for b in CPU_BACKENDS if b in OP.impls]
# (loss_type, label_smoothing, with lengths)
CONFIGS = [("sigmoid", 0.0, False), ("sigmoid", 0.1, False), ("ipo", 0.0, False), ("ipo", 0.0, True),
           ("hinge", 0.0, False), ("robust", 0.0, False), ("robust", 0.25, False), ("sigmoid_norm", 0.0, True)]
SIZES = [1, 3, 37, 1000]


def make_inputs(p, dtype=torch.float32, *, scale=30.0, seed=0):
    """Sequence log-probs as a model gives them: negative sums of tens to hundreds of tokens."""
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(p, generator=g) * 10 * scale
    logps = [(base + torch.randn(p, generator=g) * scale * 0.1).to(dtype) for _ in range(4)]
    lengths = (torch.randint(0, 200, (p,), generator=g), torch.randint(1, 200, (p,), generator=g))
    return logps, lengths


def run_both(logps, lengths, loss_type, ls, use_lengths, backend, beta=0.1, grad_scale=1.0):
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=ls)
    if use_lengths:
        kw.update(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    a = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(logps)]
    b = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(logps)]
    loss, stats = rlhf_fast.dpo_loss(*a, backend=backend, **kw)
    want, want_stats = dpo_loss_ref(*b, **kw)
    (loss * grad_scale).backward()
    (want * grad_scale).backward()
    return (loss, stats, a), (want, want_stats, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("loss_type", "ls", "use_lengths"), CONFIGS)
def test_matches_reference(backend, dtype, loss_type, ls, use_lengths):
    for p in SIZES:
        logps, lengths = make_inputs(p, dtype)
        for beta, grad_scale in ((0.1, 1.0), (0.5, -2.5)):  # a non-unit upstream gradient too
            (loss, stats, a), (want, want_stats, b) = run_both(logps, lengths, loss_type, ls, use_lengths, backend,
                                                               beta, grad_scale)
            what = f"{loss_type} ls={ls} lengths={use_lengths} P={p} beta={beta}"
            assert loss.dtype == torch.float32 and loss.shape == ()
            assert_close(loss, want, f"{what}: loss", **OUT_TOL)
            for name in ("chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin"):
                assert_close(getattr(stats, name), want_stats[name], f"{what}: {name}", **OUT_TOL)
                assert getattr(stats, name).dtype == torch.float32 and not getattr(stats, name).requires_grad
            for i in (0, 1):
                assert a[i].grad.dtype == dtype
                assert_close(a[i].grad, b[i].grad, f"{what}: grad {i}", **GRAD_TOL[dtype])
            assert a[2].grad is None and a[3].grad is None  # the reference model's log-probs are data


def _trl_losses(pc, pr, rc, rr, beta, loss_type, ls, len_c=None, len_r=None):
    """The per-sequence losses of TRL's DPOTrainer (1.x, f_divergence_type='reverse_kl') for ls = 0, and of
    TRL 0.x's dpo_loss for sigmoid label smoothing, as TRL writes them."""
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":  # 0.x: (-logsigmoid(beta*logits) * (1 - ls) - logsigmoid(-beta*logits) * ls)
        return -F.logsigmoid(beta * delta_score) * (1 - ls) - F.logsigmoid(-beta * delta_score) * ls
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "ipo":
        if len_c is None:  # the IPO paper / TRL 0.x: (logits - 1 / (2 * beta)) ** 2
            return (delta_score - 1 / (2 * beta)) ** 2
        ipo_delta = chosen_logratios / len_c.clamp(min=1.0) - rejected_logratios / len_r.clamp(min=1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean_loss_term = -(1 - ls) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -ls * F.logsigmoid(-beta * delta_score)
        return (clean_loss_term - flipped_loss_term) / (1 - 2 * ls)
    if loss_type == "sigmoid_norm":
        delta = chosen_logratios / len_c.clamp(min=1.0) - rejected_logratios / len_r.clamp(min=1.0)
        return -F.logsigmoid(beta * delta)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss_type", "ls", "use_lengths"), CONFIGS)
def test_matches_trl_formulas(backend, loss_type, ls, use_lengths):
    logps, (len_c, len_r) = make_inputs(64, torch.float64)
    beta = 0.2
    per_seq = _trl_losses(*logps, beta, loss_type, ls, *((len_c.double(), len_r.double()) if use_lengths else ()))
    kw = dict(chosen_lengths=len_c, rejected_lengths=len_r) if use_lengths else {}
    loss, stats = rlhf_fast.dpo_loss(*(t.float() for t in logps), beta=beta, loss_type=loss_type, label_smoothing=ls,
                                     backend=backend, **kw)
    assert_close(loss, per_seq.mean(), f"TRL {loss_type}", **OUT_TOL)
    chosen, rejected = beta * (logps[0] - logps[2]), beta * (logps[1] - logps[3])  # TRL's rewards/* metrics
    assert_close(stats.chosen_rewards, chosen, "rewards/chosen", **OUT_TOL)
    assert_close(stats.rejected_rewards, rejected, "rewards/rejected", **OUT_TOL)
    assert_close(stats.reward_accuracy, (chosen > rejected).float().mean(), "rewards/accuracies", **OUT_TOL)
    assert_close(stats.reward_margin, (chosen - rejected).mean(), "rewards/margins", **OUT_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_values(backend):
    t = lambda *v: torch.tensor(v)
    # log-ratios: chosen +2 and rejected -1 (h = 3), then chosen 0 and rejected +1 (h = -1)
    pc, pr, rc, rr = t(-10.0, -5.0), t(-21.0, -6.0), t(-12.0, -5.0), t(-20.0, -7.0)
    run = lambda lt, **kw: rlhf_fast.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=lt, backend=backend, **kw)
    sp = lambda x: math.log1p(math.exp(x))  # softplus: -log sigmoid(x) = softplus(-x)
    loss, stats = run("sigmoid")
    assert_close(loss, torch.tensor((sp(-1.5) + sp(0.5)) / 2), "sigmoid")
    assert_close(stats.chosen_rewards, t(1.0, 0.0), "chosen rewards")
    assert_close(stats.rejected_rewards, t(-0.5, 0.5), "rejected rewards")
    assert_close(stats.reward_accuracy, torch.tensor(0.5), "accuracy")
    assert_close(stats.reward_margin, torch.tensor((1.5 - 0.5) / 2), "margin")
    assert_close(run("hinge")[0], torch.tensor((0.0 + 1.5) / 2), "hinge")
    assert_close(run("ipo")[0], torch.tensor(((3 - 1) ** 2 + (-1 - 1) ** 2) / 2), "ipo")
    want = ((0.9 * sp(-1.5) - 0.1 * sp(1.5)) + (0.9 * sp(0.5) - 0.1 * sp(-0.5))) / 2 / 0.8
    assert_close(run("robust", label_smoothing=0.1)[0], torch.tensor(want), "robust", atol=1e-6, rtol=1e-6)
    lengths = (t(4, 0), t(2, 1))  # per token: 2/4 - (-1)/2 = 1; 0/1 - 1/1 = -1 (length 0 clamps to 1)
    assert_close(run("sigmoid_norm", chosen_lengths=lengths[0], rejected_lengths=lengths[1])[0],
                 torch.tensor((sp(-0.5) + sp(0.5)) / 2), "sigmoid_norm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss_type", "ls", "use_lengths"), CONFIGS)
def test_extreme_log_ratios_stay_finite(backend, loss_type, ls, use_lengths):
    big = torch.tensor([1e6, -1e6, 3e4, -3e4, 0.0])
    zero = torch.zeros(5)
    lengths = (torch.ones(5, dtype=torch.int64), torch.ones(5, dtype=torch.int64))
    logps = [big, -big, zero, zero]
    (loss, stats, a), (want, _, b) = run_both(logps, lengths, loss_type, ls, use_lengths, backend, beta=1.0)
    assert torch.isfinite(loss) and torch.isfinite(a[0].grad).all() and torch.isfinite(a[1].grad).all()
    assert_close(loss, want, f"{loss_type}: loss", **OUT_TOL)
    assert_close(a[0].grad, b[0].grad, f"{loss_type}: grad", **OUT_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_mixed_dtypes_empty_and_caller_tensors_untouched(backend):
    logps, _ = make_inputs(12)
    pc = logps[0].view(3, 4).to(torch.bfloat16).requires_grad_(True)
    pr = logps[1].view(3, 4).requires_grad_(True)
    rc, rr = logps[2].view(3, 4).to(torch.float16), logps[3].view(3, 4)
    keep = [t.detach().clone() for t in (pc, pr, rc, rr)]
    loss, stats = rlhf_fast.dpo_loss(pc, pr, rc, rr, backend=backend)
    want, _ = dpo_loss_ref(pc.reshape(-1), pr.reshape(-1), rc.reshape(-1), rr.reshape(-1))
    assert_close(loss, want, "mixed dtypes", **OUT_TOL)
    assert stats.chosen_rewards.shape == (12,)
    loss.backward()
    assert pc.grad.dtype == torch.bfloat16 and pc.grad.shape == (3, 4) and pr.grad.dtype == torch.float32
    for t, k in zip((pc, pr, rc, rr), keep, strict=True):
        assert torch.equal(t.detach(), k)
    empty = [torch.zeros(0, requires_grad=i < 2) for i in range(4)]
    loss, stats = rlhf_fast.dpo_loss(*empty, backend=backend)
    assert loss.item() == 0.0 and stats.reward_accuracy.item() == 0.0 and stats.reward_margin.item() == 0.0
    loss.backward()
    assert empty[0].grad.shape == (0,)
    with torch.no_grad():
        loss, _ = rlhf_fast.dpo_loss(*(t.clone().requires_grad_(True) for t in logps), backend=backend)
    assert not loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_derivative_only_when_needed(backend):
    logps, _ = make_inputs(6)
    params = [0.1, float(LOSS_CODES["sigmoid"]), 0.0]
    out = torch.ops.rlhf_fast.dpo_loss(*logps, None, None, params + [0.0], backend)
    assert out[5].numel() == 0 and out[6].numel() == 0
    out = torch.ops.rlhf_fast.dpo_loss(*logps, None, None, params + [1.0], backend)
    delta = (logps[0] - logps[2]) - (logps[1] - logps[3])
    d = dpo_loss_dlogits_ref(delta, beta=0.1, loss_type="sigmoid") / 6
    assert_close(out[5], d, "d_chosen", **OUT_TOL)
    assert_close(out[6], -d, "d_rejected", **OUT_TOL)


def test_dlogits_reference_matches_autograd():
    delta = torch.linspace(-40, 40, 161, dtype=torch.float64).requires_grad_(True)
    for loss_type, ls, _ in CONFIGS:
        zero = torch.zeros_like(delta)
        loss, _ = dpo_loss_ref(delta, zero, zero, zero, beta=0.3, loss_type=loss_type, label_smoothing=ls,
                               **({"chosen_lengths": torch.ones(161), "rejected_lengths": torch.ones(161)}
                                  if loss_type == "sigmoid_norm" else {}))
        (grad,) = torch.autograd.grad(loss * delta.numel(), delta)
        assert_close(dpo_loss_dlogits_ref(delta.detach(), beta=0.3, loss_type=loss_type, label_smoothing=ls), grad,
                     f"{loss_type} ls={ls}", atol=1e-6, rtol=1e-5)


_T = torch.zeros(4)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(policy_chosen_logps=[0.0] * 4), "policy_chosen_logps: expected a torch.Tensor"),
    (dict(ref_rejected_logps=torch.zeros(4, dtype=torch.int64)), r"ref_rejected_logps: expected dtype in"),
    (dict(policy_rejected_logps=torch.zeros(5)), r"policy_rejected_logps: expected shape \(4,\) .*got \(5,\)"),
    (dict(ref_chosen_logps=torch.zeros(2, 2)), r"ref_chosen_logps: expected shape \(4,\)"),
    (dict(beta=0.0), r"beta: expected a finite number > 0, got 0.0"),
    (dict(beta=float("inf")), r"beta: expected a finite number > 0"),
    (dict(loss_type="kto"), r"loss_type: expected one of .*got 'kto'"),
    (dict(label_smoothing=0.5), r"label_smoothing: expected a number in \[0, 0.5\), got 0.5"),
    (dict(label_smoothing=-0.1), r"label_smoothing: expected a number in \[0, 0.5\)"),
    (dict(label_smoothing="x"), r"label_smoothing: expected a number in \[0, 0.5\), got 'x'"),
    (dict(loss_type="hinge", label_smoothing=0.1), r"label_smoothing: loss_type='hinge' takes none"),
    (dict(loss_type="sigmoid_norm"), r"chosen_lengths: loss_type='sigmoid_norm' needs chosen_lengths"),
    (dict(loss_type="ipo", chosen_lengths=torch.ones(4)), r"rejected_lengths: expected a tensor"),
    (dict(loss_type="sigmoid", chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(4)),
     r"chosen_lengths: loss_type='sigmoid' takes no lengths"),
    (dict(loss_type="ipo", chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(4)),
     r"chosen_lengths: expected shape \(4,\) \(policy_chosen_logps.shape\), got \(3,\)"),
    (dict(loss_type="ipo", chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(4, dtype=torch.bool)),
     r"rejected_lengths: expected dtype in"),
    (dict(backend="triton"), r"dpo_loss: backend 'triton' .* cannot run"),
])
def test_bad_input(kwargs, match):
    args = dict(policy_chosen_logps=_T, policy_rejected_logps=_T, ref_chosen_logps=_T, ref_rejected_logps=_T)
    for name in list(args):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(ValueError, match=match):
        rlhf_fast.dpo_loss(*args.values(), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logps, (len_c, len_r) = make_inputs(7)
    op = torch.ops.rlhf_fast.dpo_loss.default
    for loss_type, ls, use_lengths in CONFIGS:
        lengths = (len_c, len_r) if use_lengths else (None, None)
        args = [t.clone().requires_grad_(i < 2) for i, t in enumerate(logps)]
        torch.library.opcheck(op, (*args, *lengths, [0.2, float(LOSS_CODES[loss_type]), ls, 1.0], backend))
    torch.library.opcheck(op, (*(t.to(torch.bfloat16) for t in logps), None, None, [0.1, 0.0, 0.0, 0.0], backend))
    assert len(LOSS_CODES) == len(DPO_LOSS_TYPES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    logps, (len_c, len_r) = make_inputs(16, torch.bfloat16)

    def loss_fn(pc, pr):
        loss, stats = rlhf_fast.dpo_loss(pc, pr, logps[2], logps[3], beta=0.1, loss_type="ipo",
                                         chosen_lengths=len_c, rejected_lengths=len_r, backend=backend)
        return loss + 0.0 * stats.reward_margin

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    x1 = [t.detach().clone().requires_grad_(True) for t in logps[:2]]
    x2 = [t.detach().clone().requires_grad_(True) for t in logps[:2]]
    l1, l2 = compiled(*x1), loss_fn(*x2)
    l1.backward()
    l2.backward()
    assert_close(l1, l2, "loss", **OUT_TOL)
    for a, b in zip(x1, x2, strict=True):
        assert_close(a.grad, b.grad, "grad", **GRAD_TOL[torch.bfloat16])
