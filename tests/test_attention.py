"""attention, varlen_attention and shared_prefix_attention against the references, for every backend that
runs here (torch, cpu = torch's fused CPU flash kernel, triton under TRITON_INTERPRET=1): outputs and
dq/dk/dv with a random upstream gradient; causal and not, T != S (bottom-right), GQA/MQA, left/right/holey
padding, fully masked rows, varlen with lengths 0..N, shared prefix with K in {1, 4, 9}; opcheck on the
custom ops, one torch.compile(fullgraph=True) case, and the ValueErrors of bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import assert_close

import rlhf_fast
from rlhf_fast.ops.attention.dense import _attention_op
from rlhf_fast.ops.attention.shared_prefix import _shared_op
from rlhf_fast.ops.attention.varlen import _varlen_op
from rlhf_fast.reference import (
    attention_ref,
    causal_mask_ref,
    shared_prefix_attention_ref,
    shared_prefix_mask_ref,
    varlen_attention_ref,
)

# Outputs: one rounding of the dtype plus the low-precision P of the P @ V product (as flash-attn).
# Gradients: relative to the largest reference gradient (they are sums over up to S keys or T queries).
OUT_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=1e-2),
           torch.bfloat16: dict(atol=1.6e-2, rtol=5e-2)}
GRAD_REL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The cpu backend of these ops is torch's own fused CPU kernel: it runs without rlhf_fast._C.
BACKENDS = sorted(set(CPU_BACKENDS) | {"cpu"})


def _grad_close(actual, expected, what, dtype):
    scale = max(expected.detach().float().abs().max().item(), 1e-3)
    assert_close(actual, expected, what, atol=GRAD_REL[dtype] * scale, rtol=GRAD_REL[dtype] * 4)


def _run(fn, ref_fn, q, k, v, dtype):
    """Output and dq/dk/dv of fn and of ref_fn (fp32, on the same rounded inputs), same upstream gradient."""
    results = []
    for f, cast in ((fn, dtype), (ref_fn, torch.float32)):
        qq, kk, vv = (x.detach().to(cast).requires_grad_(True) for x in (q, k, v))
        out = f(qq, kk, vv)
        if not results:
            grad = torch.randn(out.shape).to(dtype)
        out.backward(grad.to(cast))
        results.append((out, qq.grad, kk.grad, vv.grad))
    (o, dq, dk, dv), (o_r, dq_r, dk_r, dv_r) = results
    assert o.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert torch.isfinite(o).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert_close(o, o_r, "out", **OUT_TOL[dtype])
    _grad_close(dq, dq_r, "dq", dtype)
    _grad_close(dk, dk_r, "dk", dtype)
    _grad_close(dv, dv_r, "dv", dtype)
    return o


def _qkv(b, hq, hkv, t, s, d, dtype, packed=False):
    if packed:
        return (torch.randn(t, hq, d).to(dtype), torch.randn(s, hkv, d).to(dtype), torch.randn(s, hkv, d).to(dtype))
    return (torch.randn(b, hq, t, d).to(dtype), torch.randn(b, hkv, s, d).to(dtype),
            torch.randn(b, hkv, s, d).to(dtype))


def _key_mask(kind, b, s):
    if kind is None:
        return None
    mask = torch.ones(b, s, dtype=torch.bool)
    if kind == "left":  # a prompt left-padded to the batch: leading keys missing, one row more than half
        for i in range(b):
            mask[i, : (i * 7 + 5) % (s // 2 + 1)] = False
    elif kind == "right":
        for i in range(b):
            mask[i, s - (i * 5 + 3) % (s // 2 + 1):] = False
    elif kind == "holes":
        mask = torch.rand(b, s) > 0.3
        mask[:, -1] = True
    elif kind == "empty":  # batch 0 has no key at all
        mask[0] = False
        mask[1:, :3] = False
    return mask


# (B, Hq, Hkv, T, S, D, causal, padding)
DENSE = [
    (2, 4, 4, 64, 64, 32, True, None),
    (2, 4, 2, 37, 53, 16, True, None),      # T < S, bottom-right, GQA
    (1, 4, 1, 50, 20, 64, True, None),      # T > S: the first 30 rows see no key; MQA
    (2, 2, 2, 33, 33, 16, False, "right"),
    (3, 4, 2, 48, 48, 32, True, "left"),    # left padding: the padded query rows see nothing
    (3, 2, 1, 1, 40, 64, True, "left"),     # one decoding step against a left-padded KV cache
    (2, 2, 1, 40, 72, 16, True, "holes"),
    (2, 2, 2, 24, 24, 16, False, "empty"),  # a batch element with no key at all
    (1, 2, 1, 128, 128, 64, True, "right"),  # the largest interpreted shape: 8 x 4 tiles per head
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DENSE, ids=str)
def test_attention_fp32(backend, case):
    b, hq, hkv, t, s, d, causal, pad = case
    q, k, v = _qkv(b, hq, hkv, t, s, d, torch.float32)
    mask = _key_mask(pad, b, s)
    out = _run(lambda q, k, v: rlhf_fast.attention(q, k, v, causal=causal, attention_mask=mask, backend=backend),
               lambda q, k, v: attention_ref(q, k, v, causal=causal, attention_mask=mask), q, k, v, torch.float32)
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) storage, what transformers consumes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [DENSE[1], DENSE[4]], ids=str)
def test_attention_low_precision(backend, dtype, case):
    b, hq, hkv, t, s, d, causal, pad = case
    q, k, v = _qkv(b, hq, hkv, t, s, d, dtype)
    mask = _key_mask(pad, b, s)
    _run(lambda q, k, v: rlhf_fast.attention(q, k, v, causal=causal, attention_mask=mask, backend=backend),
         lambda q, k, v: attention_ref(q, k, v, causal=causal, attention_mask=mask), q, k, v, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_grads(backend):
    q, k, v = _qkv(2, 2, 2, 8, 8, 16, torch.float32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0] = False        # batch 0: no key
    mask[1, :4] = False    # batch 1, causal: query rows 0..3 see only padding
    q.requires_grad_(True)
    out = rlhf_fast.attention(q, k, v, causal=True, attention_mask=mask, backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[0] == 0).all() and (out[1, :, :4] == 0).all()
    assert (q.grad[0] == 0).all() and (q.grad[1, :, :4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_strided_inputs(backend):
    """q/k/v as transformers hands them over: (B, T, H, D) memory viewed as (B, H, T, D)."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _qkv(2, 4, 2, 20, 20, 32, torch.float32))
    _run(lambda q, k, v: rlhf_fast.attention(q, k, v, backend=backend), attention_ref, q, k, v, torch.float32)


