"""Shared test utilities: tolerances per dtype and a comparison that says where it failed."""

from __future__ import annotations

import torch

# Outputs (log-probs, entropies) are fp32 in every dtype: they are computed in fp32 from the same
# (already rounded) inputs as the reference, so the tolerance is fp32's whatever the input dtype.
# Gradients are stored in the input dtype: one rounding of that dtype.
OUT_TOL = dict(atol=5e-5, rtol=5e-5)
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-4),
    torch.float16: dict(atol=1e-6, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close(actual, expected, what: str, **tol):
    """torch.testing.assert_close plus the first bad index and NaN/inf mismatches in the message."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_mismatch = (actual.isnan() != expected.isnan()).sum().item()
    inf_mismatch = (actual.isinf() != expected.isinf()).sum().item()
    assert nan_mismatch == 0 and inf_mismatch == 0, (
        f"{what}: {nan_mismatch} NaN and {inf_mismatch} inf positions differ from the reference")
    atol, rtol = tol.get("atol", 1e-6), tol.get("rtol", 1e-5)
    finite = torch.isfinite(expected)
    bad = finite & ((actual - expected).abs() > atol + rtol * expected.abs())
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"first at {idx}: got {actual[idx].item()!r}, expected {expected[idx].item()!r}; "
            f"max abs err {(actual - expected)[finite].abs().max().item():.3e}")
    assert torch.equal(actual[~finite], expected[~finite]), f"{what}: non-finite values differ"


def check_under_cpu_capability(cap: str, script: str) -> None:
    """Runs `script` in a fresh Python with ATEN_CPU_CAPABILITY=cap (how ATen, and rlhf_fast's CPU kernels,
    choose their SIMD build: "AVX2", "DEFAULT", ...) after checking that build is the one in use; the
    script must print "ok"."""
    import os
    import subprocess
    import sys

    check = f"import rlhf_fast\nassert rlhf_fast.cpu_capability() == {cap!r}, rlhf_fast.cpu_capability()\n"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    out = subprocess.run([sys.executable, "-c", check + script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


class Killed(Exception):
    """Raised by :func:`kill_after` in place of a trainer's step: a run killed mid-way."""


def kill_after(trainer, n_steps: int) -> None:
    """Make `trainer.step` raise Killed once it has run `n_steps` times."""
    step = trainer.step
    count = {"n": 0}

    def wrapped(*a, **k):
        if count["n"] == n_steps:
            raise Killed
        count["n"] += 1
        return step(*a, **k)
    trainer.step = wrapped
