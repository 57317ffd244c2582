// Large CPU outputs and scratch buffers of our kernels (an (N, V) logits gradient is hundreds of
// MB, GAE's outputs a few MB) spend much of their time in first-touch page faults when they come
// from malloc's fresh 4 KB pages: measured at (4096, 32000) fp32, 144 ms to allocate and fill vs
// 10 ms to fill an existing buffer. A training loop that calls the same op every step can opt in to a
// buffer cache: buffers of >= 2 MB then get 2 MB alignment and madvise(MADV_HUGEPAGE) (as torch's own
// THP_MEM_ALLOC_ENABLE=1 does for every allocation), and the ones released are kept for reuse, so
// the next step reuses faulted-in memory instead of asking the kernel for new pages.
//
// Off by default: idle buffers are memory no one else can use. Opt in with the environment variable
// RLHF_FAST_CPU_BUFFER_CACHE_MB=<MB> (read at the first large allocation) or
// rlhf_fast.set_cpu_buffer_cache(mb) at any time; at most that many MB of idle buffers are kept, the
// oldest released first, and 0 turns the cache off again (every idle buffer is freed and allocations
// go back to at::empty). release_cached_buffers() returns the idle buffers to the system. Where
// transparent huge pages are disabled, madvise is a no-op and cached buffers are plain aligned memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rlhf_fast::cpu {

// Uninitialised contiguous CPU tensor; huge-page backed and cached when large and the cache is on.
at::Tensor empty_hugepage(at::IntArrayRef sizes, at::ScalarType dtype);

// Sets the most idle MB the cache keeps, in [0, 2^20] (0: off, every idle buffer freed; checked);
// returns the previous bound in MB.
int64_t set_buffer_cache_mb(int64_t mb);

// Frees every idle cached buffer; returns the bytes released.
int64_t release_cached_buffers();

}  // namespace rlhf_fast::cpu