def test_causal_is_bottom_right():
    mask = causal_mask_ref(2, 4)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask_ref(3, 1).tolist() == [[False], [False], [True]]


# ---------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------

def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


VARLEN = [  # (q lengths, k lengths, Hq, Hkv, D, causal)
    ([1, 5, 17, 33, 2], [1, 5, 17, 33, 2], 4, 2, 32, True),
    ([3, 0, 40, 9], [3, 0, 40, 9], 2, 2, 16, False),
    ([1, 1, 4, 6], [7, 30, 4, 13], 2, 1, 64, True),  # decoding-like: fewer queries than keys
    ([2, 8], [0, 5], 2, 2, 16, True),                # a sequence with queries but no keys
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VARLEN, ids=str)
def test_varlen(backend, case):
    lq, lk, hq, hkv, d, causal = case
    q, k, v = _qkv(1, hq, hkv, sum(lq), sum(lk), d, torch.float32, packed=True)
    cu_q, cu_k = _cu(lq), _cu(lk)
    _run(lambda q, k, v: rlhf_fast.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                    backend=backend),
         lambda q, k, v: varlen_attention_ref(q, k, v, cu_q, cu_k, causal=causal), q, k, v, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_fp16_matches_padded_attention(backend):
    lens = [5, 31, 1, 12]
    q, k, v = _qkv(1, 2, 2, sum(lens), sum(lens), 32, torch.float16, packed=True)
    cu = _cu(lens)
    out = _run(lambda q, k, v: rlhf_fast.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), backend=backend),
               lambda q, k, v: varlen_attention_ref(q, k, v, cu, cu), q, k, v, torch.float16)
    # sequence 1 alone through the dense entry point gives the same rows
    sl = slice(5, 36)
    alone = rlhf_fast.attention(*(x[sl].transpose(0, 1)[None] for x in (q, k, v)), backend=backend)
    assert_close(out[sl], alone[0].transpose(0, 1), "varlen vs dense", **OUT_TOL[torch.float16])


