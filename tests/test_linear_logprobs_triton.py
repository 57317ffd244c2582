"""linear_logprobs on the triton backend (rlhf_fast/kernels/linear_logprobs.py, run by Triton's interpreter on
CPU: conftest sets TRITON_INTERPRET=1) against rlhf_fast.reference.linear_logprobs_ref: outputs and
the gradients of hidden, weight and bias, for fp32 / fp16 / bf16, H in {8, 64, 100}, V in {1, 1000,
32001}, 3-D hidden, ignored rows (and whole ignored row blocks), temperature, softcap, bias, tied
weights, entropy on/off, non-unit upstream gradients, masked vocabulary and dead rows, opcheck.

Tolerances. The outputs are fp32 whatever the input dtype and are compared with OUT_TOL. The
gradients of hidden and weight are sums over V (resp. N) terms that cancel (softmax gradients sum to
zero), so an element's relative error is unbounded where its sum cancels -- for the fp32 reference
too (on a 64 x 32001 case, its worst element of grad_hidden is 3e-3 off relative to a float64
ground truth, the kernel's 2e-5: it sums per tile, then across tiles). They are checked twice:
  * against the reference, elementwise with the dtype's GRAD_TOL rtol and an atol of that rtol times
    the largest |gradient| (error relative to the gradient's scale);
  * against a float64 ground truth with the flash-attention rule: the kernel's max error is at most
    twice that of eager PyTorch in the input dtype (for fp32: of the reference itself), plus 1e-6
    of the gradient's scale. For bf16/fp16 the kernel rounds dL/dlogits to the input dtype before
    its gradient GEMMs, as an eager backward does, so this is the bound that says it is no worse.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close

import rlhf_fast
from rlhf_fast.reference import gather_logprobs_ref, linear_logprobs_ref

pytestmark = pytest.mark.skipif("triton" not in CPU_BACKENDS,
                                reason="the triton backend runs on CPU only under TRITON_INTERPRET=1 with triton")

BACKEND = "triton"
IGNORE = -100


def make_inputs(lead, hdim, vocab, dtype, *, bias=True, ignore_frac=0.25, seed=0):
    """hidden (*lead, H), weight (V, H), bias (V,) or None, labels (*lead) hitting 0, V-1 and
    ignore_index. Logits come out with a standard deviation of ~3 (a peaked but not one-hot softmax)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, hdim, generator=g).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=g) * 3 / hdim ** 0.5).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, vocab, tuple(lead), generator=g)
    flat = labels.view(-1)
    flat[0] = 0
    flat[-1] = vocab - 1
    drop = torch.rand(flat.shape, generator=g) < ignore_frac
    drop[0] = drop[-1] = False
    flat[drop] = IGNORE
    return hidden, weight, b, labels


def eager(hidden, weight, labels, bias=None, temperature=1.0, logit_softcap=None, return_entropy=False):
    """What a PyTorch user writes, in the inputs' dtype: logits = hidden @ weight.T (+ bias), capped,
    then the log-softmax of gather_logprobs_ref. The low-precision baseline of the tolerance rule."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if bias is not None:
        logits = logits + bias
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return gather_logprobs_ref(logits, labels.reshape(-1), temperature=temperature, ignore_index=IGNORE,
                               return_entropy=return_entropy)


def truth64(hidden, weight, labels, bias=None, temperature=1.0, logit_softcap=None, return_entropy=False):
    """The same math in float64 (for rows with finite logits): the ground truth of the error bound."""
    logits = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    picked = logp.gather(1, torch.where(keep, flat, 0).unsqueeze(1)).squeeze(1)
    zero = torch.zeros_like(picked)
    entropy = torch.where(keep, -(logp.exp() * logp).sum(-1), zero) if return_entropy else None
    return torch.where(keep, picked, zero), entropy, None


def run(fn, hidden, weight, bias, labels, g_lp, g_ent, dtype=None, **kw):
    """(logprobs, entropy, grad_hidden, grad_weight, grad_bias) of loss = sum(g_lp lp) + sum(g_ent H)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    h = cast(hidden.detach().clone()).requires_grad_(True)
    w = cast(weight.detach().clone()).requires_grad_(True)
    b = cast(bias.detach().clone()).requires_grad_(True) if bias is not None else None
    if fn is None:
        out = rlhf_fast.linear_logprobs(h, w, labels, bias=b, ignore_index=IGNORE, backend=BACKEND, **kw)
        lp, ent = out if kw.get("return_entropy") else (out, None)
    else:
        lp, ent, _ = fn(h, w, labels, bias=b, **kw)
        lp = lp.view(labels.shape)
        ent = ent.view(labels.shape) if ent is not None else None
    loss = (lp * g_lp.to(lp.dtype)).sum()
    if ent is not None:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    leaves = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads, strict=True)]
    return lp, ent, grads[0], grads[1], (grads[2] if b is not None else None)


