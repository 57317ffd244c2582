"""linear against the reference (float64 ground truth) for every backend that runs here: outputs and
the three gradients, with and without bias, in fp32/bf16/fp16, on shapes on both sides of the cpu
backend's BLAS/oneDNN threshold, strided inputs, empty inputs; bad inputs; opcheck; torch.compile;
and use_rlhf_fast_linear on a real transformers Llama (outputs, gradients, state dict, LoRA)."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, assert_close

import rlhf_fast
from rlhf_fast.ops.linear import OP
from rlhf_fast.reference import linear_backward_ref, linear_ref

BACKENDS = [b for b in CPU_BACKENDS if b in OP.impls]
# (M, K, N): one-token and tiny products (BLAS), and products past the cpu backend's oneDNN threshold
# (>= 8 rows and >= 2^20 multiply-adds), with odd sizes
SHAPES = [(1, 7, 5), (5, 33, 17), (64, 129, 160), (300, 256, 67)]
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def truth(x, w, b, g):
    """float64 output and gradients of the same (rounded) inputs."""
    x64, w64, g64 = x.double(), w.double(), g.double()
    out = linear_ref(x64, w64, None if b is None else b.double())
    gx, gw, gb = linear_backward_ref(g64, x64, w64)
    return out, gx, gw, gb


def tol(dtype, k, scale):
    """Sums of k products of magnitude ~scale, accumulated in fp32 (in any order: the engines block
    the sum differently), then rounded once to the dtype."""
    return dict(atol=8 * 2.0 ** -23 * scale * k + 1e-6, rtol=EPS[dtype] + 2.0 ** -20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference(backend, dtype, shape, with_bias):
    m, k, n = shape
    torch.manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k).to(dtype).requires_grad_(True)
    w = torch.randn(n, k).to(dtype).requires_grad_(True)
    b = torch.randn(n).to(dtype).requires_grad_(True) if with_bias else None
    g = torch.randn(m, n).to(dtype)
    out = rlhf_fast.linear(x, w, b, backend=backend)
    out.backward(g)
    ref, gx, gw, gb = truth(x, w, b, g)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref, "out", **tol(dtype, k, 1.0))
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(x.grad, gx, "grad_input", **tol(dtype, n, 1.0))
    assert_close(w.grad, gw, "grad_weight", **tol(dtype, m, 1.0))
    if with_bias:
        assert_close(b.grad, gb, "grad_bias", **tol(dtype, m, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_strided_inputs(backend):
    """(B, T, K) inputs come back (B, T, N); a transposed input and a transposed weight view give the
    same result as their contiguous copies; the caller's tensors are not written."""
    torch.manual_seed(0)
    x = torch.randn(3, 40, 96)
    w = torch.randn(96, 120).t()  # (120, 96), not contiguous
    b = torch.randn(120)
    xt = torch.randn(96, 120).t()  # (120, 96) input rows, transposed storage
    before = [t.clone() for t in (x, w, b, xt)]
    out = rlhf_fast.linear(x, w, b, backend=backend)
    assert out.shape == (3, 40, 120)
    assert_close(out, linear_ref(x.double(), w.double(), b.double()), "out", **tol(torch.float32, 96, 1.0))
    out_t = rlhf_fast.linear(xt, w, None, backend=backend)
    assert_close(out_t, rlhf_fast.linear(xt.contiguous(), w.contiguous(), None, backend=backend), "strided",
                 atol=1e-5, rtol=1e-5)
    for t, t0 in zip((x, w, b, xt), before, strict=True):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    """A frozen weight (LoRA's base layer) or an input without grad: only the wanted gradients."""
    torch.manual_seed(1)
    x = torch.randn(32, 64, requires_grad=True)
    w = torch.randn(48, 64)
    rlhf_fast.linear(x, w, backend=backend).sum().backward()
    assert_close(x.grad, w.sum(0).expand(32, 64), "grad_input", atol=1e-4, rtol=1e-5)
    x2 = torch.randn(32, 64)
    w2 = torch.randn(48, 64, requires_grad=True)
    b2 = torch.zeros(48, requires_grad=True)
    rlhf_fast.linear(x2, w2, b2, backend=backend).sum().backward()
    assert_close(w2.grad, x2.sum(0).expand(48, 64), "grad_weight", atol=1e-4, rtol=1e-5)
    assert torch.equal(b2.grad, torch.full((48,), 32.0))
    with torch.no_grad():
        assert not rlhf_fast.linear(x, w2, backend=backend).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    out = rlhf_fast.linear(x, w, b, backend=backend)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(8, 16)) and torch.equal(b.grad, torch.zeros(8))


def test_torch_backend_is_aten_linear():
    torch.manual_seed(2)
    x, w, b = torch.randn(7, 9, 33), torch.randn(21, 33), torch.randn(21)
    assert torch.equal(rlhf_fast.linear(x, w, b, backend="torch"), torch.nn.functional.linear(x, w, b))
    x64, w64 = x.double(), w.double()  # float64 runs on the torch backend
    assert rlhf_fast.select_backend("linear", x64, w64) == "torch"
    assert torch.equal(rlhf_fast.linear(x64, w64), torch.nn.functional.linear(x64, w64))


