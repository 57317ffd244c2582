// Warp-level pieces shared by the CUDA log-prob kernels (gather_logprobs.cu, linear_logprobs.cu):
// merging the online-logsumexp statistics (rlhf_fast/gather_logprobs_math.h) across a warp.
#pragma once

#include <rlhf_fast/gather_logprobs_math.h>

namespace rlhf_fast::cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ logprobs::RowStats shfl_xor(const logprobs::RowStats& st, int mask) {
  return logprobs::RowStats{__shfl_xor_sync(kFullMask, st.m, mask), __shfl_xor_sync(kFullMask, st.s, mask),
                            __shfl_xor_sync(kFullMask, st.t, mask)};
}

// The merged statistics of the 32 lanes, in every lane.
__device__ __forceinline__ logprobs::RowStats warp_merge(logprobs::RowStats st) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) st = logprobs::merge(st, shfl_xor(st, mask));
  return st;
}

}  // namespace rlhf_fast::cuda
