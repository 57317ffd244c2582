"""linear_ppo_loss (the fused RL head) equals composing linear_logprobs with the separate losses,
to fp32 rounding: loss, statistics and the gradients of hidden, ptx_hidden and weight."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import assert_close

import rlhf_fast
from rlhf_fast.ops._aggregation import aggregate
from rlhf_fast.reference import kl_penalty_ref, ppo_policy_loss_terms_ref

BACKENDS = [b for b in CPU_BACKENDS if b in ("torch", "cpu")]
IGNORE = -100
TOL = dict(atol=2e-5, rtol=2e-4)


def make(b=3, t=9, hdim=16, vocab=500, dtype=torch.float32):
    hidden = torch.randn(b, t, hdim).to(dtype)
    weight = (torch.randn(vocab, hdim) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (b, t))
    mask = (torch.rand(b, t) > 0.3).float()
    mask[-1] = 0  # a fully masked sequence
    old = torch.randn(b, t) * 0.1 - 6
    adv = torch.randn(b, t)
    ref = old + torch.randn(b, t) * 0.05
    ptx_hidden = torch.randn(2, 7, hdim).to(dtype)
    ptx_labels = torch.randint(0, vocab, (2, 7))
    ptx_labels[0, :2] = IGNORE
    return hidden, weight, labels, mask, old, adv, ref, ptx_hidden, ptx_labels


def composed(hidden, weight, labels, mask, old, adv, ref, ptx_hidden, ptx_labels, *, kl_coef, kl_estimator,
             entropy_coef, dual_clip, aggregation, ptx_coef, temperature, bias=None, log_ratio_clamp=20.0,
             kl_cap="default"):
    lab = torch.where(mask != 0, labels, IGNORE)
    lp, ent = rlhf_fast.linear_logprobs(hidden, weight, lab, bias=bias, temperature=temperature,
                                        return_entropy=True, backend="torch")
    terms = ppo_policy_loss_terms_ref(lp, old, adv, mask, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp)
    tok = terms["loss"] - entropy_coef * ent
    if kl_coef:
        tok = tok + kl_coef * kl_penalty_ref(lp, ref, estimator=kl_estimator, cap=kl_cap)
    loss = aggregate(tok, mask, aggregation)
    if ptx_coef:
        plp = rlhf_fast.linear_logprobs(ptx_hidden, weight, ptx_labels, bias=bias, temperature=temperature,
                                        backend="torch")
        loss = loss + ptx_coef * (-plp.sum() / (ptx_labels != IGNORE).sum())
    return loss


CONFIGS = [
    dict(kl_coef=0.0, kl_estimator="k1", entropy_coef=0.0, dual_clip=None, aggregation="token-mean", ptx_coef=0.0,
         temperature=1.0),
    dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, dual_clip=3.0, aggregation="seq-mean-token-mean",
         ptx_coef=0.5, temperature=0.9),
    dict(kl_coef=0.05, kl_estimator="k2", entropy_coef=0.0, dual_clip=None, aggregation="seq-mean-token-sum",
         ptx_coef=1.0, temperature=1.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["aggregation"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_equals_composition(backend, config, with_bias):
    inputs = make()
    bias0 = torch.randn(inputs[1].shape[0]) if with_bias else None
    results = []
    for which in ("fused", "composed"):
        hidden, weight, labels, mask, old, adv, ref, ptx_hidden, ptx_labels = inputs
        h, w, p = (x.clone().requires_grad_(True) for x in (hidden, weight, ptx_hidden))
        bias = bias0.clone().requires_grad_(True) if with_bias else None
        if which == "fused":
            loss, stats = rlhf_fast.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref, ptx_hidden=p,
                                                    ptx_labels=ptx_labels, bias=bias, backend=backend, **config)
            assert set(stats) == {"policy_loss", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean",
                                  "ratio_min", "ratio_max", "kl", "entropy", "ptx_loss"}
            assert all(torch.isfinite(v) for v in stats.values())
        else:
            loss = composed(h, w, labels, mask, old, adv, ref, p, ptx_labels, bias=bias, **config)
        (loss * 1.7).backward()  # non-unit upstream gradient
        results.append((loss.detach(), h.grad, w.grad, p.grad, bias.grad if with_bias else None))
    (lf, gh, gw, gp, gb), (lc, gh_c, gw_c, gp_c, gb_c) = results
    if with_bias:
        assert_close(gb, gb_c, "grad_bias", **TOL)
    assert_close(lf, lc, "loss", **TOL)
    assert_close(gh, gh_c, "grad_hidden", **TOL)
    assert_close(gw, gw_c, "grad_weight", **TOL)
    if config["ptx_coef"]:
        assert_close(gp, gp_c, "grad_ptx_hidden", **TOL)


LOG_RATIOS = torch.tensor([-80.0, -25.0, -15.0, -0.2, 0.0, 0.2, 15.0, 25.0, 80.0])


def extreme_inputs(log_ratios=LOG_RATIOS):
    """make()'s inputs with old_logprobs and ref_logprobs moved so that logprob - old and logprob - ref
    take the values of `log_ratios` (cycled; the KL's in another order) at the valid tokens."""
    hidden, weight, labels, mask, old, adv, ref, ptx_hidden, ptx_labels = make()
    lp = rlhf_fast.linear_logprobs(hidden, weight, torch.where(mask != 0, labels, IGNORE), backend="torch")
    n = lp.numel()
    d = log_ratios.repeat(-(-n // log_ratios.numel()))[:n].view(lp.shape)
    d_kl = log_ratios.flip(0).repeat(-(-n // log_ratios.numel()))[:n].view(lp.shape).roll(1, dims=1)
    return hidden, weight, labels, mask, lp - d, adv, lp - d_kl, ptx_hidden, ptx_labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clamp, cap, log_ratios", [
    (20.0, "default", LOG_RATIOS), (5.0, 2.0, LOG_RATIOS), (None, None, LOG_RATIOS[1:-1])],
    ids=["defaults", "clamp=5-cap=2", "off"])
@pytest.mark.parametrize("estimator", ["k3", "k1"])
def test_extreme_log_ratios(backend, clamp, cap, log_ratios, estimator):
    """Log-ratios of +-15, +-25, +-80 against old_logprobs and ref_logprobs: finite loss, statistics and
    gradients, equal to the composition of the references with the same log_ratio_clamp and kl_cap
    (without them, +-80 would overflow the gradient GEMMs: +-15 and +-25 only)."""
    inputs = extreme_inputs(log_ratios)
    config = dict(kl_coef=0.1, kl_estimator=estimator, entropy_coef=0.01, dual_clip=3.0, aggregation="token-mean",
                  ptx_coef=0.5, temperature=1.0)
    results = []
    for which in ("fused", "composed"):
        hidden, weight, labels, mask, old, adv, ref, ptx_hidden, ptx_labels = inputs
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if which == "fused":
            loss, stats = rlhf_fast.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref,
                                                    ptx_hidden=ptx_hidden, ptx_labels=ptx_labels,
                                                    log_ratio_clamp=clamp, kl_cap=cap, backend=backend, **config)
            assert all(torch.isfinite(v) for v in stats.values())
        else:
            loss = composed(h, w, labels, mask, old, adv, ref, ptx_hidden, ptx_labels, log_ratio_clamp=clamp,
                            kl_cap=cap, **config)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
        results.append((loss.detach(), h.grad, w.grad))
    (lf, gh, gw), (lc, gh_c, gw_c) = results
    tol = lambda g: dict(atol=TOL["atol"] * max(1.0, g.abs().max().item()), rtol=TOL["rtol"])  # noqa: E731
    assert_close(lf, lc, "loss", **tol(lc))
    assert_close(gh, gh_c, "grad_hidden", **tol(gh_c))
    assert_close(gw, gw_c, "grad_weight", **tol(gw_c))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_match_ppo_policy_loss(backend):
    hidden, weight, labels, mask, old, adv, ref, _, _ = make()
    _, stats = rlhf_fast.linear_ppo_loss(hidden, weight, labels, old, adv, mask, dual_clip=3.0, backend=backend)
    lp = rlhf_fast.linear_logprobs(hidden, weight, torch.where(mask != 0, labels, IGNORE))
    _, ref_stats = rlhf_fast.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, backend="torch")
    for key in ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"):
        assert_close(stats[key], ref_stats[key], key, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_and_no_grad(backend):
    hidden, weight, labels, mask, old, adv, ref, _, _ = make()
    mask.zero_()
    h = hidden.clone().requires_grad_(True)
    loss, stats = rlhf_fast.linear_ppo_loss(h, weight, labels, old, adv, mask, backend=backend)
    assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    with torch.no_grad():
        hidden, weight, labels, mask, old, adv, ref, _, _ = make()
        loss_ng, _ = rlhf_fast.linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend=backend)
    loss_g, _ = rlhf_fast.linear_ppo_loss(hidden, weight.requires_grad_(True), labels, old, adv, mask,
                                          backend=backend)
    assert_close(loss_ng, loss_g.detach(), "loss without grad", **TOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kl_coef=0.1), "ref_logprobs: required when kl_coef != 0"),
        (dict(kl_estimator="k9"), "kl_estimator: expected one of"),
        (dict(clip_eps=0.0), "clip_eps: expected a finite number > 0"),
        (dict(dual_clip=0.5), "dual_clip: expected a finite number > 1"),
        (dict(aggregation="mean"), "aggregation: expected one of"),
        (dict(log_ratio_clamp=0.0), "log_ratio_clamp: expected a finite number > 0, got 0.0"),
        (dict(kl_cap=-1.0), "kl_cap: expected a finite number > 0, got -1.0"),
        (dict(kl_cap="on"), "kl_cap: expected 'default', None or a finite number > 0, got 'on'"),
    ],
)
def test_bad_input(kwargs, match):
    hidden, weight, labels, mask, old, adv, _, _, _ = make()
    with pytest.raises(ValueError, match=match):
        rlhf_fast.linear_ppo_loss(hidden, weight, labels, old, adv, mask, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    hidden, weight, labels, mask, old, adv, ref, _, _ = make()

    def fn(h, w):
        loss, _ = rlhf_fast.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                            backend=backend)
        return loss

    params = [[x.clone().requires_grad_(True) for x in (hidden, weight)] for _ in range(2)]
    torch.compile(fn, fullgraph=True)(*params[0]).backward()
    fn(*params[1]).backward()
    for a, b in zip(params[0], params[1], strict=True):
        assert_close(a.grad, b.grad, "grad", **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_equals_composition(backend, dtype):
    """16-bit hidden / weight / bias: the op computes in fp32 from the 16-bit values, so it matches the
    composition on the same (rounded) inputs; gradients come back in the inputs' dtype."""
    hidden, weight, labels, mask, old, adv, ref, ptx_hidden, ptx_labels = make(dtype=dtype)
    bias = torch.randn(weight.shape[0]).to(dtype)
    config = CONFIGS[1]
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias, ptx_hidden)]
    loss, _ = rlhf_fast.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, ref_logprobs=ref,
                                        ptx_hidden=leaves[3], ptx_labels=ptx_labels, bias=leaves[2],
                                        backend=backend, **config)
    loss.backward()
    wide = [x.float().requires_grad_(True) for x in (hidden, weight, bias, ptx_hidden)]
    want = composed(wide[0], wide[1], labels, mask, old, adv, ref, wide[3], ptx_labels, bias=wide[2], **config)
    want.backward()
    assert_close(loss.detach(), want.detach(), "loss", **TOL)
    for name, got, ref_leaf in zip(("hidden", "weight", "bias", "ptx_hidden"), leaves, wide, strict=True):
        assert got.grad.dtype == dtype, name
        assert_close(got.grad.float(), ref_leaf.grad.to(dtype).float(), f"grad_{name}", atol=1e-2, rtol=2e-2)


