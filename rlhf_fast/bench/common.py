"""What every benchmark shares: the workload a suite hands the runner, the four modes built from it,
the equality check against the reference, timing, the environment stamped on every row.

A suite (rlhf_fast/bench/bench_<name>.py) describes each (provider, case) as a `Workload`: a forward function of
the differentiable inputs, the tensors to call it with, and how its outputs become the scalar whose
gradient the op's users take. From one workload the runner builds every mode:

  nograd   forward under torch.no_grad(): reference / old-policy log-probs, scoring
  fwd      forward with autograd recording (what a training step's forward costs, saved tensors included)
  bwd      backward only: the forward runs once outside the timed region, then loss.backward(retain_graph=True)
  fwd+bwd  forward and backward, fresh leaves every call

so a suite never writes mode-specific code, and every provider is timed on the same recipe.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MODES = ("nograd", "fwd", "bwd", "fwd+bwd")
GRAD_MODES = ("fwd", "bwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------
# Workloads and modes
# ---------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """One provider on one case.

    forward(*inputs) -> tensor or tuple of tensors (None entries allowed). `inputs` are passed as fresh
    leaves (detached, requires_grad in the grad modes); `params` are leaves the forward closes over
    (model weights) whose gradients count too. `loss(outputs) -> scalar` applies the upstream gradient;
    None for ops without a backward. `backend` is what actually runs: for rlhf_fast providers the
    registry's selection, never a name the provider merely asked for.
    """

    forward: Callable[..., Any]
    inputs: Sequence[torch.Tensor]
    backend: str
    loss: Callable[[Any], torch.Tensor] | None = None
    params: Sequence[torch.Tensor] = ()
    label: str | None = None  # the row's provider label when it differs from the provider's name
    check: bool = True        # False only for yardsticks that compute something else (a memory floor)

    @property
    def has_backward(self) -> bool:
        return self.loss is not None


class Skip(Exception):
    """A provider that does not apply to a case or cannot run here; the message says why."""


FUSED = "rlhf_fast"


def fused_providers(op: str, device: str) -> list[str]:
    """"rlhf_fast" (the automatic choice, what users get), then "rlhf_fast[<b>]" for every other backend
    the op registers for this device type, best first. The torch backend is the reference itself."""
    import rlhf_fast  # noqa: F401  (registers the ops)
    from rlhf_fast.backends import DEFAULT_PREFERENCE, PREFERENCE, op_registry

    impls = op_registry(op).impls
    preference = PREFERENCE.get(device, DEFAULT_PREFERENCE)
    return [FUSED] + [f"{FUSED}[{b}]" for b in preference if b != "torch" and b in impls]


def fused_backend(provider: str, op: str, *tensors: torch.Tensor) -> tuple[str | None, str]:
    """(backend= argument to pass, backend that will run) for an rlhf_fast provider. "rlhf_fast" passes no
    backend and reports the registry's automatic selection (which may be a fallback, e.g. torch when the
    native extension is missing); "rlhf_fast[b]" asks for b and raises Skip with the registry's reasons
    when b cannot run these tensors."""
    import rlhf_fast

    if provider == FUSED:
        return None, rlhf_fast.select_backend(op, *tensors)
    if not (provider.startswith(FUSED + "[") and provider.endswith("]")):
        raise ValueError(f"not an rlhf_fast provider: {provider!r}")
    backend = provider[len(FUSED) + 1:-1]
    try:
        return backend, rlhf_fast.select_backend(op, *tensors, backend=backend)
    except ValueError as e:
        raise Skip(str(e)) from None


def is_fused(provider: str) -> bool:
    return provider == FUSED or provider.startswith(FUSED + "[")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def _leaves(w: Workload, grad: bool) -> list[torch.Tensor]:
    return [x.detach().requires_grad_(grad and x.is_floating_point()) for x in w.inputs]


def _grad_tensors(w: Workload, leaves) -> list[torch.Tensor]:
    return [t for t in list(leaves) + list(w.params) if t.requires_grad]


def _clear(tensors) -> None:
    for t in tensors:
        t.grad = None


@dataclass
class Timed:
    """What the timer runs for one mode: setup() (untimed, before every run, may be None), then fn()
    (timed); the .grad of grad_to_none is cleared before every run."""

    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    grad_to_none: list = field(default_factory=list)

    def once(self):
        _clear(self.grad_to_none)
        if self.setup is not None:
            self.setup()
        return self.fn()


def mode_fn(w: Workload, mode: str) -> Timed:
    """The timed part of `mode`. bwd: every run gets a fresh forward graph from the untimed setup, then
    only loss.backward() is timed (no retain_graph: compiled backwards free their buffers as they go)."""
    if mode == "nograd":
        def run():
            with torch.no_grad():
                return w.forward(*w.inputs)
        return Timed(run)
    if not w.has_backward:
        raise ValueError(f"mode {mode!r} needs a backward; this workload has none")
    if mode == "fwd":
        return Timed(lambda: w.forward(*_leaves(w, True)))
    if mode == "bwd":
        state = {}

        def setup():
            state["leaves"] = _leaves(w, True)
            _clear(w.params)
            state["loss"] = w.loss(w.forward(*state["leaves"]))

        def run():
            loss = state.pop("loss")
            loss.backward()
        return Timed(run, setup, list(w.params))
    if mode == "fwd+bwd":
        def run():
            leaves = _leaves(w, True)
            w.loss(w.forward(*leaves)).backward()
        return Timed(run, None, list(w.params))
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _flatten(out) -> list[torch.Tensor | None]:
    if isinstance(out, torch.Tensor) or out is None:
        return [out]
    if isinstance(out, dict):
        return [v for _, v in sorted(out.items())]
    flat = []
    for o in out:
        flat += _flatten(o)
    return flat


def results(w: Workload, grad: bool) -> dict[str, list]:
    """One run for the equality check: {"outputs": [...], "grads": [...]} (grads empty without `grad`)."""
    if not grad:
        with torch.no_grad():
            return {"outputs": [_detach(o) for o in _flatten(w.forward(*w.inputs))], "grads": []}
    leaves = _leaves(w, True)
    _clear(w.params)
    out = w.forward(*leaves)
    w.loss(out).backward()
    grads = [t.grad for t in _grad_tensors(w, leaves)]
    _clear(w.params)
    return {"outputs": [_detach(o) for o in _flatten(out)], "grads": grads}


def _detach(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


# Tolerances of the pre-timing equality check, by the dtype of the tensor compared: (rtol, atol as a
# fraction of the reference's largest magnitude). The check catches wrong results, not last-bit drift.
TOLERANCE = {torch.float32: (1e-3, 1e-4), torch.float64: (1e-6, 1e-8), torch.bfloat16: (2e-2, 1e-2),
             torch.float16: (4e-3, 2e-3)}


def compare(got: dict, want: dict, tolerance: dict | None = None) -> str | None:
    """None when `got` matches `want` (results() of a provider and of the reference), else what differs."""
    tol = {**TOLERANCE, **(tolerance or {})}
    for kind in ("outputs", "grads"):
        a_list, b_list = got[kind], want[kind]
        if len(a_list) != len(b_list):
            return f"{kind}: {len(a_list)} tensors, reference has {len(b_list)}"
        # atol is relative to the largest reference magnitude of the whole kind (as if the tensors were
        # concatenated): a weight whose gradient is rounding noise (~1e-9) must not fail on its own scale
        scales = [b.float().abs().max().item() for b in b_list if b is not None and b.numel()]
        kind_scale = max(scales, default=0.0)
        for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            if a is None or b is None:
                if a is not b:
                    return f"{kind}[{i}]: {'None' if a is None else 'a tensor'} where the reference has " \
                           f"{'None' if b is None else 'a tensor'}"
                continue
            if a.shape != b.shape:
                return f"{kind}[{i}]: shape {tuple(a.shape)}, reference {tuple(b.shape)}"
            rtol, atol = tol.get(b.dtype, tol[torch.float32])
            af, bf = a.float(), b.float()
            scale = bf.abs().max().item() if bf.numel() else 0.0
            if not torch.allclose(af, bf, rtol=rtol, atol=atol * max(kind_scale, 1e-6), equal_nan=True):
                err = (af - bf).abs().nan_to_num(float("inf")).max().item()
                return f"{kind}[{i}]: max |diff| {err:.3g} (reference max |x| {scale:.3g}, rtol {rtol}, atol {atol}x)"
    return None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    reps: int


def _summary(times: list[float]) -> Timing:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[0], q[2], min(times), len(times))


def time_cpu(t: Timed, *, warmup: int = 2, reps: int = 11, min_seconds: float = 0.0) -> Timing:
    """Median wall time of t.fn() after `warmup` runs; at least `reps` runs, more until min_seconds passed."""
    for _ in range(warmup):
        t.once()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        _clear(t.grad_to_none)
        if t.setup is not None:
            t.setup()
        t0 = time.perf_counter()
        t.fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_cpu_interleaved(timeds: dict, *, warmup: int = 2, reps: int = 11) -> dict:
    """time_cpu for several providers of one case at once: after each one's warm-up, the timed runs go
    round-robin (A B C, B C A, C A B, ...), so a slow spell of the machine (another process, a clock
    change) lands on every provider alike instead of on whichever ran during it. -> {key: Timing}."""
    for t in timeds.values():
        for _ in range(warmup):
            t.once()
    keys = list(timeds)
    times: dict = {k: [] for k in keys}
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t = timeds[k]
            _clear(t.grad_to_none)
            if t.setup is not None:
                t.setup()
            t0 = time.perf_counter()
            t.fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _summary(v) for k, v in times.items()}


def time_cuda(t: Timed, *, warmup_ms: float = 25, rep_ms: float = 100, **_) -> Timing:
    """CUDA-synchronised timing: triton.testing.do_bench, which brackets every call with CUDA events and
    zeroes a 256 MB buffer before it (an L2 flush, so no call reads its inputs from a warm L2), and clears
    the .grad of grad_to_none outside the timed region. With an untimed setup per run (bwd), or without
    triton: time_cuda_events."""
    try:
        import triton.testing
    except ImportError:
        return time_cuda_events(t)
    if t.setup is not None:
        return time_cuda_events(t)
    med, q1, q3, lo = triton.testing.do_bench(t.fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=t.grad_to_none or None,
                                              quantiles=[0.5, 0.25, 0.75, 0.0])
    return Timing(med, q1, q3, lo, 0)


def time_cuda_events(t: Timed, *, warmup: int = 5, reps: int = 50) -> Timing:
    """The same recipe with plain CUDA events: setup (untimed), L2 flushed by zeroing a buffer larger than
    any L2, then the run bracketed by its own pair of events; one synchronisation at the end."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        t.once()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends, strict=True):
        _clear(t.grad_to_none)
        if t.setup is not None:
            t.setup()
        flush.zero_()
        s.record()
        t.fn()
        e.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def time_fn(t: Timed, device: str, **kw) -> Timing:
    return time_cuda(t, **kw) if device == "cuda" else time_cpu(t, **kw)


