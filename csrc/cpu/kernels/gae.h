// Stub of the gae CPU kernel (one build per SIMD capability, see ../dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../dispatch.h"

namespace rlhf_fast::cpu {
// rewards, values (N,) of one float dtype, mask (N,) bool, cu_seqlens (S+1,) int64 (checked: starts at 0,
// non-decreasing, ends at N), all contiguous. Writes advantages and returns, (N,) fp32.
using GaeFwdFn = void (*)(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                          const at::Tensor& cu_seqlens, float gamma, float lam, bool whiten,
                          at::Tensor& advantages, at::Tensor& returns);
}  // namespace rlhf_fast::cpu

RLHF_FAST_CPU_STUB(gae_fwd, GaeFwdFn)