# ---------------------------------------------------------------------------------------------
# shared prefix
# ---------------------------------------------------------------------------------------------

SHARED = [  # (prompt lengths, answer lengths per group, Hq, Hkv, D)
    ([23], [[9]], 2, 2, 16),                                   # K = 1
    ([17, 40], [[5, 1, 12, 7], [3, 20, 2, 9]], 4, 2, 32),       # K = 4, two groups
    ([33], [[4, 11, 1, 6, 9, 2, 17, 5, 8]], 2, 1, 64),          # K = 9
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SHARED, ids=str)
def test_shared_prefix(backend, case):
    prompts, answers, hq, hkv, d = case
    layout = rlhf_fast.shared_prefix_layout(prompts, answers)
    q, k, v = _qkv(1, hq, hkv, layout.total, layout.total, d, torch.float32, packed=True)
    _run(lambda q, k, v: rlhf_fast.shared_prefix_attention(q, k, v, layout, backend=backend),
         lambda q, k, v: shared_prefix_attention_ref(q, k, v, prompts, answers), q, k, v, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_prefix_fp16(backend):
    prompts, answers, hq, hkv, d = SHARED[1]
    layout = rlhf_fast.shared_prefix_layout(prompts, answers)
    q, k, v = _qkv(1, hq, hkv, layout.total, layout.total, d, torch.float16, packed=True)
    _run(lambda q, k, v: rlhf_fast.shared_prefix_attention(q, k, v, layout, backend=backend),
         lambda q, k, v: shared_prefix_attention_ref(q, k, v, prompts, answers), q, k, v, torch.float16)


def test_shared_prefix_equals_each_answer_alone():
    """Every answer row gets exactly the causal attention of [prompt, answer_j] on its own."""
    prompt, answers = 11, [4, 7, 1]
    layout = rlhf_fast.shared_prefix_layout([prompt], [answers])
    q, k, v = _qkv(1, 2, 1, layout.total, layout.total, 16, torch.float64, packed=True)
    out = rlhf_fast.shared_prefix_attention(q, k, v, layout, backend="torch")
    for j, (s, e) in enumerate(layout._host_answer_ranges()):
        rows = torch.cat([torch.arange(prompt), torch.arange(s, e)])
        alone = attention_ref(*(x[rows].transpose(0, 1)[None] for x in (q, k, v)), causal=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[s:e], alone[prompt:], msg=f"answer {j}")
        torch.testing.assert_close(out[:prompt], alone[:prompt])


def test_shared_prefix_layout_worked_example():
    layout = rlhf_fast.shared_prefix_layout([3], [[2, 1]])
    assert layout.total == 6 and layout.num_answers == 2 and layout.num_groups == 1
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 3]
    assert layout.answer_ids.tolist() == [-1, -1, -1, 0, 0, 1]
    assert layout.last_token_index.tolist() == [4, 5]
    assert layout.target_index.tolist() == [3, 4, 5] and layout.source_index.tolist() == [2, 3, 2]
    assert shared_prefix_mask_ref(3, [2, 1]).int().tolist() == [
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]
    two = rlhf_fast.shared_prefix_layout([2, 1], [[1], [2, 1]])
    assert two.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 1]
    assert two.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 1] and two.answer_group.tolist() == [0, 1, 1]
    ids = two.pack([torch.tensor([10, 11]), torch.tensor([20])],
                   [[torch.tensor([12])], [torch.tensor([21, 22]), torch.tensor([23])]])
    assert ids.tolist() == [10, 11, 12, 20, 21, 22, 23]
    assert [a.tolist() for a in two.split_answers(ids)] == [[12], [21, 22], [23]]


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    q, k, v = (x.requires_grad_(True) for x in _qkv(2, 4, 2, 9, 12, 16, torch.float32))
    mask = _key_mask("left", 2, 12)
    torch.library.opcheck(_attention_op, (q, k, v, mask, True, 0.25, backend))
    torch.library.opcheck(_attention_op, (q, k, v, None, False, 0.25, backend))
    lens = [3, 8, 1]
    pq, pk, pv = (x.requires_grad_(True) for x in _qkv(1, 2, 1, 12, 12, 16, torch.float32, packed=True))
    torch.library.opcheck(_varlen_op, (pq, pk, pv, _cu(lens), _cu(lens), 8, 8, True, 0.25, backend))
    layout = rlhf_fast.shared_prefix_layout([4], [[3, 5]])
    torch.library.opcheck(_shared_op, (pq, pk, pv, layout.q_segments, layout.k_segments, layout.max_q_len,
                                         layout.max_k_len, 0.25, backend))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = _qkv(2, 4, 2, 16, 16, 16, torch.float32)
    mask = _key_mask("left", 2, 16)

    def f(q, k, v):
        return rlhf_fast.attention(q, k, v, attention_mask=mask, backend="cpu").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (f, compiled):
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        fn(qq, kk, vv).backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Backend choice and validation
# ---------------------------------------------------------------------------------------------

