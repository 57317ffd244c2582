"""linear_logprobs' cpu backend with each CPU GEMM engine against eager, side by side.

The engine is fixed per process (RLHF_FAST_CPU_GEMM), so each runs in its own process:

    python -m rlhf_fast.bench.gemm_engines   # N=2048 H=512 V=32768 fp32, medians of 7

It separates what the fused fold gains from what oneDNN's GEMM gains over ATen's BLAS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

N, H, V, REPS = 2048, 512, 32768, 7


def median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[REPS // 2] * 1e3


def measure() -> None:
    import torch

    import rlhf_fast

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    grad = torch.randn(N, generator=g)
    ours = lambda h, w: rlhf_fast.linear_logprobs(h, w, labels, backend="cpu")
    eager = lambda h, w: torch.log_softmax(h @ w.t(), -1).gather(-1, labels[:, None]).squeeze(-1)

    def fwd_bwd(fn):
        def run():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            (fn(h, w) * grad).sum().backward()
        return run

    with torch.no_grad():
        fo, fe = median_ms(lambda: ours(hidden, weight)), median_ms(lambda: eager(hidden, weight))
    bo, be = median_ms(fwd_bwd(ours)), median_ms(fwd_bwd(eager))
    print(f"{rlhf_fast.cpu_gemm_engine():7s} | {fo:8.1f} | {fe:8.1f} | {fe / fo:5.2f}x | {bo:8.1f} | {be:8.1f} | "
          f"{be / bo:5.2f}x", flush=True)


def main() -> None:
    if os.environ.get("_RLHF_FAST_ENGINE_CHILD"):
        measure()
        return
    print(f"linear_logprobs N={N} H={H} V={V} fp32, medians of {REPS} (ms)")
    print("engine  | fwd ours | fwd eager | ratio | fwd+bwd ours | fwd+bwd eager | ratio")
    for engine in ("blas", "onednn"):
        env = {**os.environ, "RLHF_FAST_CPU_GEMM": engine, "_RLHF_FAST_ENGINE_CHILD": "1"}
        subprocess.run([sys.executable, "-m", "rlhf_fast.bench.gemm_engines"], env=env, check=True)


if __name__ == "__main__":
    main()
