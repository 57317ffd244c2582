"""One registry decides which backend runs an op.

Choice: explicit ``backend=`` argument > ``RLHF_FAST_BACKEND`` environment variable > the best
available backend for the tensors' device. Every backend declares what it supports (devices, dtypes)
and every op implementation may add its own limits; both answer with readable reasons. An explicit
choice that cannot run raises ``ValueError`` with those reasons; an automatic choice falls through to
the next backend in the device's preference order.

Backends:
  torch   pure-PyTorch reference (rlhf_fast/reference.py): any device, also float64
  cpu     native C++ kernels (csrc/cpu, at::vec SIMD + at::parallel_for), from rlhf_fast._C
  cuda    native CUDA kernels (csrc/cuda), from rlhf_fast._C when built with CUDA; only ranking_loss has
          one, for the K > 64 that its Triton kernel refuses
  triton  Triton kernels (kernels/, installed as rlhf_fast.kernels); on CPU tensors only under
          TRITON_INTERPRET=1, where they run in Triton's interpreter (for tests, never chosen
          automatically)
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rlhf_fast import _native

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "RLHF_FAST_BACKEND"

# Automatic choice, best first, per device type. The Triton interpreter is never picked for speed.
PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
DEFAULT_PREFERENCE = ("torch",)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Native backends run rlhf_fast_C::<op>_fwd; its kernel for this dispatch key must exist.
NATIVE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton's interpreter runs our kernels from 3.7 on: before it, a loop bound loaded from memory (the attention
# kernels' block ranges) is not a 0-d value there and `range(lo, hi)` raises. Compiled kernels need 3.6.
INTERPRETER_MIN_TRITON = (3, 7)


@functools.cache
def _triton_version() -> str:
    return importlib.metadata.version("triton")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _triton_reasons(device: torch.device) -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    if device.type == "cuda":
        return [] if torch.cuda.is_available() else ["torch.cuda.is_available() is False"]
    if device.type == "cpu":
        if not triton_interpret():
            return ["triton runs CPU tensors only under TRITON_INTERPRET=1"]
        version = _triton_version()
        if _version_tuple(version) < INTERPRETER_MIN_TRITON:
            return [f"triton {version}'s interpreter cannot run rlhf_fast's kernels (a loop bound loaded from memory "
                    f"fails in it before triton 3.7): TRITON_INTERPRET=1 needs triton >= 3.7; compiled GPU kernels "
                    f"need 3.6"]
        return []
    return [f"triton does not run on {device.type} tensors"]


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    description: str

    def availability_reasons(self, device: torch.device | None = None, native: bool = True) -> list[str]:
        """Why this backend cannot run at all (on `device`, if given); empty when it can. `native=False`:
        the op implements this backend in Python (e.g. on torch's own fused kernels), not in rlhf_fast._C."""
        reasons: list[str] = []
        if self.name in ("cpu", "cuda") and native and not _native.has_native():
            reasons.append(_native.NATIVE_ERROR or "native extension missing")
        if self.name == "cuda" and native and _native.has_native() and not _native.built_with_cuda():
            reasons.append("rlhf_fast._C was built without CUDA kernels (CPU-only torch or no nvcc)")
        if self.name == "cuda" and not torch.cuda.is_available():
            reasons.append("torch.cuda.is_available() is False")
        if self.name == "triton":
            reasons += _triton_reasons(device if device is not None else torch.device("cuda"))
        if device is not None and device.type not in self.devices:
            reasons.append(f"{self.name} does not run on {device.type} tensors (runs on {', '.join(self.devices)})")
        return reasons

    def reasons(self, tensors: Sequence[torch.Tensor], native: bool = True) -> list[str]:
        """Why this backend cannot run on these input tensors; empty when it can."""
        device = tensors[0].device
        reasons = self.availability_reasons(device, native)
        for t in tensors:
            if t.is_floating_point() and t.dtype not in self.dtypes:
                reasons.append(f"{self.name} does not support dtype {t.dtype}")
                break
        return reasons


BACKEND_INFO: dict[str, Backend] = {
    "torch": Backend("torch", ("cpu", "cuda", "mps", "xpu", "meta"), FLOAT_DTYPES + (torch.float64,),
                     "pure-PyTorch reference"),
    "cpu": Backend("cpu", ("cpu",), FLOAT_DTYPES, "native C++ (at::vec + at::parallel_for)"),
    "cuda": Backend("cuda", ("cuda",), FLOAT_DTYPES, "native CUDA"),
    "triton": Backend("triton", ("cuda", "cpu"), FLOAT_DTYPES, "Triton"),
}


@dataclass
class OpImpl:
    """An op's implementation in one backend. `limits(*tensors)` adds op-specific reasons."""

    forward: Callable
    backward: Callable | None = None
    limits: Callable[..., list[str]] | None = None
    missing: str | None = None  # why a native backend cannot run this op (no kernel built), fixed at registration
    native: bool = True  # False: a Python implementation of a cpu/cuda backend (needs no rlhf_fast._C kernel)


@dataclass
class OpRegistry:
    name: str
    impls: dict[str, OpImpl] = field(default_factory=dict)
    # select()'s answers for ops whose backends have no shape limits: they depend only on the request,
    # the environment variables, whether rlhf_fast._C loaded, the device and the dtypes
    _chosen: dict[tuple, str] = field(default_factory=dict, repr=False)
    _has_limits: bool = field(default=False, repr=False)

    def register(self, backend: str, forward: Callable, backward: Callable | None = None,
                 limits: Callable[..., list[str]] | None = None, native: bool = True,
                 native_op: str | None = None) -> None:
        """`native=False` registers a cpu/cuda backend written in Python (no rlhf_fast_C::<op>_fwd);
        `native_op` names the rlhf_fast_C schema a native backend calls (default ``<op>_fwd``)."""
        if backend not in BACKEND_INFO:
            raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
        missing = None
        if native and backend in NATIVE_KEYS and _native.has_native() and not _native.has_native_kernel(
                native_op or f"{self.name}_fwd", NATIVE_KEYS[backend]):
            missing = f"rlhf_fast._C has no {backend} kernel for {self.name}"
        self.impls[backend] = OpImpl(forward, backward, limits, missing, native)
        self._chosen.clear()
        self._has_limits = any(impl.limits is not None for impl in self.impls.values())

    def reasons(self, backend: str, tensors: Sequence[torch.Tensor]) -> list[str]:
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        reasons = BACKEND_INFO[backend].reasons(tensors, self.impls[backend].native)
        if not reasons and self.impls[backend].missing:
            reasons.append(self.impls[backend].missing)
        limits = self.impls[backend].limits
        if not reasons and limits is not None:
            reasons += limits(*tensors)
        return reasons

    def select(self, tensors: Sequence[torch.Tensor], backend: str | None = None) -> str:
        """Name of the backend that runs this op on `tensors` (see module docstring for the rule)."""
        if self._has_limits:
            return self._select(tensors, backend)
        env = os.environ
        key = (backend, env.get(ENV_VAR), env.get("TRITON_INTERPRET"), _native.has_native(), tensors[0].device,
               *(t.dtype for t in tensors))
        name = self._chosen.get(key)
        if name is None:
            name = self._chosen[key] = self._select(tensors, backend)  # an error is raised, never kept
        return name

    def _select(self, tensors: Sequence[torch.Tensor], backend: str | None) -> str:
        requested, source = requested_backend(backend)
        if requested is not None:
            if requested not in BACKEND_INFO:
                raise ValueError(f"{source}{requested!r} is not a backend; expected one of {BACKENDS}")
            reasons = self.reasons(requested, tensors)
            if reasons:
                raise ValueError(f"{self.name}: backend {requested!r} (from {source}) cannot run: "
                                 + "; ".join(reasons))
            return requested
        device = tensors[0].device
        tried = []
        for name in PREFERENCE.get(device.type, DEFAULT_PREFERENCE):
            reasons = self.reasons(name, tensors)
            if not reasons:
                return name
            tried.append(f"{name}: " + "; ".join(reasons))
        raise ValueError(f"{self.name}: no backend can run these inputs ({' | '.join(tried)})")

    def impl(self, backend: str) -> OpImpl:
        return self.impls[backend]


def requested_backend(backend: str | None) -> tuple[str | None, str]:
    """(the backend a call asks for, where it comes from): the call's `backend`, else RLHF_FAST_BACKEND when
    set and not empty, else (None, "") -- the automatic choice."""
    if backend is not None:
        return backend, "backend="
    env = os.environ.get(ENV_VAR)
    return (env, ENV_VAR) if env else (None, "")


_OPS: dict[str, OpRegistry] = {}


def op_registry(name: str) -> OpRegistry:
    """The registry of op `name`, created on first use."""
    return _OPS.setdefault(name, OpRegistry(name))


def select_backend(op: str, *tensors: torch.Tensor, backend: str | None = None) -> str:
    """Which backend `rlhf_fast.<op>` would run on these tensors (benchmarks report this name)."""
    if op not in _OPS:
        raise ValueError(f"op={op!r} is not an rlhf_fast op; expected one of {sorted(_OPS)}")
    return _OPS[op].select(tensors, backend)


def backends_available(device: str | torch.device | None = None) -> dict[str, list[str]]:
    """For each backend, why it cannot run (an empty list when it can).

    With no `device`, each backend is asked about its own primary device: cpu for "cpu" and "torch",
    cuda for "cuda", and for "triton" cuda, or cpu under TRITON_INTERPRET=1.
    """
    out = {}
    for name, info in BACKEND_INFO.items():
        if device is not None:
            dev = torch.device(device)
        elif name in ("torch", "cpu") or (name == "triton" and triton_interpret()):
            dev = torch.device("cpu")
        else:
            dev = torch.device("cuda")
        out[name] = info.availability_reasons(dev)
    return out
