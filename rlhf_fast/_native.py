"""Loads the native extension rlhf_fast._C, remembering why it is missing if it is."""

from __future__ import annotations

import torch

try:
    from rlhf_fast import _C  # noqa: F401  (importing registers the rlhf_fast_C:: ops)

    NATIVE_ERROR: str | None = None
except ImportError as exc:  # not built (RLHF_FAST_SKIP_NATIVE=1) or built against another torch
    NATIVE_ERROR = f"native extension rlhf_fast._C is not available ({exc})"


def has_native() -> bool:
    return NATIVE_ERROR is None


def has_native_kernel(op: str, dispatch_key: str) -> bool:
    """Whether rlhf_fast_C::<op> has a kernel for `dispatch_key` ("CPU" or "CUDA")."""
    if NATIVE_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlhf_fast_C::{op}", dispatch_key)


# Fixed once _C is loaded; computed here so that backend selection, which torch.compile traces,
# never calls into the dispatcher.
_BUILT_WITH_CUDA = has_native_kernel("ranking_loss_fwd", "CUDA")


def built_with_cuda() -> bool:
    """Whether rlhf_fast._C was built with its CUDA kernels (csrc/cuda: ranking_loss's tells)."""
    return _BUILT_WITH_CUDA


def cpu_capability() -> str | None:
    """SIMD variant of the CPU kernels in use ("AVX512", "AVX2", "DEFAULT"), None without _C."""
    return torch.ops.rlhf_fast_C.cpu_capability() if NATIVE_ERROR is None else None


def cpu_gemm_engine() -> str | None:
    """Engine of the fp32 GEMMs in the CPU tiled ops (linear_logprobs, linear_ppo_loss): "onednn"
    or "blas" (ATen's addmm), chosen by RLHF_FAST_CPU_GEMM when set; None without _C."""
    return torch.ops.rlhf_fast_C.cpu_gemm_engine() if NATIVE_ERROR is None else None


CPU_BUFFER_CACHE_MAX_MB = 1 << 20  # 1 TB: the largest bound accepted


def set_cpu_buffer_cache(mb: int) -> int:
    """Opt in to (or out of) the native CPU kernels' large-buffer cache; returns the previous bound in MB.

    Off by default. With ``mb > 0`` the native CPU kernels allocate their large outputs and scratch
    buffers (>= 2 MB) 2 MB-aligned with ``madvise(MADV_HUGEPAGE)`` and keep up to ``mb`` MB of the ones
    released for reuse (oldest freed first), so a loop that calls the same op every step reuses memory
    that is already faulted in. ``mb = 0`` turns the cache off and frees every idle buffer. The
    environment variable ``RLHF_FAST_CPU_BUFFER_CACHE_MB`` sets the bound a process starts with.
    Without the native extension there is nothing to cache: returns 0."""
    if isinstance(mb, bool) or not isinstance(mb, int) or not 0 <= mb <= CPU_BUFFER_CACHE_MAX_MB:
        raise ValueError(f"mb: expected an integer in [0, {CPU_BUFFER_CACHE_MAX_MB}] (MB), got {mb!r}")
    return int(torch.ops.rlhf_fast_C.set_cpu_buffer_cache_mb(mb)) if NATIVE_ERROR is None else 0


def release_cpu_buffers() -> int:
    """Frees the idle large CPU buffers (>= 2 MB) that rlhf_fast's native CPU kernels keep for reuse
    between calls when the cache is on (see set_cpu_buffer_cache; off by default). Returns the bytes
    released; 0 without _C."""
    return int(torch.ops.rlhf_fast_C.release_cpu_buffers()) if NATIVE_ERROR is None else 0
