"""Every op on the GPU: each GPU backend (cuda, triton) against the torch backend on the same CUDA tensors.

The other test files check the backends on CPU tensors (triton under its interpreter); these run the
compiled GPU kernels. Per op, a few awkward shapes (odd sizes, masked rows, ignored labels, vocabularies
that no block divides, GQA, packed sequences), fp32 / bf16 / fp16: every output (statistics included)
and the gradient of every differentiable input under a random upstream gradient, within the dtype's
tolerance of the reference; every gradient in its input's dtype; finite wherever the reference is.

Device: CUDA when available (the tests are skipped otherwise); RLHF_FAST_TEST_DEVICE=cpu runs the same
code on CPU tensors with the cpu backend and triton's interpreter, the rehearsal of `make gpu-check
DRY_RUN=1`. Test names contain "gpu": `pytest tests -k gpu` selects them.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import rlhf_fast
from rlhf_fast.backends import op_registry

DEVICE = os.environ.get("RLHF_FAST_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_GPU = DEVICE == "cuda"
BACKENDS = ("cuda", "triton") if ON_GPU else ("cpu", "triton")
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (RLHF_FAST_TEST_DEVICE=cpu runs this "
                                                       "file's code on the CPU backends)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (rtol, atol as a fraction of the reference's largest magnitude over all tensors of the kind): outputs are
# computed in fp32 from the same rounded inputs, 16-bit gradients and attention outputs are rounded once
# (fp32 GEMMs may run as TF32 on the GPU, hence fp32's 1e-3).
TOL = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (2e-2, 1e-2), torch.float16: (4e-3, 2e-3)}
IGNORE = -100


@dataclasses.dataclass
class Case:
    """call(backend, *inputs) -> outputs; inputs[i] for i in `diff` are differentiated."""

    call: object
    inputs: list
    diff: tuple = ()


def _randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype)


def _labels(vocab, *shape, ignored=0.15):
    labels = torch.randint(0, vocab, shape, device=DEVICE)
    return torch.where(torch.rand(shape, device=DEVICE) < ignored, IGNORE, labels)


def _mask(b, t):
    mask = torch.rand(b, t, device=DEVICE) > 0.3
    mask[-1] = False  # a fully masked row
    return mask


# ---------------------------------------------------------------------------------------------
# The cases: op -> {shape id: builder(dtype) -> Case}
# ---------------------------------------------------------------------------------------------

def gather_case(n, vocab, temperature=1.0):
    def build(dtype):
        logits = _randn(*n, vocab, dtype=dtype, scale=3.0)
        labels = _labels(vocab, *n)
        return Case(lambda b, x: rlhf_fast.gather_logprobs(x, labels, temperature=temperature, return_entropy=True,
                                                             backend=b), [logits], (0,))
    return build


def linear_logprobs_case(b, t, hdim, vocab, bias=True, softcap=None):
    def build(dtype):
        hidden = _randn(b, t, hdim, dtype=dtype)
        weight = _randn(vocab, hdim, dtype=dtype, scale=hdim ** -0.5)
        labels = _labels(vocab, b, t)
        inputs = [hidden, weight] + ([_randn(vocab, dtype=dtype, scale=0.1)] if bias else [])

        def call(backend, h, w, *bias_):
            return rlhf_fast.linear_logprobs(h, w, labels, bias=bias_[0] if bias_ else None, logit_softcap=softcap,
                                             temperature=0.9, return_entropy=True, backend=backend)
        return Case(call, inputs, tuple(range(len(inputs))))
    return build


def linear_ppo_case(b, t, hdim, vocab):
    def build(dtype):
        hidden, ptx_hidden = _randn(b, t, hdim, dtype=dtype), _randn(2, 7, hdim, dtype=dtype)
        weight = _randn(vocab, hdim, dtype=dtype, scale=hdim ** -0.5)
        bias = _randn(vocab, dtype=dtype, scale=0.1)
        labels, ptx_labels = torch.randint(0, vocab, (b, t), device=DEVICE), _labels(vocab, 2, 7)
        mask = _mask(b, t).float()
        old = _randn(b, t, scale=0.1, shift=-float(torch.tensor(vocab).log()))
        adv, ref = _randn(b, t), old + _randn(b, t, scale=0.05)

        def call(backend, h, w, ph, bi):
            return rlhf_fast.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                             kl_estimator="k3", entropy_coef=0.01, dual_clip=3.0,
                                             aggregation="seq-mean-token-mean", ptx_hidden=ph, ptx_labels=ptx_labels,
                                             ptx_coef=0.5, temperature=0.9, bias=bi, backend=backend)
        return Case(call, [hidden, weight, ptx_hidden, bias], (0, 1, 2, 3))
    return build


def linear_case(m, k, n):
    def build(dtype):
        inputs = [_randn(m, k, dtype=dtype), _randn(n, k, dtype=dtype, scale=k ** -0.5), _randn(n, dtype=dtype)]
        return Case(lambda b, x, w, bias: rlhf_fast.linear(x, w, bias, backend=b), inputs, (0, 1, 2))
    return build


def kl_case(estimator, clamp=None):
    def build(dtype):
        lp = _randn(5, 131, dtype=dtype, scale=0.5, shift=-3)
        ref = (lp.float() + _randn(5, 131, scale=0.3)).to(dtype)
        return Case(lambda b, x, y: rlhf_fast.kl_penalty(x, y, estimator=estimator, clamp=clamp, backend=b),
                    [lp, ref], (0,))  # ref_logprobs is data: no gradient
    return build


def policy_case(aggregation, dual_clip=None, clip_eps_high=None, **options):
    def build(dtype):
        b, t = 6, 97
        lp = _randn(b, t, dtype=dtype, scale=0.2, shift=-2)
        old = (lp.float() + _randn(b, t, scale=0.3)).to(dtype)
        adv, mask = _randn(b, t, dtype=dtype), _mask(b, t)
        return Case(lambda bk, x: rlhf_fast.ppo_policy_loss(x, old, adv, mask, dual_clip=dual_clip,
                                                             clip_eps_high=clip_eps_high, aggregation=aggregation,
                                                             **options, backend=bk), [lp], (0,))
    return build


def value_case(aggregation):
    def build(dtype):
        b, t = 6, 97
        values = _randn(b, t, dtype=dtype)
        old = (values.float() + _randn(b, t, scale=0.3)).to(dtype)
        returns, mask = _randn(b, t, dtype=dtype), _mask(b, t)
        return Case(lambda bk, v: rlhf_fast.value_loss(v, old, returns, mask, clip_eps=0.2, aggregation=aggregation,
                                                        backend=bk), [values], (0,))
    return build


def gae_case(packed, whiten):
    def build(dtype):
        if packed:
            lens = torch.tensor([0, 301, 1, 77, 0, 512])
            cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(DEVICE)
            n = int(cu[-1])
            rewards, values = _randn(n, dtype=dtype), _randn(n, dtype=dtype)
            mask = torch.rand(n, device=DEVICE) > 0.1
            return Case(lambda b, r, v: rlhf_fast.gae(r, v, mask, gamma=0.99, lam=0.95, whiten=whiten, cu_seqlens=cu,
                                                      backend=b), [rewards, values])
        rewards, values, mask = _randn(7, 301, dtype=dtype), _randn(7, 301, dtype=dtype), _mask(7, 301)
        return Case(lambda b, r, v: rlhf_fast.gae(r, v, mask, gamma=1.0, lam=0.95, whiten=whiten, backend=b),
                    [rewards, values])
    return build


def ranking_case(p, k, margin=0.0):
    def build(dtype):
        rewards = _randn(p, k, dtype=dtype)
        n = torch.randint(2, k + 1, (p,), device=DEVICE)
        n[0] = 0  # a prompt without candidates
        return Case(lambda b, r: rlhf_fast.ranking_loss(r, num_candidates=n, margin=margin, backend=b), [rewards], (0,))
    return build


def pairwise_case(p):
    def build(dtype):
        return Case(lambda b, c, r: rlhf_fast.pairwise_loss(c, r, margin=0.1, backend=b),
                    [_randn(p, dtype=dtype), _randn(p, dtype=dtype)], (0, 1))
    return build


def attention_case(b, hq, hkv, t, s, d, causal=True, key_mask=False):
    def build(dtype):
        q, k, v = _randn(b, hq, t, d, dtype=dtype), _randn(b, hkv, s, d, dtype=dtype), _randn(b, hkv, s, d, dtype=dtype)
        mask = None
        if key_mask:
            mask = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
            mask[0, : s // 3] = False  # left padding
            mask[-1, -5:] = False      # right padding
        return Case(lambda bk, q_, k_, v_: rlhf_fast.attention(q_, k_, v_, causal=causal, attention_mask=mask,
                                                               backend=bk), [q, k, v], (0, 1, 2))
    return build


def varlen_case(lens_q, lens_k, hq, hkv, d, causal=True):
    def build(dtype):
        cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
        q = _randn(sum(lens_q), hq, d, dtype=dtype)
        k, v = _randn(sum(lens_k), hkv, d, dtype=dtype), _randn(sum(lens_k), hkv, d, dtype=dtype)
        return Case(lambda b, q_, k_, v_: rlhf_fast.varlen_attention(q_, k_, v_, cu_q, cu_k, max(lens_q), max(lens_k),
                                                                     causal=causal, backend=b), [q, k, v], (0, 1, 2))
    return build


def shared_prefix_case(prompts, answers, hq, hkv, d):
    def build(dtype):
        layout = rlhf_fast.shared_prefix_layout(prompts, answers, device=DEVICE)
        total = sum(prompts) + sum(sum(a) for a in answers)
        q = _randn(total, hq, d, dtype=dtype)
        k, v = _randn(total, hkv, d, dtype=dtype), _randn(total, hkv, d, dtype=dtype)
        return Case(lambda b, q_, k_, v_: rlhf_fast.shared_prefix_attention(q_, k_, v_, layout, backend=b),
                    [q, k, v], (0, 1, 2))
    return build


# (op, shape id, builder, GPU only: too slow for the interpreter's rehearsal)
CASES = [
    ("gather_logprobs", "41x1271-t0.7", gather_case((41,), 1271, temperature=0.7), False),
    ("gather_logprobs", "3x9x32003", gather_case((3, 9), 32003), False),
    ("gather_logprobs", "4x262147", gather_case((4,), 262147), True),
    ("linear_logprobs", "3x41x64-v1271-bias", linear_logprobs_case(3, 41, 64, 1271), False),
    ("linear_logprobs", "2x33x128-v32003-softcap", linear_logprobs_case(2, 33, 128, 32003, bias=False, softcap=30.0),
     True),
    ("linear_ppo_loss", "4x33x64-v20001", linear_ppo_case(4, 33, 64, 20001), True),
    ("linear_ppo_loss", "3x9x16-v500", linear_ppo_case(3, 9, 16, 500), False),
    ("linear", "41x67x131", linear_case(41, 67, 131), False),
    ("kl_penalty", "5x131-k1", kl_case("k1"), False),
    ("kl_penalty", "5x131-k2", kl_case("k2"), False),
    ("kl_penalty", "5x131-k3-clamp", kl_case("k3", clamp=10.0), False),
    ("ppo_policy_loss", "6x97-token-mean", policy_case("token-mean"), False),
    ("ppo_policy_loss", "6x97-seq-dual-clip", policy_case("seq-mean-token-mean", dual_clip=3.0, clip_eps_high=0.28),
     False),
    ("ppo_policy_loss", "6x97-cispo", policy_case("token-mean", clip_eps_high=4.0, objective="cispo"), False),
    ("ppo_policy_loss", "6x97-gspo", policy_case("seq-mean-token-mean", ratio_level="sequence"), False),
    ("value_loss", "6x97-token-mean", value_case("token-mean"), False),
    ("value_loss", "6x97-seq-mean-token-sum", value_case("seq-mean-token-sum"), False),
    ("gae", "7x301", gae_case(packed=False, whiten=False), False),
    ("gae", "7x301-whiten", gae_case(packed=False, whiten=True), False),
    ("gae", "packed-891-whiten", gae_case(packed=True, whiten=True), False),
    ("ranking_loss", "13x9-margin", ranking_case(13, 9, margin=0.1), False),
    ("ranking_loss", "3x4", ranking_case(3, 4), False),
    ("pairwise_loss", "37", pairwise_case(37), False),
    ("attention", "2x4/2x67x64-causal", attention_case(2, 4, 2, 67, 67, 64), False),
    ("attention", "2x8/8x67-131x128-keymask", attention_case(2, 8, 8, 67, 131, 128, causal=False, key_mask=True),
     True),
    ("attention", "1x4/1x300x80-causal-mqa", attention_case(1, 4, 1, 300, 300, 80), True),
    ("varlen_attention", "5,67,1,33x64", varlen_case([5, 67, 1, 33], [5, 67, 1, 33], 4, 2, 64), False),
    ("varlen_attention", "q<k-noncausal", varlen_case([3, 40], [9, 57], 4, 4, 128, causal=False), True),
    ("shared_prefix_attention", "13+[5,9,1];29+[17,3]", shared_prefix_case([13, 29], [[5, 9, 1], [17, 3]], 4, 2, 64),
     False),
]
REGISTRY_OF = {"pairwise_loss": "ranking_loss"}


def _params():
    for op, shape, build, gpu_only in CASES:
        for dname, dtype in DTYPES.items():
            for backend in BACKENDS:
                marks = [pytest.mark.skip(reason="GPU-only size")] if gpu_only and not ON_GPU else []
                yield pytest.param(op, build, dtype, backend, id=f"{op}-{shape}-{dname}-{backend}", marks=marks)


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

def _flatten(out) -> list:
    if out is None or isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _flatten(out[key])]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in _flatten(getattr(out, f.name))]
    return [t for o in out for t in _flatten(o)]


def _run(case: Case, backend: str, upstream: list | None):
    leaves = [x.detach().clone().requires_grad_(i in case.diff) for i, x in enumerate(case.inputs)]
    before = [x.detach().clone() for x in leaves]
    outs = _flatten(case.call(backend, *leaves))
    grads = []
    if case.diff:
        float_outs = [o for o in outs if o is not None and o.requires_grad]
        if upstream is None:  # one random upstream gradient per output, shared by every backend
            upstream = [torch.randn(o.shape, device=o.device) for o in float_outs]
        loss = sum((torch.where(o.isfinite(), o.float(), 0) * w).sum() for o, w in zip(float_outs, upstream,
                                                                                       strict=True))
        loss.backward()
        grads = [leaves[i].grad for i in case.diff]
    for i, (x, x0) in enumerate(zip(leaves, before, strict=True)):
        assert torch.equal(x.detach(), x0), f"input {i} was written in place"
    return [o.detach() if o is not None else None for o in outs], grads, upstream


def _compare(got: list, want: list, kind: str, dtype: torch.dtype) -> None:
    assert len(got) == len(want), f"{kind}: {len(got)} tensors, the reference has {len(want)}"
    scale = max([w.float().abs().nan_to_num(posinf=0, neginf=0).max().item() for w in want
                 if w is not None and w.numel() and w.is_floating_point()], default=0.0)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        what = f"{kind}[{i}]"
        if g is None or w is None:
            assert g is None and w is None, f"{what}: {g is None=} but reference {w is None=}"
            continue
        assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)}, reference {tuple(w.shape)}"
        if not w.is_floating_point():
            assert torch.equal(g.cpu(), w.cpu()), f"{what}: {g.tolist()} != reference {w.tolist()}"
            continue
        rtol, atol = TOL.get(w.dtype if w.dtype != torch.float32 else dtype, TOL[torch.float32])
        gf, wf = g.float(), w.float()
        assert torch.equal(gf.isfinite(), wf.isfinite()), f"{what}: non-finite where the reference is finite"
        finite = wf.isfinite()
        err = (gf - wf).abs()[finite]
        bad = err > atol * max(scale, 1e-6) + rtol * wf.abs()[finite]
        assert not bad.any(), (f"{what} ({g.dtype}): {int(bad.sum())} of {bad.numel()} out of tolerance (rtol {rtol}, "
                               f"atol {atol} x {scale:.3g}); max |diff| {err.max().item():.3g}")


@pytest.mark.parametrize("op, build, dtype, backend", list(_params()))
def test_gpu_op_matches_torch(op, build, dtype, backend):
    registry = op_registry(REGISTRY_OF.get(op, op))
    if backend not in registry.impls:
        pytest.skip(f"{op} has no {backend} backend (registered: {sorted(registry.impls)})")
    torch.manual_seed(0)
    case = build(dtype)
    reasons = registry.reasons(backend, case.inputs)
    if reasons:
        pytest.skip(f"{op} on {backend}: " + "; ".join(reasons))
    outs, grads, upstream = _run(case, backend, None)
    want_outs, want_grads, _ = _run(case, "torch", upstream)
    _compare(outs, want_outs, "outputs", dtype)
    for i, g in zip(case.diff, grads, strict=True):
        assert g is not None, f"grad of input {i} is None"
        assert g.dtype == case.inputs[i].dtype, f"grad of input {i}: dtype {g.dtype}, input {case.inputs[i].dtype}"
    _compare(grads, want_grads, "grads", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_compiled_fullgraph(backend):
    """One torch.compile(fullgraph=True) case per device: gather_logprobs and its backward compile into one
    graph around the custom op and match eager."""
    if backend not in op_registry("gather_logprobs").impls:
        pytest.skip(f"gather_logprobs has no {backend} backend")
    torch.manual_seed(0)
    logits = _randn(37, 1031, scale=3.0)
    labels = _labels(1031, 37)
    if op_registry("gather_logprobs").reasons(backend, [logits]):
        pytest.skip("; ".join(op_registry("gather_logprobs").reasons(backend, [logits])))

    def f(x):
        lp, ent = rlhf_fast.gather_logprobs(x, labels, return_entropy=True, backend=backend)
        return (lp * 2 + ent).sum()

    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = f(x1)
    eager.backward()
    compiled = torch.compile(f, fullgraph=True)(x2)
    compiled.backward()
    _compare([compiled.detach()], [eager.detach()], "loss", torch.float32)
    _compare([x2.grad], [x1.grad], "grad", torch.float32)


def test_gpu_extreme_logits_stay_finite():
    """Logits of +-3e38 and a row of -inf on every GPU backend: finite log-probs, no NaN in the gradient."""
    for backend in BACKENDS:
        registry = op_registry("gather_logprobs")
        logits = torch.full((3, 4099), -3e38, device=DEVICE)
        logits[0, 7] = 3e38
        logits[2] = float("-inf")
        labels = torch.tensor([7, 5, 3], device=DEVICE)
        if registry.reasons(backend, [logits]):
            continue
        x = logits.clone().requires_grad_()
        lp = rlhf_fast.gather_logprobs(x, labels, backend=backend)
        ref = rlhf_fast.gather_logprobs(logits, labels, backend="torch")
        assert torch.equal(lp.isfinite(), ref.isfinite()), (backend, lp, ref)
        lp[lp.isfinite()].sum().backward()
        assert not x.grad.isnan().any(), backend
