"""linear_ppo_loss on the triton backend (rlhf_fast/kernels/linear_ppo_loss.py: linear_logprobs' Triton kernels
run by Triton's interpreter on CPU -- conftest sets TRITON_INTERPRET=1 -- plus the loss step in
PyTorch) against the torch backend (the composition of the references) on the same inputs: the loss,
every statistic and the gradients of hidden, ptx_hidden, weight and bias, for fp32 and fp16, masks,
ignored ptx labels, a fully masked batch and the no-grad path.

Shapes are chosen for the interpreter's tiles (BLOCK_M = 32 rows, BLOCK_N = 512 vocabulary entries,
BLOCK_K = 32, rlhf_fast/kernels/linear_logprobs.py: INTERPRET): 27 policy + 14 ptx rows are two row blocks,
V = 1000 two vocabulary tiles (and two forward splits), H = 40 a ragged second K step. fp32 inputs run
tf32x3 dots on a GPU and numpy matmuls here; fp16 rounds dL/dlogits to fp16 before the gradient
GEMMs, as an eager fp16 backward does, hence its looser gradient tolerance.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import assert_close

import rlhf_fast

pytestmark = pytest.mark.skipif("triton" not in CPU_BACKENDS,
                                reason="the triton backend runs on CPU only under TRITON_INTERPRET=1 with triton")

IGNORE = -100
OUT_TOL = dict(atol=2e-5, rtol=2e-4)  # loss and statistics: fp32 sums of the same per-token math
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2}
STATS = ("policy_loss", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "kl",
         "entropy", "ptx_loss")


def make(dtype=torch.float32, b=3, t=9, hdim=40, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, hdim, generator=g).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=g) * 2 / hdim ** 0.5).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, 0], labels[0, 1] = 0, vocab - 1
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[0, :2] = 1
    mask[-1] = 0  # a fully masked sequence
    old = torch.randn(b, t, generator=g) * 0.3 - 6
    adv = torch.randn(b, t, generator=g)
    ref = old + torch.randn(b, t, generator=g) * 0.05
    old[-1] = float("nan")  # padding of the masked sequence reaches nothing
    ptx_hidden = torch.randn(2, 7, hdim, generator=g).to(dtype)
    ptx_labels = torch.randint(0, vocab, (2, 7), generator=g)
    ptx_labels[0, :2] = IGNORE
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask, old=old, adv=adv, ref=ref,
                ptx_hidden=ptx_hidden, ptx_labels=ptx_labels)


def run(backend, x, *, with_bias, ptx, grad=True, **config):
    """(loss, stats, {leaf: grad}) of one backend on fresh leaves; 1.7 as a non-unit upstream gradient."""
    leaves = {k: x[k].clone().requires_grad_(grad) for k in ("hidden", "weight", "bias", "ptx_hidden")}
    extra = dict(ptx_hidden=leaves["ptx_hidden"], ptx_labels=x["ptx_labels"]) if ptx else {}
    loss, stats = rlhf_fast.linear_ppo_loss(leaves["hidden"], leaves["weight"], x["labels"], x["old"], x["adv"],
                                            x["mask"], ref_logprobs=x["ref"],
                                            bias=leaves["bias"] if with_bias else None, backend=backend, **extra,
                                            **config)
    if grad:
        (loss * 1.7).backward()
    return loss.detach(), stats, {k: v.grad for k, v in leaves.items()}


def compare(dtype, *, with_bias, ptx, x=None, **config):
    x = make(dtype) if x is None else x
    got = run("triton", x, with_bias=with_bias, ptx=ptx, **config)
    want = run("torch", x, with_bias=with_bias, ptx=ptx, **config)
    assert got[0].dtype == torch.float32 and torch.isfinite(got[0])
    assert_close(got[0], want[0], "loss", **OUT_TOL)
    assert set(got[1]) == set(STATS)
    for key in STATS:
        assert_close(got[1][key], want[1][key], key, **OUT_TOL)
    names = ["hidden", "weight"] + (["bias"] if with_bias else []) + (["ptx_hidden"] if ptx else [])
    for name in names:
        g, w = got[2][name], want[2][name]
        assert g is not None and g.dtype == dtype, name
        rtol = GRAD_RTOL[dtype]
        assert_close(g, w, f"grad_{name}", atol=rtol * w.float().abs().max().item() + 1e-7, rtol=rtol)
    if not with_bias:
        assert got[2]["bias"] is None
    # masked positions and the fully masked sequence get exactly zero gradient
    dead = x["mask"] == 0
    assert torch.equal(got[2]["hidden"][dead], torch.zeros_like(got[2]["hidden"][dead]))
    return got


CONFIGS = [
    pytest.param(dict(kl_coef=0.0, kl_estimator="k1", entropy_coef=0.0, dual_clip=None, aggregation="token-mean",
                      ptx_coef=0.0, temperature=1.0), False, id="plain"),
    pytest.param(dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, dual_clip=3.0,
                      aggregation="seq-mean-token-mean", ptx_coef=0.5, temperature=0.9), True,
                 id="k3-entropy-dual-ptx"),
    pytest.param(dict(kl_coef=0.05, kl_estimator="abs", entropy_coef=0.02, clip_eps_high=0.3,
                      aggregation="seq-mean-token-sum", ptx_coef=1.0, temperature=1.0), True, id="abs-clip-high-ptx"),
]


@pytest.mark.parametrize("config, ptx", CONFIGS)
def test_matches_torch_backend(config, ptx):
    compare(torch.float32, with_bias=ptx, ptx=ptx, **config)


@pytest.mark.parametrize("clamp, cap, log_ratios", [
    (20.0, "default", (-80.0, -25.0, -15.0, -0.2, 0.0, 0.2, 15.0, 25.0, 80.0)),
    (None, None, (-25.0, -15.0, 0.1, 15.0, 25.0))], ids=["defaults", "off"])
def test_extreme_log_ratios(clamp, cap, log_ratios):
    """logprob - old_logprobs and logprob - ref_logprobs at +-15, +-25 (and +-80 with the default clamp
    and cap): finite loss, statistics and gradients equal to the torch backend's."""
    x = make()
    lp = rlhf_fast.linear_logprobs(x["hidden"], x["weight"], torch.where(x["mask"] != 0, x["labels"], IGNORE),
                                   bias=x["bias"], backend="torch")
    d = torch.tensor(log_ratios)
    n = lp.numel()
    x["old"] = lp - d.repeat(-(-n // d.numel()))[:n].view(lp.shape)
    x["ref"] = lp - d.flip(0).repeat(-(-n // d.numel()))[:n].view(lp.shape).roll(1, dims=1)
    x["old"][-1] = float("nan")  # the fully masked sequence's padding still reaches nothing
    got = compare(torch.float32, with_bias=True, ptx=True, x=x, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
                  dual_clip=3.0, ptx_coef=0.5, log_ratio_clamp=clamp, kl_cap=cap)
    assert all(torch.isfinite(v) for v in got[1].values())
    assert all(torch.isfinite(g).all() for g in got[2].values())


def test_fp16_matches_torch_backend():
    compare(torch.float16, with_bias=True, ptx=True, kl_coef=0.05, kl_estimator="k2", entropy_coef=0.01,
            dual_clip=3.0, ptx_coef=0.5)


def test_fully_masked_batch():
    x = make()
    x["mask"].zero_()
    loss, stats, grads = run("triton", x, with_bias=True, ptx=False, kl_coef=0.1, entropy_coef=0.01)
    assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
    for name in ("hidden", "weight", "bias"):
        assert torch.equal(grads[name], torch.zeros_like(grads[name])), name


def test_no_grad_path():
    """Without gradients the op runs the forward kernel only and returns the same loss and statistics."""
    x = make(seed=1)
    config = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, ptx_coef=0.5)
    with torch.no_grad():
        loss, stats, _ = run("triton", x, with_bias=True, ptx=True, grad=False, **config)
    want, want_stats, _ = run("torch", x, with_bias=True, ptx=True, grad=False, **config)
    assert_close(loss, want, "loss", **OUT_TOL)
    for key in STATS:
        assert_close(stats[key], want_stats[key], key, **OUT_TOL)

    from rlhf_fast.kernels.linear_ppo_loss import linear_ppo_loss_fwd

    rows = x["hidden"].reshape(-1, x["hidden"].shape[-1])
    n = rows.shape[0]
    out = linear_ppo_loss_fwd(rows, x["weight"], None, x["labels"].reshape(-1), torch.full((n,), 0.1),
                              torch.zeros(n), torch.ones(n), None, n, 0.0, 0, 0.0, 0.2, 0.2, 0.0, 1.0, IGNORE, False)
    assert out[1].dtype == torch.float64 and out[1].shape == (13,)
    assert all(t.numel() == 0 for t in out[2:])


def test_opcheck():
    from rlhf_fast.ops.linear_ppo_loss import _linear_ppo_loss_op

    x = make(b=2, t=5, vocab=600)
    rows = x["hidden"].reshape(-1, x["hidden"].shape[-1]).clone().requires_grad_(True)
    mask = x["mask"].reshape(-1)
    lab = torch.where(mask != 0, x["labels"].reshape(-1), IGNORE)
    args = (rows, x["weight"].clone().requires_grad_(True), x["bias"].clone().requires_grad_(True), lab,
            mask / max(1.0, float(mask.sum())), torch.nan_to_num(x["old"].reshape(-1)), x["adv"].reshape(-1),
            x["ref"].reshape(-1), rows.shape[0], 0.1, 3, 0.01, 0.2, 0.2, 3.0, 1.0, IGNORE, True, 8, 20.0, 10.0,
            "triton")
    torch.library.opcheck(_linear_ppo_loss_op, args)
