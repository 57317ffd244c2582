"""Timing, environment and result rows shared by every benchmark."""

from __future__ import annotations

import datetime as _dt
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    reps: int


def time_cpu(fn, *, warmup: int = 2, reps: int = 11, min_seconds: float = 0.0) -> Timing:
    """Median wall time of fn() after warm-up; reps extended until min_seconds have passed."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[0], q[2], len(times))


def time_cuda(fn) -> Timing:
    """CUDA-synchronised timing with an L2 flush between runs (triton.testing.do_bench)."""
    import triton.testing

    med, q1, q3 = triton.testing.do_bench(fn, quantiles=[0.5, 0.25, 0.75])
    return Timing(med, q1, q3, 0)


def time_fn(fn, device: str, **kw) -> Timing:
    return time_cuda(fn) if device == "cuda" else time_cpu(fn, **kw)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    import rlhf_fast

    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "rlhf_fast": rlhf_fast.__version__,
        "cpu_capability": rlhf_fast.cpu_capability() or "none",
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    return env


@dataclass
class Row:
    op: str
    case: str
    mode: str
    provider: str
    backend: str          # what actually ran (a provider that fell back reports the fallback)
    median_ms: float
    q1_ms: float
    q3_ms: float
    extra: dict = field(default_factory=dict)

    def flat(self, env: dict) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **{f"x_{k}": v for k, v in extra.items()}, **env}
