"""gather_logprobs against the reference, for every backend that runs here (torch, cpu, and
triton under TRITON_INTERPRET=1): outputs and gradients, awkward shapes, strides, masks, dtypes."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close, check_under_cpu_capability

import rlhf_fast
from rlhf_fast.reference import gather_logprobs_ref

IGNORE = -100
SHAPES = [(1, 1), (3, 7, 1271), (2, 5, 32001), (41, 401)]


def make_inputs(shape, dtype, *, ignore_frac=0.2, scale=4.0):
    """Logits (*shape) and labels (*shape[:-1]) hitting 0, V-1 and ignore_index."""
    *lead, vocab = shape
    logits = (torch.randn(*shape) * scale).to(dtype)
    labels = torch.randint(0, vocab, tuple(lead))
    flat = labels.view(-1)
    flat[0] = 0
    flat[-1] = vocab - 1
    drop = torch.rand(flat.shape) < ignore_frac
    drop[0] = drop[-1] = False
    flat[drop] = IGNORE
    return logits, labels


def run_both(logits, labels, backend, *, temperature=1.0, entropy=True, grad_scale=True):
    """Outputs and gradients of the op and of the reference, with non-unit upstream gradients."""
    lead = labels.shape
    g_lp = torch.randn(lead) if grad_scale else torch.ones(lead)
    g_ent = torch.randn(lead) if grad_scale else torch.ones(lead)
    results = []
    for fn in ("op", "ref"):
        x = logits.detach().clone().requires_grad_(True)
        if fn == "op":
            out = rlhf_fast.gather_logprobs(x, labels, temperature=temperature, ignore_index=IGNORE,
                                            return_entropy=entropy, backend=backend)
            lp, ent = out if entropy else (out, None)
        else:
            lp, ent, _ = gather_logprobs_ref(x.reshape(-1, x.shape[-1]), labels.reshape(-1),
                                             temperature=temperature, ignore_index=IGNORE,
                                             return_entropy=entropy)
            lp = lp.view(lead)
            ent = ent.view(lead) if entropy else None
        loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((lp, ent, grad))
    return results


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape):
    logits, labels = make_inputs(shape, dtype)
    (lp, ent, grad), (lp_r, ent_r, grad_r) = run_both(logits, labels, backend, temperature=0.7)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and grad.dtype == dtype
    assert lp.shape == labels.shape and grad.shape == logits.shape
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    assert_close(ent, ent_r, "entropy", **OUT_TOL)
    assert_close(grad, grad_r, "grad_logits", **GRAD_TOL[dtype])
    ignored = labels == IGNORE
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logprobs_only_unit_grad(backend):
    logits, labels = make_inputs((6, 1000), torch.float32)
    (lp, ent, grad), (lp_r, _, grad_r) = run_both(logits, labels, backend, entropy=False, grad_scale=False)
    assert ent is None
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    assert_close(grad, grad_r, "grad_logits", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_grad_only(backend):
    """Only the entropy is used in the loss (an entropy bonus): the log-prob gradient is None."""
    logits, labels = make_inputs((4, 777), torch.float32, ignore_frac=0.0)
    x = logits.clone().requires_grad_(True)
    _, ent = rlhf_fast.gather_logprobs(x, labels, return_entropy=True, backend=backend)
    ent.sum().backward()
    xr = logits.clone().requires_grad_(True)
    _, ent_r, _ = gather_logprobs_ref(xr, labels, return_entropy=True)
    ent_r.sum().backward()
    assert_close(x.grad, xr.grad, "grad_logits", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_vocab(backend):
    """V = 262144 (one small batch): int64 offsets and many vocab blocks per row."""
    logits, labels = make_inputs((2, 262144), torch.bfloat16, ignore_frac=0.0)
    (lp, ent, grad), (lp_r, ent_r, grad_r) = run_both(logits, labels, backend)
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    assert_close(ent, ent_r, "entropy", **OUT_TOL)
    assert_close(grad, grad_r, "grad_logits", **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["row_slice", "transposed", "expanded", "vocab_strided"])
def test_non_contiguous_logits(backend, layout):
    base = torch.randn(3, 5, 1300) * 3
    if layout == "row_slice":      # rows of a wider buffer: row stride 1300, V = 1271
        logits = base[..., :1271]
    elif layout == "transposed":   # (5, 3, V) view: no single row stride, reshape must copy
        logits = base.transpose(0, 1)
    elif layout == "expanded":     # one row repeated: row stride 0
        logits = base[:1, :1].expand(3, 5, 1300)
    else:                          # vocab stride 2
        logits = base[..., ::2]
    assert not logits.is_contiguous()
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    before = logits.clone()
    (lp, ent, grad), (lp_r, ent_r, grad_r) = run_both(logits, labels, backend)
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    assert_close(ent, ent_r, "entropy", **OUT_TOL)
    assert_close(grad, grad_r, "grad_logits", **GRAD_TOL[torch.float32])
    assert torch.equal(logits, before), "the caller's logits were modified"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_caller_tensors_untouched(backend, dtype):
    logits, labels = make_inputs((4, 3001), dtype)
    logits_before, labels_before = logits.clone(), labels.clone()
    x = logits.requires_grad_(True)
    lp, ent = rlhf_fast.gather_logprobs(x, labels, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(logits.detach(), logits_before) and torch.equal(labels, labels_before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_rows_are_defined(backend):
    """All -inf rows and partially -inf rows: no NaN anywhere, values as documented."""
    vocab = 3000
    logits = torch.randn(4, vocab) * 3
    logits[0] = float("-inf")                  # dead row, ignored label
    logits[1] = float("-inf")                  # dead row, kept label
    logits[2, vocab // 3:] = float("-inf")     # masked vocabulary, label inside the support
    logits[3, :100] = float("-inf")            # masked vocabulary, label on a masked entry
    labels = torch.tensor([IGNORE, 7, 5, 50])
    (lp, ent, grad), (lp_r, ent_r, grad_r) = run_both(logits, labels, backend)
    assert lp[0] == 0 and ent[0] == 0
    assert lp[1] == float("-inf") and ent[1] == 0
    assert lp[3] == float("-inf") and torch.isfinite(ent[3])
    assert not grad.isnan().any() and torch.all(grad[:2] == 0)
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    assert_close(ent, ent_r, "entropy", **OUT_TOL)
    assert_close(grad, grad_r, "grad_logits", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int32_labels_and_empty(backend):
    logits, labels = make_inputs((3, 4, 97), torch.float32)
    a = rlhf_fast.gather_logprobs(logits, labels.int(), backend=backend)
    b = rlhf_fast.gather_logprobs(logits, labels, backend=backend)
    assert torch.equal(a, b)
    x = torch.randn(0, 5, 11, requires_grad=True)
    lp, ent = rlhf_fast.gather_logprobs(x, torch.zeros(0, 5, dtype=torch.long), return_entropy=True,
                                        backend=backend)
    assert lp.shape == (0, 5) and ent.shape == (0, 5)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad_label", [-1, 97, 10**6])
def test_label_out_of_range(backend, bad_label):
    logits = torch.randn(3, 97)
    labels = torch.tensor([0, bad_label, IGNORE])
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 97\).*got " + str(bad_label)):
        rlhf_fast.gather_logprobs(logits, labels, backend=backend)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randint(0, 5, (2, 5)), torch.zeros(2, dtype=torch.long)), "logits: expected a floating"),
        (lambda: (torch.randn(2, 5), torch.zeros(3, dtype=torch.long)), r"labels: expected shape \(2,\)"),
        (lambda: (torch.randn(2, 5), torch.zeros(2)), "labels: expected dtype"),
        (lambda: (torch.randn(2, 0), torch.zeros(2, dtype=torch.long)), "logits: expected shape"),
        (lambda: (torch.randn(2, 5), torch.zeros(2, dtype=torch.long, device="meta")),
         "labels: expected a tensor on cpu"),
        (lambda: ([[0.0]], torch.zeros(1, dtype=torch.long)), "logits: expected a torch.Tensor"),
    ],
)
def test_bad_input(make, match):
    logits, labels = make()
    with pytest.raises(ValueError, match=match):
        rlhf_fast.gather_logprobs(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), "hot"])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
        rlhf_fast.gather_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    logits, labels = make_inputs((5, 300), torch.float32)
    rows = logits.requires_grad_(True)
    for entropy in (False, True):
        torch.library.opcheck(torch.ops.rlhf_fast.gather_logprobs.default,
                              (rows, labels, 0.9, IGNORE, entropy, backend))
    lp, ent, lse = torch.ops.rlhf_fast.gather_logprobs(rows.detach(), labels, 0.9, IGNORE, True, backend)
    torch.library.opcheck(torch.ops.rlhf_fast.gather_logprobs_backward.default,
                          (torch.randn(5), torch.randn(5), rows.detach(), labels, lse, ent, 0.9, IGNORE, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    logits, labels = make_inputs((2, 3, 500), torch.float32)

    def loss_fn(x, y):
        lp, ent = rlhf_fast.gather_logprobs(x, y, temperature=0.8, return_entropy=True, backend=backend)
        return -(lp.sum() + 0.01 * ent.sum())

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    l1 = compiled(x1, labels)
    l1.backward()
    l2 = loss_fn(x2, labels)
    l2.backward()
    assert_close(l1, l2, "loss", **OUT_TOL)
    assert_close(x1.grad, x2.grad, "grad_logits", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_backward_matches_autograd(dtype):
    """The hand-written reference gradient (the torch backend's backward) equals autograd of the
    reference forward, masked rows included."""
    from rlhf_fast.reference import gather_logprobs_backward_ref

    logits, labels = make_inputs((9, 333), dtype)
    logits[1] = float("-inf")
    logits[2, :200] = float("-inf")
    x = logits.clone().requires_grad_(True)
    lp, ent, lse = gather_logprobs_ref(x, labels, temperature=1.3, ignore_index=IGNORE, return_entropy=True)
    g_lp, g_ent = torch.randn(9), torch.randn(9)
    (auto,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), x)
    manual = gather_logprobs_backward_ref(g_lp, g_ent, logits, labels, lse, ent.detach(), temperature=1.3,
                                          ignore_index=IGNORE)
    assert manual.dtype == dtype
    assert_close(manual, auto, "grad_logits", **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_max_far_from_first_block(backend, dtype):
    """Rows whose maximum sits far beyond their first blocks (rising ramps, a late spike, a huge
    range), so every online-softmax rescaling path runs."""
    vocab = 9000
    logits = torch.randn(4, vocab)
    logits[0] += torch.linspace(-60, 60, vocab)     # max keeps rising block after block
    logits[1, 8500] = 70.0                          # one late spike far above everything before it
    logits[2] = torch.linspace(-300, 300, vocab)    # range far beyond exp's fp32 range
    logits[3, :4000] = float("-inf")                # mass starts only in a later block
    logits = logits.to(dtype)
    labels = torch.tensor([vocab - 1, 8500, 10, 4500])
    (lp, ent, grad), (lp_r, ent_r, grad_r) = run_both(logits, labels, backend)
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    assert_close(ent, ent_r, "entropy", **OUT_TOL)
    assert_close(grad, grad_r, "grad_logits", **GRAD_TOL[dtype])


CAPABILITY_CHECK = r"""
import torch, rlhf_fast
from rlhf_fast.reference import gather_logprobs_ref
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for vocab in (1, 37, 5000, 40001):
        x = (torch.randn(6, vocab) * 5).to(dtype)
        x[1] = float("-inf")
        if vocab > 3000:
            x[2, :3000] = float("-inf")
            x[3] += torch.linspace(-50, 50, vocab).to(dtype)
        y = torch.randint(0, vocab, (6,))
        y[0] = -100
        xg = x.clone().requires_grad_(True)
        lp, ent = rlhf_fast.gather_logprobs(xg, y, temperature=0.9, return_entropy=True, backend="cpu")
        g1, g2 = torch.randn(6), torch.randn(6)
        (lp * g1 + ent * g2).sum().backward()
        xr = x.clone().requires_grad_(True)
        lr, er, _ = gather_logprobs_ref(xr, y, temperature=0.9, return_entropy=True)
        (lr * g1 + er * g2).sum().backward()
        fin = torch.isfinite(lr)
        assert torch.equal(fin, torch.isfinite(lp)), (dtype, vocab)
        assert torch.allclose(lp[fin], lr[fin], atol=5e-5, rtol=5e-5), (dtype, vocab)
        assert torch.allclose(ent, er, atol=5e-5, rtol=5e-5), (dtype, vocab)
        tol = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        assert torch.allclose(xg.grad.float(), xr.grad.float(), atol=1e-5, rtol=tol), (dtype, vocab)
print("ok")
"""


@pytest.mark.skipif(not rlhf_fast.has_native(), reason="native extension not built")
@pytest.mark.parametrize("cap", ["AVX2", "DEFAULT"])
def test_other_simd_builds(cap):
    """The AVX2 and scalar-fallback builds of the CPU kernels (this machine runs the best one by
    default), selected the way ATen selects its own: ATEN_CPU_CAPABILITY."""
    check_under_cpu_capability(cap, CAPABILITY_CHECK)