def cuda_peak_above(fn: Callable[[], Any]) -> int:
    """Peak bytes torch allocates on the GPU during fn() above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base)


def cuda_peak_bytes(t: Timed) -> int:
    """cuda_peak_above of one timed run, after its untimed preparation."""
    _clear(t.grad_to_none)
    if t.setup is not None:
        t.setup()
    return cuda_peak_above(t.fn)


# ---------------------------------------------------------------------------------------------
# Memory floor: the bandwidth a bandwidth-bound op is measured against
# ---------------------------------------------------------------------------------------------

# Peak HBM bandwidth (bytes/s) and dense bf16 tensor-core FLOP/s by device-name fragment, first match.
GPU_PEAKS = (("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12),
             ("A100-SXM4-80GB", 2.039e12, 312e12), ("A100 80GB PCIe", 1.935e12, 312e12), ("A100", 1.555e12, 312e12))


def gpu_peaks(name: str) -> tuple[float, float] | None:
    for fragment, bandwidth, flops in GPU_PEAKS:
        if fragment in name:
            return bandwidth, flops
    return None


def copy_bandwidth(device: str, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of the best of several `dst.copy_(src)` of nbytes (read + write both counted): what this
    machine's memory system delivers to a plain streaming kernel, the floor for bandwidth-bound ops."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    fn = Timed(lambda: dst.copy_(src))
    t = time_cuda(fn) if device == "cuda" else time_cpu(fn, warmup=2, reps=7)
    return 2 * nbytes / (t.min_ms * 1e-3)


def memory_floor(device: str) -> tuple[float, str]:
    """(bytes/s, where it comes from): the GPU's datasheet HBM bandwidth when known, else a measured copy."""
    if device == "cuda":
        peaks = gpu_peaks(torch.cuda.get_device_name())
        if peaks:
            return peaks[0], "datasheet"
    return copy_bandwidth(device), "measured copy"


