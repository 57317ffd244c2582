"""The backend registry: explicit argument > RLHF_FAST_BACKEND > best available, readable reasons."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rlhf_fast
from rlhf_fast import backends


def rows(dtype=torch.float32):
    return torch.randn(3, 17, dtype=dtype)


def test_backends_available_shape():
    avail = rlhf_fast.backends_available()
    assert set(avail) == set(rlhf_fast.BACKENDS) == {"torch", "cpu", "cuda", "triton"}
    assert avail["torch"] == []
    assert all(isinstance(r, str) and r for reasons in avail.values() for r in reasons)
    if not torch.cuda.is_available():
        assert any("cuda" in r for r in avail["cuda"])


@pytest.mark.skipif(not rlhf_fast.has_native(), reason="native extension not built")
def test_auto_picks_native_cpu_and_reports_simd():
    assert rlhf_fast.select_backend("gather_logprobs", rows()) == "cpu"
    assert rlhf_fast.cpu_capability() in ("DEFAULT", "AVX2", "AVX512")


def test_float64_falls_through_to_torch():
    assert rlhf_fast.select_backend("gather_logprobs", rows(torch.float64)) == "torch"


@pytest.mark.skipif(not rlhf_fast.has_native(), reason="native extension not built")
def test_explicit_backend_that_cannot_run_raises_with_reasons():
    msg = r"backend 'cpu' \(from backend=\) cannot run: cpu does not support dtype torch.float64"
    with pytest.raises(ValueError, match=msg):
        rlhf_fast.select_backend("gather_logprobs", rows(torch.float64), backend="cpu")
    with pytest.raises(ValueError, match=r"backend 'cuda' \(from backend=\) cannot run: .*cuda"):
        rlhf_fast.gather_logprobs(rows(), torch.zeros(3, dtype=torch.long), backend="cuda")


def test_unknown_backend_and_op():
    with pytest.raises(ValueError, match=r"backend=.fast. is not a backend"):
        rlhf_fast.gather_logprobs(rows(), torch.zeros(3, dtype=torch.long), backend="fast")
    with pytest.raises(ValueError, match=r"op='nope' is not an rlhf_fast op"):
        rlhf_fast.select_backend("nope", rows())


def test_env_var_and_precedence(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    assert rlhf_fast.select_backend("gather_logprobs", rows()) == "torch"
    if rlhf_fast.has_native():
        assert rlhf_fast.select_backend("gather_logprobs", rows(), backend="cpu") == "cpu"  # argument wins
    monkeypatch.setenv("RLHF_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND'bogus' is not a backend|RLHF_FAST_BACKEND"):
        rlhf_fast.select_backend("gather_logprobs", rows())


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = backends.BACKEND_INFO["triton"].availability_reasons(torch.device("cpu"))
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_triton_version", lambda: "3.9.0")  # an interpreter that runs our kernels
    assert backends.BACKEND_INFO["triton"].availability_reasons(torch.device("cpu")) == []
    # even when it can run, the interpreter is never the automatic choice
    assert rlhf_fast.select_backend("gather_logprobs", rows()) != "triton"


def test_package_works_without_native_extension(tmp_path):
    """With rlhf_fast._C unimportable the package imports, says why, and runs on the torch backend."""
    code = r"""
import sys
sys.modules["rlhf_fast._C"] = None  # makes `from rlhf_fast import _C` raise ImportError
import torch, rlhf_fast
avail = rlhf_fast.backends_available()
assert not rlhf_fast.has_native()
assert any("rlhf_fast._C" in r for r in avail["cpu"]), avail
assert rlhf_fast.select_backend("gather_logprobs", torch.randn(2, 3)) == "torch"
x = torch.randn(2, 5, requires_grad=True)
rlhf_fast.gather_logprobs(x, torch.tensor([1, 4])).sum().backward()
assert x.grad is not None
adv, ret = rlhf_fast.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool))
assert adv.shape == (2, 3) and rlhf_fast.select_backend("gae", adv.reshape(-1), ret.reshape(-1)) == "torch"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "RLHF_FAST_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_gae_under_fake_tensor_mode_goes_through_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        r = torch.empty(4, 7)
        adv, ret = rlhf_fast.gae(r, torch.empty(4, 7), None)
        assert adv.shape == (4, 7) and ret.dtype == torch.float32
    adv, _ = rlhf_fast.gae(torch.ones(4, 7), torch.zeros(4, 7), None)
    assert type(adv) is torch.Tensor and torch.isfinite(adv).all()


def test_triton_interpreter_needs_triton_3_7(monkeypatch):
    """Under TRITON_INTERPRET=1 a triton older than 3.7 is refused on CPU tensors with the reason (its
    interpreter cannot take a loop bound loaded from memory); compiled GPU kernels are not affected."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_triton_version", lambda: "3.6.0")
    (reason,) = backends.backends_available("cpu")["triton"]
    assert "triton 3.6.0's interpreter" in reason and "needs triton >= 3.7" in reason
    with pytest.raises(ValueError, match="needs triton >= 3.7"):
        rlhf_fast.kl_penalty(rows(), rows(), backend="triton")
    monkeypatch.setattr(backends, "_triton_version", lambda: "3.7.0")
    assert backends.backends_available("cpu")["triton"] == []
