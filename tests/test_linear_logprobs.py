"""linear_logprobs against the reference (which materializes the logits), for the torch and cpu
backends (the triton backend: tests/test_linear_logprobs_triton.py): outputs and the gradients of
hidden, weight and bias, chunk independence, tied weights, validation."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, OUT_TOL, assert_close

import rlhf_fast
from rlhf_fast.reference import linear_logprobs_ref

IGNORE = -100
BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]
# Gradients are fp32 sums over tokens or the vocabulary rounded once to the input dtype.
GRAD_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.float16: dict(atol=2e-4, rtol=2e-3),
            torch.bfloat16: dict(atol=2e-3, rtol=1.6e-2)}


def make(lead, hdim, vocab, dtype, *, bias=False, ignore_frac=0.25):
    hidden = torch.randn(*lead, hdim).to(dtype)
    weight = (torch.randn(vocab, hdim) / hdim ** 0.5 * 3).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead)
    flat = labels.view(-1)
    flat[0], flat[-1] = 0, vocab - 1
    drop = torch.rand(flat.shape) < ignore_frac
    drop[0] = drop[-1] = False
    flat[drop] = IGNORE
    return hidden, weight, b, labels


def run_both(hidden, weight, bias, labels, backend, *, entropy=True, **kw):
    lead = labels.shape
    g_lp, g_ent = torch.randn(lead), torch.randn(lead)
    outs = []
    for which in ("op", "ref"):
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        b = None if bias is None else bias.detach().clone().requires_grad_(True)
        if which == "op":
            out = rlhf_fast.linear_logprobs(h, w, labels, bias=b, return_entropy=entropy, ignore_index=IGNORE,
                                            backend=backend, **kw)
            lp, ent = out if entropy else (out, None)
        else:
            kw_ref = {k: v for k, v in kw.items() if k != "chunk_size"}
            lp, ent, _ = linear_logprobs_ref(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), bias=b,
                                             return_entropy=entropy, ignore_index=IGNORE, **kw_ref)
            lp = lp.view(lead)
            ent = ent.view(lead) if entropy else None
        loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
        params = [h, w] + ([b] if b is not None else [])
        grads = torch.autograd.grad(loss, params)
        outs.append((lp, ent, grads))
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hdim", [8, 64, 100])
@pytest.mark.parametrize("vocab", [1, 1000, 32001])
def test_matches_reference(backend, dtype, hdim, vocab):
    lead = (2, 3) if vocab == 32001 else (3, 7)  # 3-D hidden
    hidden, weight, bias, labels = make(lead, hdim, vocab, dtype, bias=hdim == 64)
    (lp, ent, grads), (lp_r, ent_r, grads_r) = run_both(hidden, weight, bias, labels, backend, temperature=0.8,
                                                         logit_softcap=20.0 if hdim == 100 else None)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    assert_close(ent, ent_r, "entropy", **OUT_TOL)
    for name, g, g_r in zip(("hidden", "weight", "bias"), grads, grads_r, strict=False):
        assert g.dtype == dtype
        assert_close(g, g_r, f"grad_{name}", **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_entropy_softcap_bias_combinations(backend, entropy, softcap):
    hidden, weight, bias, labels = make((4, 9), 32, 777, torch.float32, bias=True)
    (lp, ent, grads), (lp_r, ent_r, grads_r) = run_both(hidden, weight, bias, labels, backend, entropy=entropy,
                                                         temperature=1.3, logit_softcap=softcap, chunk_size=100)
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    if entropy:
        assert_close(ent, ent_r, "entropy", **OUT_TOL)
    for name, g, g_r in zip(("hidden", "weight", "bias"), grads, grads_r, strict=True):
        assert_close(g, g_r, f"grad_{name}", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_result_independent_of_chunking(backend):
    hidden, weight, bias, labels = make((50,), 48, 3001, torch.float32, bias=True)
    results = []
    for chunk in (1, 7, 256, 1000, 3001, 10**6):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        lp, ent = rlhf_fast.linear_logprobs(h, w, labels, bias=bias, return_entropy=True, chunk_size=chunk,
                                            backend=backend)
        (lp.sum() + ent.sum()).backward()
        results.append((lp, ent, h.grad, w.grad))
    for lp, ent, gh, gw in results[1:]:
        assert_close(lp, results[0][0], "logprobs", atol=1e-5, rtol=1e-5)
        assert_close(ent, results[0][1], "entropy", atol=1e-5, rtol=1e-5)
        assert_close(gh, results[0][2], "grad_hidden", atol=1e-5, rtol=1e-4)
        assert_close(gw, results[0][3], "grad_weight", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_gather_logprobs_of_the_logits(backend):
    hidden, weight, bias, labels = make((6, 5), 40, 2000, torch.float32, bias=True)
    lp, ent = rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.7, return_entropy=True,
                                        backend=backend)
    lp2, ent2 = rlhf_fast.gather_logprobs(hidden @ weight.T + bias, labels, temperature=0.7, return_entropy=True)
    assert_close(lp, lp2, "logprobs", **OUT_TOL)
    assert_close(ent, ent2, "entropy", **OUT_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weights(backend):
    """The lm_head shares its weight with the input embedding: gradients from both uses add up."""
    vocab, hdim = 500, 32
    tokens = torch.randint(0, vocab, (3, 11))
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE
    base = torch.randn(vocab, hdim) * 0.3
    grads = []
    for use_ref in (False, True):
        emb = base.clone().requires_grad_(True)
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, emb))
        if use_ref:
            lp, _, _ = linear_logprobs_ref(hidden.reshape(-1, hdim), emb, labels.reshape(-1), ignore_index=IGNORE)
        else:
            lp = rlhf_fast.linear_logprobs(hidden, emb, labels, ignore_index=IGNORE, backend=backend)
        lp.sum().backward()
        grads.append(emb.grad)
    assert_close(grads[0], grads[1], "grad of the tied weight", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_empty(backend):
    hidden, weight, bias, labels = make((4,), 16, 50, torch.float32, bias=True)
    labels[:] = IGNORE
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    lp, ent = rlhf_fast.linear_logprobs(h, w, labels, bias=bias, return_entropy=True, backend=backend)
    assert torch.equal(lp, torch.zeros(4)) and torch.equal(ent, torch.zeros(4))
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    out = rlhf_fast.linear_logprobs(torch.randn(0, 16), weight.detach(), torch.zeros(0, dtype=torch.long),
                                    backend=backend)
    assert out.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_out_of_range(backend):
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 50\).*got 50"):
        rlhf_fast.linear_logprobs(torch.randn(3, 8), torch.randn(50, 8), torch.tensor([1, 50, IGNORE]),
                                  backend=backend)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=torch.randn(50, 9)), r"weight: expected shape \(V, 8\)"),
        (dict(weight=torch.randn(50, 8, dtype=torch.float64)), "weight: expected dtype torch.float32"),
        (dict(bias=torch.randn(49)), r"bias: expected shape \(50,\)"),
        (dict(labels=torch.zeros(4, dtype=torch.long)), r"labels: expected shape \(3,\)"),
        (dict(hidden=torch.randint(0, 3, (3, 8))), "hidden: expected dtype"),
        (dict(chunk_size=0), "chunk_size: expected None or an int >= 1"),
        (dict(logit_softcap=0.0), "logit_softcap: expected a finite number > 0"),
        (dict(temperature=float("inf")), "temperature: expected a finite number > 0"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(hidden=torch.randn(3, 8), weight=torch.randn(50, 8), labels=torch.tensor([1, 2, 3]))
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        rlhf_fast.linear_logprobs(hidden, weight, labels, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, bias, labels = make((5,), 12, 300, torch.float32, bias=True)
    for entropy in (False, True):
        args = (hidden.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True), labels, 0.9,
                10.0, IGNORE, entropy, 5, 64, backend)
        torch.library.opcheck(torch.ops.rlhf_fast.linear_logprobs.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    hidden, weight, bias, labels = make((2, 6), 16, 400, torch.float32, bias=True)

    def loss_fn(h, w, b):
        lp, ent = rlhf_fast.linear_logprobs(h, w, labels, bias=b, return_entropy=True, backend=backend)
        return -(lp.sum() + 0.1 * ent.sum())

    compiled = torch.compile(loss_fn, fullgraph=True)
    params = [[t.clone().requires_grad_(True) for t in (hidden, weight, bias)] for _ in range(2)]
    l1 = compiled(*params[0])
    l1.backward()
    l2 = loss_fn(*params[1])
    l2.backward()
    assert_close(l1, l2, "loss", **OUT_TOL)
    for a, b in zip(params[0], params[1], strict=True):
        assert_close(a.grad, b.grad, "grad", **GRAD_TOL[torch.float32])


@pytest.mark.skipif(not rlhf_fast.has_native(), reason="needs the native extension")
def test_cpu_gemm_engines_agree():
    """RLHF_FAST_CPU_GEMM selects the CPU tile GEMMs (oneDNN or ATen's BLAS): both give the
    reference's outputs and gradients; an unknown engine is an error naming the variable."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, rlhf_fast\n"
        "from rlhf_fast.reference import linear_logprobs_ref\n"
        "torch.manual_seed(0)\n"
        "h = torch.randn(37, 24, requires_grad=True); w = torch.randn(700, 24, requires_grad=True)\n"
        "y = torch.randint(0, 700, (37,)); y[3] = -100\n"
        "lp, ent = rlhf_fast.linear_logprobs(h, w, y, return_entropy=True, backend='cpu', chunk_size=128)\n"
        "gh, gw = torch.autograd.grad((lp * torch.arange(37.)).sum() + ent.sum(), (h, w))\n"
        "rlp, rent, _ = linear_logprobs_ref(h, w, y, return_entropy=True)\n"
        "rh, rw = torch.autograd.grad((rlp * torch.arange(37.)).sum() + rent.sum(), (h, w))\n"
        "for a, b in ((lp, rlp), (ent, rent), (gh, rh), (gw, rw)):\n"
        "    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)\n"
        "print(rlhf_fast.cpu_gemm_engine())\n"
    )
    for engine in ("blas", "onednn"):
        env = {**os.environ, "RLHF_FAST_CPU_GEMM": engine}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        # oneDNN is used only where ATen is built with it
        assert out.stdout.strip() in ({engine} if engine == "blas" else {"onednn", "blas"})
    env = {**os.environ, "RLHF_FAST_CPU_GEMM": "mkl"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "RLHF_FAST_CPU_GEMM" in out.stderr
