// Large CPU outputs (an (N, V) logits gradient is hundreds of MB) spend most of their time in
// first-touch page faults when they come from malloc's fresh 4 KB pages: measured at (4096, 32000)
// fp32, 144 ms to allocate and fill vs 10 ms to fill an existing buffer. This allocator gives
// buffers of >= 4 MB 2 MB alignment and madvise(MADV_HUGEPAGE), as torch's own
// THP_MEM_ALLOC_ENABLE=1 does for every allocation, but only for the outputs of our kernels.
// Where transparent huge pages are disabled, madvise is a no-op and this is plain aligned memory.
#pragma once

#include <ATen/core/Tensor.h>

namespace rlhf_fast::cpu {

// Uninitialised contiguous CPU tensor; huge-page backed when large.
at::Tensor empty_hugepage(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace rlhf_fast::cpu