@pytest.mark.parametrize("args, match", [
    (("x", torch.randn(4, 3)), "input: expected a torch.Tensor"),
    ((torch.randn(4, 3), torch.randn(5, 4)), r"weight: expected shape \(N, 3\)"),
    ((torch.randn(4, 3), torch.randn(5, 3, 1)), r"weight: expected shape \(N, 3\)"),
    ((torch.randn(4, 3), torch.randn(5, 3).half()), "weight: expected dtype torch.float32"),
    ((torch.randn(4, 3), torch.randn(5, 3), torch.randn(4)), r"bias: expected shape \(5,\)"),
    ((torch.randn(4, 3), torch.randn(5, 3), torch.randn(5).double()), "bias: expected dtype torch.float32"),
    ((torch.tensor(1.0), torch.randn(5, 3)), "input: expected a tensor of shape"),
    ((torch.ones(4, 3, dtype=torch.int64), torch.ones(5, 3, dtype=torch.int64)), "input: expected dtype"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        rlhf_fast.linear(*args)


def test_native_checks_name_the_argument():
    if "cpu" not in BACKENDS:
        pytest.skip("no native cpu backend")
    with pytest.raises(ValueError, match=r"weight: expected shape \(N, 3\)"):
        torch.ops.rlhf_fast_C.linear_fwd(torch.randn(4, 3), torch.randn(5, 4), None)
    with pytest.raises(ValueError, match="grad: expected shape"):
        torch.ops.rlhf_fast_C.linear_bwd(torch.randn(4, 6), torch.randn(4, 3), torch.randn(5, 3), True, True, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(24, 40).to(dtype).requires_grad_(True)
        w = torch.randn(72, 40).to(dtype).requires_grad_(True)
        b = torch.randn(72).to(dtype).requires_grad_(True)
        torch.library.opcheck(torch.ops.rlhf_fast.linear.default, (x, w, b, backend))
        torch.library.opcheck(torch.ops.rlhf_fast.linear.default, (x, w.detach(), None, backend))
    g, x, w = torch.randn(24, 72), torch.randn(24, 40), torch.randn(72, 40)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_backward.default, (g, x, w, True, True, True, backend))
    torch.library.opcheck(torch.ops.rlhf_fast.linear_backward.default, (g, x, w, False, True, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(4)
    w1, w2 = torch.randn(96, 32, requires_grad=True), torch.randn(16, 96, requires_grad=True)
    b1 = torch.randn(96, requires_grad=True)

    def mlp(x):
        h = torch.nn.functional.silu(rlhf_fast.linear(x, w1, b1, backend=backend))
        return rlhf_fast.linear(h, w2, backend=backend).square().mean()

    x = torch.randn(4, 20, 32)
    compiled = torch.compile(mlp, fullgraph=True, backend="inductor")
    l1 = compiled(x)
    g1 = torch.autograd.grad(l1, (w1, w2, b1))
    l2 = mlp(x)
    g2 = torch.autograd.grad(l2, (w1, w2, b1))
    assert_close(l1, l2, "loss", atol=1e-5, rtol=1e-5)
    for a, e, name in zip(g1, g2, ("w1", "w2", "b1"), strict=True):
        assert_close(a, e, name, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# use_rlhf_fast_linear on a transformers model
# ---------------------------------------------------------------------------------------------

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(5)
    return LlamaForCausalLM(cfg)


def test_use_rlhf_fast_linear_on_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from rlhf_fast.integrations.transformers import RlhfFastLinear, use_rlhf_fast_linear

    plain = _tiny_llama()
    patched = _tiny_llama()
    n_linear = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert use_rlhf_fast_linear(patched) == n_linear == 2 * 7 + 1  # q k v o gate up down per layer, lm_head
    assert use_rlhf_fast_linear(patched) == n_linear  # idempotent
    assert isinstance(patched.model.layers[0].self_attn.q_proj, RlhfFastLinear)
    assert list(patched.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 101, (3, 50))
    out_p, out_r = patched(ids, labels=ids), plain(ids, labels=ids)
    assert_close(out_p.logits, out_r.logits, "logits", atol=1e-4, rtol=1e-4)
    out_p.loss.backward()
    out_r.loss.backward()
    for (name, p), q in zip(patched.named_parameters(), plain.parameters(), strict=True):
        assert_close(p.grad, q.grad, name, atol=1e-5, rtol=1e-3)
    patched.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert all(type(m) is not RlhfFastLinear for m in loaded.modules())
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, patched.model.layers[1].mlp.down_proj.weight)


def test_use_rlhf_fast_linear_with_lora():
    """peft targets the patched layers (a subclass of nn.Linear) and wraps them as usual; the LoRA
    layer's base layer runs rlhf_fast.linear."""
    peft = pytest.importorskip("peft")
    from rlhf_fast.integrations.transformers import RlhfFastLinear, use_rlhf_fast_linear

    model = _tiny_llama()
    use_rlhf_fast_linear(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    q = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, peft.tuners.lora.Linear) and type(q.base_layer) is RlhfFastLinear
    ids = torch.randint(0, 101, (2, 30))
    lora(ids, labels=ids).loss.backward()
    assert q.lora_A["default"].weight.grad is not None and q.base_layer.weight.grad is None