def test_cpu_backend_is_the_automatic_choice():
    q, k, v = _qkv(1, 2, 2, 4, 4, 16, torch.float32)
    assert rlhf_fast.select_backend("attention", q, k, v) == "cpu"
    assert rlhf_fast.select_backend("varlen_attention", q, k, v) == "cpu"
    assert rlhf_fast.select_backend("shared_prefix_attention", q, k, v) == "cpu"
    assert rlhf_fast.select_backend("attention", q.double(), k.double(), v.double()) == "torch"


def _raises(match, fn):
    with pytest.raises(ValueError, match=match):
        fn()


def test_validation():
    q, k, v = _qkv(2, 4, 2, 8, 8, 16, torch.float32)
    att = rlhf_fast.attention
    _raises("^q: expected a 4-D", lambda: att(q[0], k, v))
    k3 = torch.randn(2, 3, 8, 16)
    _raises("^k: expected a number of key/value heads", lambda: att(q, k3, k3))
    _raises("^v: expected shape", lambda: att(q, k, v[:, :, :4]))
    _raises("^k: expected dtype", lambda: att(q, k.half(), v.half()))
    _raises("^k: expected head dim", lambda: att(q, k[..., :8], v[..., :8]))
    _raises("^q: expected a head dim", lambda: att(*(torch.randn(1, 1, 2, 300) for _ in range(3))))
    _raises("^q: expected dtype", lambda: att(q.int(), k, v))
    _raises("^k: expected batch", lambda: att(q, k[:1], v[:1]))
    _raises("^attention_mask: expected shape", lambda: att(q, k, v, attention_mask=torch.ones(2, 7)))
    _raises("^scale: expected a finite number", lambda: att(q, k, v, scale=-1.0))
    _raises("^attention: backend 'cuda'", lambda: att(q, k, v, backend="cuda"))

    pq, pk, pv = _qkv(1, 2, 2, 10, 10, 16, torch.float32, packed=True)
    var = rlhf_fast.varlen_attention
    cu = _cu([4, 6])
    _raises("^cu_seqlens_q: expected dtype", lambda: var(pq, pk, pv, cu.float(), cu, 6, 6))
    _raises("^cu_seqlens_q: expected cumulative lengths from 0 to 10", lambda: var(pq, pk, pv, cu - 1, cu, 6, 6))
    _raises("^cu_seqlens_k: expected 3 entries", lambda: var(pq, pk, pv, cu, _cu([10]), 6, 10))
    _raises("^cu_seqlens_q: expected non-decreasing", lambda: var(pq, pk, pv, torch.tensor([0, 7, 5, 10]),
                                                               torch.tensor([0, 4, 6, 10]), 6, 6))
    _raises("^max_seqlen_q: expected >= the longest", lambda: var(pq, pk, pv, cu, cu, 5, 6))
    _raises("^max_seqlen_k: expected an int", lambda: var(pq, pk, pv, cu, cu, 6, 6.0))

    layout = rlhf_fast.shared_prefix_layout([4], [[3, 2]])
    sp = rlhf_fast.shared_prefix_attention
    _raises("^q: expected 9 packed tokens", lambda: sp(pq, pk, pv, layout))
    _raises("^layout: expected a SharedPrefixLayout", lambda: sp(pq, pk, pv, ([4], [[3, 2]])))
    _raises("^prompt_lens: expected every prompt length >= 1", lambda: rlhf_fast.shared_prefix_layout([0], [[1]]))
    _raises("^answer_lens: expected >= 1 answers", lambda: rlhf_fast.shared_prefix_layout([2], [[]]))
    _raises("^answer_lens: expected one list", lambda: rlhf_fast.shared_prefix_layout([2, 3], [[1]]))
