// Large CPU outputs and scratch buffers of our kernels (an (N, V) logits gradient is hundreds of
// MB, GAE's outputs a few MB) spend most of their time in first-touch page faults when they come
// from malloc's fresh 4 KB pages: measured at (4096, 32000) fp32, 144 ms to allocate and fill vs
// 10 ms to fill an existing buffer; a fresh 2 MB buffer costs ~0.45 ms of faults, more than GAE's
// whole scan. This allocator gives buffers of >= 2 MB 2 MB alignment and madvise(MADV_HUGEPAGE)
// (as torch's own THP_MEM_ALLOC_ENABLE=1 does for every allocation), and keeps the buffers it gets
// back in a small cache, so a training loop that calls the same op every step reuses already
// faulted-in memory instead of asking the kernel for (and, with huge pages, compacting) new pages
// each time. The cache holds at most RLHF_FAST_CPU_BUFFER_CACHE_MB (default 1024; 0: no cache)
// of idle buffers, oldest released first; release_cached_buffers() returns them all to the system.
// Where transparent huge pages are disabled, madvise is a no-op and this is plain aligned memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rlhf_fast::cpu {

// Uninitialised contiguous CPU tensor; huge-page backed and cached when large.
at::Tensor empty_hugepage(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees every idle cached buffer; returns the bytes released.
int64_t release_cached_buffers();

}  // namespace rlhf_fast::cpu