def check_grad(actual, ref, base, truth, dtype, what):
    """See the module docstring: elementwise against the reference, relative to the gradient's
    scale, and no worse than twice the error of `base` (eager in dtype) against the float64 truth."""
    assert actual.dtype == dtype and actual.shape == ref.shape, what
    tol = GRAD_TOL[dtype]
    scale = ref.detach().float().abs().max().item()
    assert_close(actual, ref, what, atol=max(tol["atol"], tol["rtol"] * scale), rtol=tol["rtol"])
    err = (actual.detach().double() - truth).abs().max().item()
    bound = 2 * (base.detach().double() - truth).abs().max().item() + 1e-6 * scale
    assert err <= bound, f"{what}: max error {err:.3e} against float64, more than the bound {bound:.3e}"


def compare(hidden, weight, bias, labels, dtype, *, unit_grads=False, seed=1, **kw):
    """Kernel vs reference (OUT_TOL on outputs, check_grad on gradients); returns the kernel's results."""
    g = torch.Generator().manual_seed(seed)
    shape = labels.shape
    g_lp = torch.ones(shape) if unit_grads else torch.randn(shape, generator=g)
    g_ent = torch.ones(shape) if unit_grads else torch.randn(shape, generator=g)
    got = run(None, hidden, weight, bias, labels, g_lp, g_ent, **kw)
    ref = run(linear_logprobs_ref, hidden, weight, bias, labels, g_lp, g_ent, **kw)
    base = run(eager, hidden, weight, bias, labels, g_lp, g_ent, **kw)
    truth = run(truth64, hidden, weight, bias, labels, g_lp.double(), g_ent.double(), dtype=torch.float64, **kw)
    lp, ent = got[0], got[1]
    assert lp.dtype == torch.float32 and lp.shape == shape
    assert_close(lp, ref[0], "logprobs", **OUT_TOL)
    if kw.get("return_entropy"):
        assert ent.dtype == torch.float32 and ent.shape == shape
        assert_close(ent, ref[1], "entropy", **OUT_TOL)
    names = ("grad_hidden", "grad_weight", "grad_bias")
    for i, name in enumerate(names, start=2):
        if got[i] is None:
            assert bias is None and name == "grad_bias"
            continue
        check_grad(got[i], ref[i], base[i], truth[i], dtype, name)
    ignored = labels == IGNORE
    assert (lp[ignored] == 0).all()
    if kw.get("return_entropy"):
        assert (ent[ignored] == 0).all()
    return got


