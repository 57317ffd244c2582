"""kl_penalty against the reference, for every backend that runs here (torch, cpu, and triton under
TRITON_INTERPRET=1): every estimator with and without a clamp, dtypes, gradients, extreme
log-ratios, strides and broadcasts, bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close

import rlhf_fast
from rlhf_fast.reference import KL_ESTIMATORS, kl_penalty_backward_ref, kl_penalty_ref

CLAMPS = [None, 0.7]


def make_inputs(shape, dtype, scale=1.0, ref_dtype=None):
    """Log-probs and reference log-probs whose difference spans [-3 scale, 3 scale], with exact zeros."""
    lp = (torch.randn(shape) * scale - 2.0).to(dtype)
    ref = (lp.float() + torch.randn(shape) * scale).to(ref_dtype or dtype)
    flat = ref.view(-1)
    flat[: max(1, flat.numel() // 10)] = lp.reshape(-1)[: max(1, flat.numel() // 10)].to(flat.dtype)  # x == 0
    return lp, ref


def run_both(lp, ref, backend, estimator, clamp, grad=None, cap="default"):
    """(kl, grad_logprobs) of the op and of the reference (autograd), for upstream gradient `grad`."""
    grad = torch.randn(lp.shape) if grad is None else grad
    out = []
    for fn in ("op", "ref"):
        x = lp.detach().clone().requires_grad_(True)
        if fn == "op":
            kl = rlhf_fast.kl_penalty(x, ref, estimator=estimator, clamp=clamp, cap=cap, backend=backend)
        else:
            kl = kl_penalty_ref(x, ref, estimator=estimator, clamp=clamp, cap=cap)
        (g,) = torch.autograd.grad(kl, x, grad)
        out.append((kl.detach(), g))
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("clamp", CLAMPS, ids=lambda c: f"clamp={c}")
def test_matches_reference(backend, dtype, estimator, clamp):
    lp, ref = make_inputs((3, 5, 77), dtype)
    (kl, g), (kl_r, g_r) = run_both(lp, ref, backend, estimator, clamp)
    assert kl.dtype == torch.float32 and kl.shape == lp.shape and g.dtype == dtype
    assert_close(kl, kl_r, "kl", **OUT_TOL)
    assert_close(g, g_r, "grad_logprobs", **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_extreme_log_ratios(backend, estimator):
    """|x| up to 50 is finite without a clamp or cap; with a clamp any x is (here up to 1e4), and the
    gradient is exactly 0 where the clamp is active."""
    x = torch.tensor([[-50.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 50.0]])
    lp = torch.zeros_like(x)
    (kl, g), (kl_r, g_r) = run_both(lp, -x, backend, estimator, None, torch.ones_like(x), cap=None)
    assert torch.isfinite(kl).all() and torch.isfinite(g).all()
    assert_close(kl, kl_r, "kl", **OUT_TOL)
    assert_close(g, g_r, "grad_logprobs", atol=1e-6, rtol=1e-5)
    big = torch.tensor([[-1e4, -100.0, -3.0, -0.5, 0.0, 0.5, 3.0, 100.0, 1e4]])
    (kl, g), (kl_r, g_r) = run_both(torch.zeros_like(big), -big, backend, estimator, 3.0, torch.ones_like(big),
                                    cap=None)
    assert torch.isfinite(kl).all() and torch.isfinite(g).all()
    assert_close(kl, kl_r, "kl", **OUT_TOL)
    assert_close(g, g_r, "grad_logprobs", atol=1e-6, rtol=1e-5)
    active = big.abs() > 3.0
    assert (g[active] == 0).all() and (g[~active & (big != 0)] != 0).all()


CAPS = ["default", None, 10.0, 2.5]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("cap", CAPS, ids=lambda c: f"cap={c}")
def test_cap_at_extreme_log_ratios(backend, estimator, cap):
    """x = logprobs - ref_logprobs at +-15, +-25, +-80 (and ordinary values): finite values and gradients
    equal to the reference, the value within [-cap, cap] and the gradient exactly 0 where the cap is active
    (k3's default cap: 10)."""
    x = torch.tensor([[-80.0, -25.0, -15.0, -12.0, -2.0, -0.3, 0.0, 0.3, 2.0, 12.0, 15.0, 25.0, 80.0]])
    lp = torch.full_like(x, -3.0)
    (kl, g), (kl_r, g_r) = run_both(lp, lp - x, backend, estimator, None, torch.ones_like(x), cap=cap)
    assert torch.isfinite(kl).all() and torch.isfinite(g).all()
    assert_close(kl, kl_r, "kl", atol=5e-5, rtol=2e-5)
    assert_close(g, g_r, "grad_logprobs", atol=1e-6, rtol=2e-5)
    limit = {"default": 10.0 if estimator == "k3" else None}.get(cap, cap)
    if limit is not None:
        uncapped = kl_penalty_ref(lp, lp - x, estimator=estimator, cap=None)
        over = uncapped.abs() > limit
        assert kl.abs().max() <= limit and (g[over] == 0).all() and (kl[over].abs() == limit).all()
        assert_close(kl[~over], uncapped[~over], "values under the cap", atol=5e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k3_default_cap_and_opt_out(backend):
    """k3 at x = -12 (policy far below the reference) is 1.6e5 without a cap; the default caps it at 10
    as verl does, cap=None restores it, and the default leaves k1 / abs / k2 alone (cap=10.0 caps them,
    OpenRLHF's convention)."""
    lp, ref = torch.tensor([[-14.0, -1.0]]), torch.tensor([[-2.0, -1.5]])  # x = -12, 0.5
    k3 = rlhf_fast.kl_penalty(lp, ref, estimator="k3", backend=backend)
    assert k3[0, 0] == 10.0 and abs(k3[0, 1].item() - (torch.tensor(-0.5).exp().item() - 0.5)) < 1e-6
    raw = rlhf_fast.kl_penalty(lp, ref, estimator="k3", cap=None, backend=backend)
    assert abs(raw[0, 0].item() / (torch.tensor(12.0, dtype=torch.float64).exp().item() - 13.0) - 1) < 1e-5
    for estimator, value in (("k1", -12.0), ("abs", 12.0), ("k2", 72.0)):
        assert rlhf_fast.kl_penalty(lp, ref, estimator=estimator, backend=backend)[0, 0] == value
        assert rlhf_fast.kl_penalty(lp, ref, estimator=estimator, cap=10.0, backend=backend)[0, 0] == (
            -10.0 if value < 0 else 10.0)




@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k3_is_accurate_near_zero(backend):
    """k3 = exp(-x) - 1 + x ~ x^2 / 2 near 0: computed by a series, not by cancelling exp(-x) - 1."""
    x = torch.tensor([1e-7, -1e-6, 3e-5, -1e-4, 1e-3, -0.01, 0.2, -0.49, 0.51, 2.0], dtype=torch.float64)
    exact = torch.expm1(-x) + x  # float64
    kl = rlhf_fast.kl_penalty(x.float().view(1, -1), torch.zeros(1, 10), estimator="k3", backend=backend)
    rel = ((kl.double().view(-1) - exact).abs() / exact).max().item()
    assert rel < 1e-5, rel
    assert (kl > 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_strides_and_broadcast_grad(backend):
    """bf16 log-probs with fp32 references, column slices of wider tensors, and the stride-0 upstream
    gradient of kl.mean()."""
    lp_full = torch.randn(4, 130, dtype=torch.bfloat16)
    ref_full = torch.randn(4, 260)
    lp, ref = lp_full[:, 1:101], ref_full[:, ::2][:, :100]
    assert not lp.is_contiguous() and not ref.is_contiguous()
    x = lp.detach().clone().requires_grad_(True)
    kl = rlhf_fast.kl_penalty(x, ref, estimator="k3", backend=backend)
    kl.mean().backward()
    xr = lp.detach().clone().requires_grad_(True)
    kl_r = kl_penalty_ref(xr, ref, estimator="k3")
    kl_r.mean().backward()
    assert_close(kl, kl_r, "kl", **OUT_TOL)
    assert_close(x.grad, xr.grad, "grad_logprobs", **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_for_ref_and_caller_tensors_untouched(backend):
    lp, ref = make_inputs((2, 33), torch.float32)
    lp_before, ref_before = lp.clone(), ref.clone()
    x, r = lp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    rlhf_fast.kl_penalty(x, r, estimator="k2", backend=backend).sum().backward()
    assert x.grad is not None and r.grad is None
    assert torch.equal(lp, lp_before) and torch.equal(ref, ref_before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shapes_empty_and_scalar(backend):
    for shape in [(), (7,), (0, 5), (2, 0), (2, 3, 4)]:
        lp, ref = torch.randn(shape), torch.randn(shape)
        x = lp.clone().requires_grad_(True)
        kl = rlhf_fast.kl_penalty(x, ref, estimator="k3", backend=backend)
        assert kl.shape == lp.shape and kl.dtype == torch.float32
        kl.sum().backward()
        assert_close(kl, kl_penalty_ref(lp, ref, estimator="k3"), "kl", **OUT_TOL)
        assert x.grad.shape == lp.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_rows(backend):
    """Rows longer than one tile of every backend (4096 columns on CPU, 2048 on GPU)."""
    lp, ref = make_inputs((2, 9001), torch.float32)
    (kl, g), (kl_r, g_r) = run_both(lp, ref, backend, "k3", 2.0)
    assert_close(kl, kl_r, "kl", **OUT_TOL)
    assert_close(g, g_r, "grad_logprobs", **GRAD_TOL[torch.float32])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logprobs=torch.randn(2, 3), ref_logprobs=torch.randn(2, 4)), r"ref_logprobs: expected shape \(2, 3\)"),
        (dict(logprobs=torch.randint(0, 5, (2, 3)), ref_logprobs=torch.randn(2, 3)), "logprobs: expected dtype"),
        (dict(logprobs=torch.randn(2, 3), ref_logprobs=torch.zeros(2, 3, dtype=torch.long)),
         "ref_logprobs: expected dtype"),
        (dict(logprobs=torch.randn(2, 3), ref_logprobs=torch.randn(2, 3, device="meta")),
         "ref_logprobs: expected a tensor on cpu"),
        (dict(logprobs=[0.0], ref_logprobs=torch.randn(1)), "logprobs: expected a torch.Tensor"),
        (dict(logprobs=torch.randn(2), ref_logprobs=torch.randn(2), estimator="k4"), "estimator: expected one of"),
        (dict(logprobs=torch.randn(2), ref_logprobs=torch.randn(2), clamp=0.0), "clamp: expected a finite number > 0"),
        (dict(logprobs=torch.randn(2), ref_logprobs=torch.randn(2), clamp=-1.0), "clamp: expected a finite number > 0"),
        (dict(logprobs=torch.randn(2), ref_logprobs=torch.randn(2), clamp=float("inf")), "clamp: expected a finite"),
        (dict(logprobs=torch.randn(2), ref_logprobs=torch.randn(2), cap=0.0), "cap: expected a finite number > 0"),
        (dict(logprobs=torch.randn(2), ref_logprobs=torch.randn(2), cap=-10.0), "cap: expected a finite number > 0"),
        (dict(logprobs=torch.randn(2), ref_logprobs=torch.randn(2), cap=float("nan")), "cap: expected a finite"),
        (dict(logprobs=torch.randn(2), ref_logprobs=torch.randn(2), cap="k3"),
         "cap: expected 'default', None or a finite number > 0, got 'k3'"),
    ],
)
def test_bad_input(kwargs, match):
    lp, ref = kwargs.pop("logprobs"), kwargs.pop("ref_logprobs")
    with pytest.raises(ValueError, match=match):
        rlhf_fast.kl_penalty(lp, ref, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    lp, ref = make_inputs((4, 50), torch.float32)
    # params: estimator code, clamp (0: none), cap (0: none), need_grad
    for code in range(len(KL_ESTIMATORS)):
        for clamp, cap in ((0.0, 0.0), (1.5, 0.0), (0.0, 0.5)):
            torch.library.opcheck(torch.ops.rlhf_fast.kl_penalty.default,
                                  (lp.clone().requires_grad_(True), ref, [code, clamp, cap, 1.0], backend))
    torch.library.opcheck(torch.ops.rlhf_fast.kl_penalty.default,
                          (lp.to(torch.bfloat16), ref, [3.0, 0.0, 10.0, 0.0], backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_derivative_only_when_needed(backend):
    """dk/dx is written only when logprobs requires grad (and grad mode is on)."""
    lp, ref = make_inputs((3, 20), torch.float32)
    _, dkl = torch.ops.rlhf_fast.kl_penalty(lp, ref, [3.0, 0.0, 10.0, 0.0], backend)
    assert dkl.numel() == 0
    x = lp.clone().requires_grad_(True)
    kl, dkl = torch.ops.rlhf_fast.kl_penalty(x, ref, [3.0, 0.0, 10.0, 1.0], backend)
    assert dkl.shape == lp.shape and not dkl.requires_grad and kl.requires_grad
    assert_close(dkl, kl_penalty_backward_ref(torch.ones(3, 20), lp, ref, estimator="k3"), "dkl", **OUT_TOL)
    with torch.no_grad():
        assert not rlhf_fast.kl_penalty(x, ref, backend=backend).requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    lp, ref = make_inputs((3, 40), torch.bfloat16)
    mask = torch.rand(3, 40) < 0.8

    def loss_fn(x):
        kl = rlhf_fast.kl_penalty(x, ref, estimator="k3", clamp=10.0, backend=backend)
        return (kl * mask).sum() / mask.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    x1, x2 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    l1, l2 = compiled(x1), loss_fn(x2)
    l1.backward()
    l2.backward()
    assert_close(l1, l2, "loss", **OUT_TOL)
    assert_close(x1.grad, x2.grad, "grad_logprobs", **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("clamp", CLAMPS, ids=lambda c: f"clamp={c}")
@pytest.mark.parametrize("cap", [None, 1.0], ids=lambda c: f"cap={c}")
def test_reference_backward_matches_autograd(estimator, clamp, cap):
    """The hand-written derivative (what the torch backend saves for the backward) equals autograd of
    the reference."""
    lp, ref = make_inputs((5, 31), torch.float32, scale=2.0)
    x = lp.clone().requires_grad_(True)
    g = torch.randn(5, 31)
    (auto,) = torch.autograd.grad(kl_penalty_ref(x, ref, estimator=estimator, clamp=clamp, cap=cap), x, g)
    manual = kl_penalty_backward_ref(g, lp, ref, estimator=estimator, clamp=clamp, cap=cap)
    assert_close(manual, auto, "grad_logprobs", atol=1e-6, rtol=1e-6)