# ---------------------------------------------------------------------------------------------
# Environment of a run
# ---------------------------------------------------------------------------------------------

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
    """The commit of the source checkout rlhf_fast runs from (an editable install); "unknown" for an installed
    wheel, even one installed into a virtualenv that lies inside some git repository."""
    import rlhf_fast

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(rlhf_fast.__file__)))
    try:
        top, commit = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], capture_output=True,
                                     text=True, check=True, cwd=package_root).stdout.split()
    except (OSError, ValueError, subprocess.CalledProcessError):
        return "unknown"
    return commit if os.path.realpath(top) == os.path.realpath(package_root) else "unknown"


PEERS = ("triton", "trl", "transformers", "liger_kernel", "flash_attn")


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "none"
    for dist in (module, module.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def environment(device: str) -> dict:
    import rlhf_fast

    env = {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "rlhf_fast": rlhf_fast.__version__,
        "cpu_capability": rlhf_fast.cpu_capability() or "none",
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    env.update({name: _version(name) for name in PEERS})
    return env


@dataclass
class Row:
    op: str
    case: str
    mode: str
    provider: str         # the provider's label; an rlhf_fast provider is labelled by the backend that ran
    backend: str          # what actually ran (registry selection, "inductor", a peer's name)
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float = float("nan")
    reps: int = 0
    peak_MB: float = float("nan")
    status: str = "ok"    # "ok", or why the provider was not timed (wrong result, error)
    extra: dict = field(default_factory=dict)  # derived metrics and the swept sizes

    def flat(self, env: dict) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **{f"x_{k}": v for k, v in extra.items()}, **env}