# (lead shape of hidden, H, V, bias, temperature, softcap, entropy)
CASES = [
    pytest.param((3, 7), 64, 1000, True, 0.7, None, True, id="3d-H64-V1000-bias-T0.7-entropy"),
    pytest.param((37,), 100, 1000, False, 1.0, 5.0, True, id="N37-H100-V1000-softcap5-entropy"),
    pytest.param((2, 16), 8, 1, True, 1.3, 30.0, True, id="3d-H8-V1-bias-softcap30-entropy"),
    pytest.param((2, 16), 8, 32001, True, 0.7, 5.0, True, id="3d-H8-V32001-bias-T0.7-softcap5-entropy",
                 marks=pytest.mark.slow),
    pytest.param((5, 9), 100, 1000, True, 1.0, None, False, id="3d-H100-V1000-bias-no-entropy"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, hdim, vocab, bias, temperature, softcap, entropy", CASES)
def test_matches_reference(dtype, lead, hdim, vocab, bias, temperature, softcap, entropy):
    if vocab > 30000 and dtype != torch.float32:
        pytest.skip("V = 32001 (63 vocabulary tiles, 4 splits) runs in fp32, the tightest tolerance; the 16-bit "
                    "paths are covered at V <= 1000 (interpreter time)")
    hidden, weight, b, labels = make_inputs(lead, hdim, vocab, dtype, bias=bias)
    compare(hidden, weight, b, labels, dtype, temperature=temperature, logit_softcap=softcap,
            return_entropy=entropy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logprobs_only_unit_grads(dtype):
    """No entropy (its term is compiled out) and the unit upstream gradient of a plain sum."""
    hidden, weight, b, labels = make_inputs((4, 6), 64, 1000, dtype, seed=3)
    compare(hidden, weight, b, labels, dtype, unit_grads=True, temperature=1.0)


def test_entropy_grad_only():
    """Only the entropy is in the loss (an entropy bonus): the log-prob gradient reaches the op as None."""
    hidden, weight, b, labels = make_inputs((12,), 64, 1000, torch.float32, seed=4)
    leaves = lambda: [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    h, w, bb = leaves()
    _, ent = rlhf_fast.linear_logprobs(h, w, labels, bias=bb, return_entropy=True, backend=BACKEND)
    ent.sum().backward()
    hr, wr, br = leaves()
    _, ent_r, _ = linear_logprobs_ref(hr, wr, labels, bias=br, return_entropy=True)
    ent_r.sum().backward()
    for got, want, name in ((h, hr, "grad_hidden"), (w, wr, "grad_weight"), (bb, br, "grad_bias")):
        scale = want.grad.abs().max().item()
        assert_close(got.grad, want.grad, name, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_tied_weights(dtype):
    """The lm_head weight is also the input embedding of the same graph: both uses' gradients add up."""
    vocab, hdim = 1000, 64
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(vocab, hdim, generator=g) / hdim ** 0.5).to(dtype)
    proj = (torch.randn(hdim, hdim, generator=g) / hdim ** 0.5).to(dtype)
    tokens = torch.randint(0, vocab, (3, 11), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE
    results = []
    for kind in ("op", "ref"):
        w = weight.clone().requires_grad_(True)
        hidden = torch.tanh(w[tokens] @ proj) * 3  # embedding lookup -> a layer -> lm_head (same w)
        if kind == "op":
            lp, ent = rlhf_fast.linear_logprobs(hidden, w, labels, temperature=0.9, return_entropy=True,
                                                backend=BACKEND)
        else:
            lp, ent, _ = linear_logprobs_ref(hidden.reshape(-1, hdim), w, labels.reshape(-1), temperature=0.9,
                                             return_entropy=True)
        (-(lp.sum()) + 0.1 * ent.sum()).backward()
        results.append(w.grad)
    got, want = results
    scale = want.abs().max().item()
    tol = GRAD_TOL[dtype]
    assert_close(got, want, "grad_weight (embedding + lm_head)", atol=4 * tol["rtol"] * scale, rtol=tol["rtol"])
    assert got[tokens.unique()].abs().sum() > 0


def test_ignored_row_blocks_and_all_ignored():
    """Most rows ignored: the kept rows are sorted first, so whole row blocks have nothing to do
    (forward and backward skip them); then a batch with every row ignored."""
    hidden, weight, b, labels = make_inputs((96,), 64, 1000, torch.float32, ignore_frac=0.8, seed=6)
    assert (labels == IGNORE).sum() > 64  # more than two interpreter row blocks (BLOCK_M = 32) ignored
    compare(hidden, weight, b, labels, torch.float32, temperature=1.1, return_entropy=True)

    labels = torch.full((2, 5), IGNORE)
    h = torch.randn(2, 5, 64, requires_grad=True)
    w = weight.clone().requires_grad_(True)
    lp, ent = rlhf_fast.linear_logprobs(h, w, labels, return_entropy=True, backend=BACKEND)
    assert torch.equal(lp, torch.zeros(2, 5)) and torch.equal(ent, torch.zeros(2, 5))
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_masked_vocabulary_and_dead_rows():
    """A bias of -inf masks vocabulary entries (p = 0, no gradient there, never NaN); a row whose
    logits are all -inf has lse = logprob = -inf, entropy 0 and no gradient."""
    vocab = 1000
    hidden, weight, b, labels = make_inputs((6,), 64, vocab, torch.float32, ignore_frac=0.0, seed=7)
    b[vocab // 2:] = float("-inf")
    labels %= vocab // 2
    labels[3] = vocab - 1  # a label on a masked entry: logprob -inf
    g_lp, g_ent = torch.randn(6), torch.randn(6)
    keep = torch.arange(6) != 3  # the -inf log-prob's gradient is not comparable; leave it out
    lp, ent, gh, gw, gb = run(None, hidden, weight, b, labels, g_lp * keep, g_ent, temperature=0.8,
                              return_entropy=True)
    lp_r, ent_r, gh_r, gw_r, gb_r = run(linear_logprobs_ref, hidden, weight, b, labels, g_lp * keep, g_ent,
                                        temperature=0.8, return_entropy=True)
    assert lp[3] == float("-inf") and torch.isfinite(ent).all()
    assert_close(lp, lp_r, "logprobs", **OUT_TOL)
    assert_close(ent, ent_r, "entropy", **OUT_TOL)
    for got, want, name in ((gh, gh_r, "grad_hidden"), (gw, gw_r, "grad_weight"), (gb, gb_r, "grad_bias")):
        assert not got.isnan().any(), name
        assert_close(got, want, name, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    masked = torch.arange(vocab) >= vocab // 2
    masked[vocab - 1] = False  # row 3's label: d(z_y - lse)/dz_y = 1 even at z_y = -inf (g_lp is 0 there)
    assert torch.equal(gw[masked], torch.zeros_like(gw[masked])) and torch.equal(gb[masked], gb[masked] * 0)

    # Dead rows: every logit -inf (bias -inf everywhere, no cap), kept and ignored labels.
    b_dead = torch.full((vocab,), float("-inf"))
    labels = torch.tensor([5, IGNORE])
    h = hidden[:2].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    bd = b_dead.clone().requires_grad_(True)
    lp, ent = rlhf_fast.linear_logprobs(h, w, labels, bias=bd, return_entropy=True, backend=BACKEND)
    assert lp[0] == float("-inf") and lp[1] == 0 and torch.equal(ent, torch.zeros(2))
    (ent.sum() + lp[1]).backward()
    for t in (h, w, bd):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_int32_labels_and_empty():
    hidden, weight, b, labels = make_inputs((3, 4), 8, 97, torch.float32, seed=8)
    a = rlhf_fast.linear_logprobs(hidden, weight, labels.int(), bias=b, backend=BACKEND)
    c = rlhf_fast.linear_logprobs(hidden, weight, labels, bias=b, backend=BACKEND)
    assert torch.equal(a, c)
    h = torch.randn(0, 5, 8, requires_grad=True)
    w = weight.clone().requires_grad_(True)
    lp, ent = rlhf_fast.linear_logprobs(h, w, torch.zeros(0, 5, dtype=torch.long), return_entropy=True,
                                        backend=BACKEND)
    assert lp.shape == (0, 5) and ent.shape == (0, 5)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == h.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_label_out_of_range():
    hidden, weight, _, _ = make_inputs((3,), 8, 97, torch.float32)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 97\).*got 97"):
        rlhf_fast.linear_logprobs(hidden, weight, torch.tensor([0, 97, IGNORE]), backend=BACKEND)


def test_caller_tensors_untouched():
    hidden, weight, b, labels = make_inputs((4, 5), 64, 1000, torch.bfloat16, seed=9)
    before = [t.clone() for t in (hidden, weight, b, labels)]
    leaves = [t.requires_grad_(True) for t in (hidden, weight, b)]
    lp, ent = rlhf_fast.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], logit_softcap=10.0,
                                        return_entropy=True, backend=BACKEND)
    (lp.sum() + ent.sum()).backward()
    for t, t0 in zip((hidden, weight, b, labels), before, strict=True):
        assert torch.equal(t.detach(), t0)


def test_opcheck():
    hidden, weight, b, labels = make_inputs((9,), 32, 300, torch.float32, seed=10)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    op = torch.ops.rlhf_fast.linear_logprobs.default
    # (hidden, weight, bias, labels, temperature, softcap (0 = none), ignore_index, return_entropy,
    #  tile_rows, tile_cols (unused by triton), backend)
    for bias, softcap, entropy in ((None, 0.0, False), (b.requires_grad_(True), 20.0, True)):
        torch.library.opcheck(op, (h, w, bias, labels, 0.9, softcap, IGNORE, entropy, 9, 300, BACKEND))
    lp, ent, lse = op(h.detach(), w.detach(), b.detach(), labels, 0.9, 20.0, IGNORE, True, 9, 300, BACKEND)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_logprobs_backward.default,
                          (torch.randn(9), torch.randn(9), h.detach(), w.detach(), b.detach(), labels, lse, ent, 0.9,
                           20.0, IGNORE, 9, 300, BACKEND))


def test_vocab_split_on_h100():
    """The forward grid for N = 8192, V = 128256 on 132 SMs: groups of 8 row blocks x 16 vocabulary
    ranges (one wave each), every range non-empty; short batches get more ranges."""
    from rlhf_fast.kernels.linear_logprobs import FWD_16, vocab_splits

    n_tiles = -(-128256 // FWD_16.block_n)
    splits, per = vocab_splits(8192 // FWD_16.block_m, n_tiles, 132, FWD_16.group_m)
    assert (splits, per) == (16, 63)
    assert (splits - 1) * per < n_tiles <= splits * per
    splits, per = vocab_splits(1, n_tiles, 132, FWD_16.group_m)
    assert splits >= 120 and (splits - 1) * per < n_tiles
    assert vocab_splits(4, 1, 132, 8) == (1, 1)