def test_block_rule():
    """Row blocks: at most a quarter of the rows (the block buffer's bound against eager's (N, V)
    tensors), at most 64 MB of logits, except that cpu blocks get at least MIN_TILE_ROWS rows."""
    from rlhf_fast.ops.linear_ppo_loss import MIN_TILE_ROWS, TILE_ELEMS, block_rows

    for n, vocab in ((1, 10), (41, 500), (2048, 8192), (2048, 32768), (2048, 65536), (8192, 128256)):
        for backend in ("cpu", "cuda", "torch"):
            rows = block_rows(n, vocab, backend)
            assert 1 <= rows <= -(-n // 4), (n, vocab, backend)
            if backend == "cpu":
                assert rows >= min(MIN_TILE_ROWS, -(-n // 4))
            else:
                assert rows <= max(1, TILE_ELEMS // vocab)
    assert block_rows(2048, 65536, "cpu") == 512  # 64 MB alone: 256 rows
    assert block_rows(2048, 65536, "cuda") == 256
    assert block_rows(16384, 8192, "cpu") == TILE_ELEMS // 8192


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_blocks_and_chunks_equal_composition(backend, dtype, monkeypatch):
    """Several row blocks over a vocabulary longer than the cpu policy's 16-bit chunk (2048 rows):
    fp32 weights run whole-vocabulary GEMMs per block, 16-bit ones three widened chunks."""
    mod = importlib.import_module("rlhf_fast.ops.linear_ppo_loss")
    vocab = 4500
    monkeypatch.setattr(mod, "MIN_TILE_ROWS", 8)
    monkeypatch.setattr(mod, "TILE_ELEMS", 8 * vocab)  # blocks of 8 rows: 6 of them for 41 rows
    hidden, weight, labels, mask, old, adv, ref, ptx_hidden, ptx_labels = make(vocab=vocab, dtype=dtype)
    labels[0, :3] = torch.tensor([0, vocab - 1, 2048])  # first / last column, first column of a chunk
    config = CONFIGS[1]
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, ptx_hidden)]
    loss, _ = rlhf_fast.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, ref_logprobs=ref,
                                        ptx_hidden=leaves[2], ptx_labels=ptx_labels, backend=backend, **config)
    (loss * 1.7).backward()
    wide = [x.float().requires_grad_(True) for x in (hidden, weight, ptx_hidden)]
    want = composed(wide[0], wide[1], labels, mask, old, adv, ref, wide[2], ptx_labels, **config)
    (want * 1.7).backward()
    assert_close(loss.detach(), want.detach(), "loss", **TOL)
    tol = TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=2e-2)
    for name, got, ref_leaf in zip(("hidden", "weight", "ptx_hidden"), leaves, wide, strict=True):
        assert_close(got.grad.float(), ref_leaf.grad.to(dtype).float(), f"grad_{name}", **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_opcheck(backend, with_bias):
    from rlhf_fast.ops.linear_ppo_loss import _linear_ppo_loss_op

    hidden, weight, labels, mask, old, adv, ref, _, _ = make()
    rows = hidden.reshape(-1, hidden.shape[-1]).clone().requires_grad_(True)
    n = rows.shape[0]
    lab = torch.where(mask.reshape(-1) != 0, labels.reshape(-1), IGNORE)
    bias = torch.randn(weight.shape[0]).requires_grad_(True) if with_bias else None
    args = (rows, weight.clone().requires_grad_(True), bias, lab, mask.reshape(-1) / max(1.0, float(mask.sum())),
            old.reshape(-1), adv.reshape(-1), ref.reshape(-1), n, 0.1, 3, 0.01, 0.2, 0.2, 3.0, 1.0, IGNORE, True,
            8, 20.0, 10.0, backend)
    torch.library.opcheck(_linear_ppo_loss_op, args)


def test_bad_bias():
    hidden, weight, labels, mask, old, adv, _, _, _ = make()
    for bias, match in ((torch.zeros(7), r"bias: expected shape \(500,\)"),
                        (torch.zeros(500, dtype=torch.float64), "bias: expected dtype")):
        with pytest.raises(ValueError, match=match):
            rlhf_fast.linear_ppo_loss(hidden, weight, labels, old, adv, mask, bias=bias)


def test_gpu_backends_registered():
    """triton (rlhf_fast/kernels/linear_ppo_loss.py) is the op's GPU backend; an explicit cuda request names why it
    cannot run (there is no CUDA kernel of this op)."""
    from rlhf_fast.ops.linear_ppo_loss import OP

    assert set(OP.impls) == {"torch", "cpu", "triton"}
    hidden, weight, labels, mask, old, adv, _, _, _ = make()
    with pytest.raises(ValueError, match=r"backend 'cuda' \(from backend=\) cannot run: linear_ppo_loss has no cuda"):
        rlhf_fast.linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_backend_matches_torch(backend, dtype):
    """On a GPU: the triton backend against the torch backend on the same CUDA inputs (loss,
    statistics and every gradient), with row blocks and vocabulary chunks that do not divide evenly."""
    torch.manual_seed(1)
    inputs = [x.cuda() for x in make(b=4, t=33, hdim=64, vocab=20001, dtype=dtype)]
    bias0 = torch.randn(inputs[1].shape[0], device="cuda").to(dtype)
    results = []
    for which in (backend, "torch"):
        hidden, weight, labels, mask, old, adv, ref, ptx_hidden, ptx_labels = inputs
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, ptx_hidden, bias0)]
        loss, stats = rlhf_fast.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, ref_logprobs=ref,
                                                ptx_hidden=leaves[2], ptx_labels=ptx_labels, bias=leaves[3],
                                                backend=which, **CONFIGS[1])
        (loss * 1.7).backward()
        results.append((loss.detach(), stats, [x.grad for x in leaves]))
    (loss, stats, grads), (loss_t, stats_t, grads_t) = results
    # fp32 GEMMs may run in TF32 / tf32x3 on the GPU; 16-bit gradients are rounded once
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=1e-3, rtol=2e-2)
    assert_close(loss, loss_t, "loss", **tol)
    for key in stats:
        assert_close(stats[key], stats_t[key], key, **tol)
    for name, g, g_t in zip(("hidden", "weight", "ptx_hidden", "bias"), grads, grads_t, strict=True):
        assert g.dtype == dtype, name
        scale = g_t.float().abs().max().item()
        assert_close(g, g_t, f"grad_{name}", atol=tol["rtol"] * scale, rtol=tol["rtol"])
