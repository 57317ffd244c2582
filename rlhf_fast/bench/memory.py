"""Peak transient memory of one benchmark case, measured in a fresh process.

CPU: the process builds the case's inputs and reports three figures, each above the RSS it had before and
less the bytes of the gradients the case must return (every method fills the same gradient buffers):

- first_peak_bytes: the peak of the first call (allocator growth, torch.compile, oneDNN's JIT and primitive
  cache, lazily created scratch: what a user's first step pays);
- retained_bytes: what the first call leaves resident once its outputs and gradients are dropped and what
  can be freed is (gc, rlhf_fast.release_cpu_buffers, malloc_trim);
- peak_bytes: the steady state, a second call's peak (the kernel's peak-RSS counter reset with
  /proc/self/clear_refs = 5 before it).

The probe process has imported torch._dynamo before the first call (the bench harness does), so a figure
is the op's own: the first call of any torch.library custom op in a bare process also imports
torch._dynamo (and triton, when installed), ~140 MB once per process, whoever's op it is. GPU: torch.cuda
peak allocated, same rule, steady state only.

    python -m rlhf_fast.bench.memory <suite> <provider> <case index> <mode> [device] [quick]   # prints one JSON line
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim():
    gc.collect()
    try:  # rlhf_fast's idle cached CPU buffers would otherwise count as the baseline, hiding their use
        import rlhf_fast

        rlhf_fast.release_cpu_buffers()
    except ImportError:
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def probe(suite: str, provider: str, case_index: int, mode: str, device: str, quick: bool = False) -> dict:
    from rlhf_fast.bench.common import Skip, cuda_peak_above, mode_fn
    from rlhf_fast.bench.suites import SUITES, cases

    module = SUITES[suite]
    case = cases(module, device, quick)[case_index]
    try:
        w = module.workload(provider, case, device)
    except Skip as why:
        return {"skipped": str(why)}
    timed = mode_fn(w, mode)
    grad_bytes = module.grad_bytes(case, mode) if hasattr(module, "grad_bytes") else 0
    first = {}
    if device != "cuda":
        import torch._dynamo  # noqa: F401  (what any custom op's first call imports: not the op's own memory)

        _trim()
        _reset_peak()
        start = _status_kb("VmRSS") * 1024
    timed.once()  # warm-up: compile, allocator, first-touch of the inputs
    if device != "cuda":
        first["first_peak_bytes"] = max(0, _status_kb("VmHWM") * 1024 - start - grad_bytes)
    for t in timed.grad_to_none:
        t.grad = None
    _trim()
    if device != "cuda":
        first["retained_bytes"] = max(0, _status_kb("VmRSS") * 1024 - start)
    if timed.setup is not None:
        timed.setup()  # bwd: the forward graph exists before the measurement, as in the timing
        _trim()
    if device == "cuda":
        return {"backend": w.backend, "peak_bytes": max(0, cuda_peak_above(timed.fn) - grad_bytes)}
    _reset_peak()
    base = _status_kb("VmRSS") * 1024
    out = timed.fn()
    peak = _status_kb("VmHWM") * 1024
    del out
    return {"backend": w.backend, "peak_bytes": max(0, peak - base - grad_bytes), **first}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def measure(suite: str, provider: str, case_index: int, mode: str, device: str, quick: bool = False,
            timeout: int = 900) -> dict:
    """Runs probe() in a fresh interpreter (this one's executable, environment and directory, so it imports
    the same rlhf_fast) and returns its result."""
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.bench.memory", suite, provider, str(case_index), mode,
                           device, "quick" if quick else "full"], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    suite, provider, index, mode = sys.argv[1:5]
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    quick = len(sys.argv) > 6 and sys.argv[6] == "quick"
    print(json.dumps(probe(suite, provider, int(index), mode, device, quick)))
