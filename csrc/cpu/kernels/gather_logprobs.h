// Stubs of the gather_logprobs CPU kernels (one build per SIMD capability, see ../dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../dispatch.h"

namespace rlhf_fast::cpu {
// logits (N, V), labels (N,) int64; writes logprobs, entropy (if non-null), lse (all (N,) fp32).
// Returns the first row whose label is out of range (and not ignore_index), or -1.
using GatherLogprobsFwdFn = int64_t (*)(const at::Tensor& logits, const at::Tensor& labels, float inv_temp,
                                        int64_t ignore_index, at::Tensor& logprobs, at::Tensor* entropy,
                                        at::Tensor& lse);
// grad_entropy may be undefined; writes grad_logits (N, V) contiguous.
using GatherLogprobsBwdFn = void (*)(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                                     const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                     const at::Tensor& entropy, float inv_temp, int64_t ignore_index,
                                     at::Tensor& grad_logits);
}  // namespace rlhf_fast::cpu

RLHF_FAST_CPU_STUB(gather_logprobs_fwd, GatherLogprobsFwdFn)
RLHF_FAST_CPU_STUB(gather_logprobs_bwd, GatherLogprobsBwdFn)
