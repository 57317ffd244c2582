// CUDA kernels of gae: generalized advantage estimation over packed sequences with masked positions,
// optionally whitened.
//
// Shapes: rewards, values (N,) float32 / bfloat16 / float16 (one dtype), mask (N,) bool, cu_seqlens
// (S+1,) int64 (values checked by the Python layer), all contiguous; advantages, returns (N,) fp32.
// The recursion, its affine-map form and the whitening moments are rlhf_fast/gae_math.h, shared with
// the CPU kernel's portable build (its SIMD builds scan blocks of positions inside a register).
//
// Cost model: the Python loop trainers write launches ~8 kernels per time step (16K launches at
// T = 2048, ~100 ms of launch latency); here one launch reads rewards, values and mask once and
// writes advantages and returns once ((2b + 9) N bytes: 4.7 MB at (256, 2048) fp32, ~2 us of HBM3
// bandwidth). Whitening adds two small launches and one read + write of the advantages.
//
// One warp per sequence (kWarps sequences per block, grid-stride over sequences). The warp walks its
// sequence from the end in chunks of 32 * kItems positions; lane l owns kItems consecutive positions
// of the chunk:
//   1. it composes its positions' maps (gae::position_map / gae::compose, right to left);
//   2. a Kogge-Stone scan over lanes with __shfl_down_sync gives each lane the composition of its own
//      and all later lanes' maps (5 floats per map, 5 shuffle steps);
//   3. the map of lane l + 1 applied to the carry entering the chunk is the carry entering lane l's
//      last position, from which the lane walks its positions with gae::step -- the sequential form
//      of the recursion -- and writes advantages and returns;
//   4. lane 0's scanned map applied to the chunk's carry is the next chunk's carry.
// Whitening: each lane folds its valid advantages into Welford moments (gae::push); the warp merges
// them (gae::merge over a shuffle butterfly) into one (count, mean, M2) per sequence; one block merges
// the S triples (gae_merge_moments_kernel); a grid-stride pass applies (A - mean) * rstd.
//
// Indexing is int64 throughout (positions, offsets, sequence numbers); grids are capped at 2^31 - 1
// blocks with grid-stride loops, so neither N nor S is limited by gridDim or 32-bit arithmetic.
//
// Build: part of rlhf_fast._C when torch has CUDA and nvcc exists. Without a GPU,
// tests/test_cuda_build.py compiles this file alone for sm_80 and sm_90 and checks for spills.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <rlhf_fast/gae_math.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace rlhf_fast::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = 4;                      // sequences (warps) per block
constexpr int kThreads = kWarps * kWarp;
constexpr int kItems = 4;                      // consecutive positions per lane per chunk
constexpr int64_t kChunk = int64_t(kWarp) * kItems;
constexpr int kMergeThreads = 256;
constexpr int kApplyThreads = 256;

__device__ __forceinline__ gae::Map shfl_down(const gae::Map& m, int delta) {
  return gae::Map{__shfl_down_sync(kFullMask, m.dA, delta), __shfl_down_sync(kFullMask, m.a, delta),
                  __shfl_down_sync(kFullMask, m.b, delta), __shfl_down_sync(kFullMask, m.dV, delta),
                  __shfl_down_sync(kFullMask, m.e, delta)};
}

__device__ __forceinline__ gae::Map shfl(const gae::Map& m, int lane) {
  return gae::Map{__shfl_sync(kFullMask, m.dA, lane), __shfl_sync(kFullMask, m.a, lane),
                  __shfl_sync(kFullMask, m.b, lane), __shfl_sync(kFullMask, m.dV, lane),
                  __shfl_sync(kFullMask, m.e, lane)};
}

__device__ __forceinline__ gae::Moments<float> shfl_xor(const gae::Moments<float>& m, int mask) {
  return gae::Moments<float>{__shfl_xor_sync(kFullMask, m.n, mask), __shfl_xor_sync(kFullMask, m.mean, mask),
                             __shfl_xor_sync(kFullMask, m.m2, mask)};
}

// Butterfly merge across a warp: every lane ends with the moments of all 32.
__device__ __forceinline__ gae::Moments<float> warp_merge(gae::Moments<float> m) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) m = gae::merge(m, shfl_xor(m, mask));
  return m;
}

// rewards, values (N,) T; mask (N,) bool; cu_seqlens (S+1,) int64
// adv, ret    (N,) fp32 out
// moments     (S, 3) fp32 out (count, mean, M2 of each sequence's valid advantages); kWhiten only
template <typename T, bool kWhiten>
__global__ void __launch_bounds__(kThreads)
    gae_fwd_kernel(const T* __restrict__ rewards, const T* __restrict__ values, const bool* __restrict__ mask,
                   const int64_t* __restrict__ cu_seqlens, int64_t n_seq, float gamma, float gamma_lam,
                   float* __restrict__ adv, float* __restrict__ ret, float* __restrict__ moments) {
  const int lane = int(threadIdx.x) % kWarp;
  const int64_t warp_step = int64_t(gridDim.x) * kWarps;
  // The loop bounds are uniform across each warp, as the full-mask shuffles require.
  for (int64_t seq = int64_t(blockIdx.x) * kWarps + int(threadIdx.x) / kWarp; seq < n_seq; seq += warp_step) {
    const int64_t start = cu_seqlens[seq], end = cu_seqlens[seq + 1];
    gae::Carry carry = gae::end_of_sequence();  // entering the current chunk from the right
    gae::Moments<float> mom = gae::no_moments<float>();
    for (int64_t chunk_end = end; chunk_end > start; chunk_end -= kChunk) {
      const int64_t p0 = chunk_end - kChunk + int64_t(lane) * kItems;  // this lane's first position
      float r[kItems], v[kItems];
      bool ok[kItems];
#pragma unroll
      for (int e = 0; e < kItems; ++e) {
        const int64_t p = p0 + e;
        ok[e] = p >= start && mask[p];
        // masked positions are never read: their rewards and values may hold anything
        r[e] = ok[e] ? static_cast<float>(rewards[p]) : 0.f;
        v[e] = ok[e] ? static_cast<float>(values[p]) : 0.f;
      }
      gae::Map own = gae::identity();
#pragma unroll
      for (int e = kItems - 1; e >= 0; --e) {
        own = gae::compose(gae::position_map(r[e], v[e], ok[e], gamma, gamma_lam), own);
      }
      gae::Map scan = own;  // becomes: this lane's map o the maps of all later lanes
#pragma unroll
      for (int delta = 1; delta < kWarp; delta <<= 1) {
        const gae::Map later = shfl_down(scan, delta);
        if (lane + delta < kWarp) scan = gae::compose(scan, later);
      }
      const gae::Map next_lane = shfl_down(scan, 1);
      gae::Carry c = lane == kWarp - 1 ? carry : gae::apply(next_lane, carry);
#pragma unroll
      for (int e = kItems - 1; e >= 0; --e) {
        const int64_t p = p0 + e;
        const float a = gae::step(c, r[e], v[e], ok[e], gamma, gamma_lam);
        if (p >= start) {
          adv[p] = a;
          ret[p] = ok[e] ? a + v[e] : 0.f;
        }
        if (kWhiten && ok[e]) gae::push(mom, a);
      }
      carry = gae::apply(shfl(scan, 0), carry);
    }
    if (kWhiten) {
      mom = warp_merge(mom);
      if (lane == 0) {
        moments[seq * 3] = mom.n;
        moments[seq * 3 + 1] = mom.mean;
        moments[seq * 3 + 2] = mom.m2;
      }
    }
  }
}

// moments (S, 3) fp32 -> stats (2,) fp32 = (batch mean, 1 / sqrt(unbiased var + eps)). One block; the
// merge order is fixed by the thread layout, so the result is deterministic.
__global__ void __launch_bounds__(kMergeThreads)
    gae_merge_moments_kernel(const float* __restrict__ moments, int64_t n_seq, float* __restrict__ stats) {
  __shared__ gae::Moments<float> warp_moments[kMergeThreads / kWarp];
  gae::Moments<float> m = gae::no_moments<float>();
  for (int64_t s = threadIdx.x; s < n_seq; s += kMergeThreads) {
    m = gae::merge(m, gae::Moments<float>{moments[s * 3], moments[s * 3 + 1], moments[s * 3 + 2]});
  }
  m = warp_merge(m);
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp;
  if (lane == 0) warp_moments[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    gae::Moments<float> all = gae::no_moments<float>();
    for (int w = 0; w < kMergeThreads / kWarp; ++w) all = gae::merge(all, warp_moments[w]);
    stats[0] = all.mean;
    stats[1] = gae::whiten_rstd(all);
  }
}

// adv (N,) fp32 whitened in place where mask is set (masked positions stay 0).
__global__ void __launch_bounds__(kApplyThreads)
    gae_whiten_kernel(float* __restrict__ adv, const bool* __restrict__ mask, const float* __restrict__ stats,
                      int64_t total) {
  const float mean = stats[0], rstd = stats[1];
  for (int64_t i = int64_t(blockIdx.x) * kApplyThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kApplyThreads) {
    if (mask[i]) adv[i] = (adv[i] - mean) * rstd;
  }
}

#define RLHF_FAST_CUDA_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

inline unsigned grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return unsigned(std::min<int64_t>(std::max<int64_t>(blocks, 1), INT_MAX));
}

}  // namespace

// Entry point (same signature as gae_fwd_cpu).
std::tuple<at::Tensor, at::Tensor> gae_fwd_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                const at::Tensor& mask, const at::Tensor& cu_seqlens, double gamma,
                                                double lam, bool whiten) {
  check_gae_fwd(rewards, values, mask, cu_seqlens, gamma, lam);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t total = rewards.size(0), n_seq = cu_seqlens.size(0) - 1;
  const auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = at::empty({total}, opts), returns = at::empty({total}, opts);
  if (total == 0 || n_seq == 0) return {advantages, returns};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor moments = at::empty({whiten ? n_seq : 0, 3}, opts);
  const float g = float(gamma), gl = float(gamma * lam);
  RLHF_FAST_CUDA_DISPATCH_FLOAT_TYPES(rewards.scalar_type(), "gae_fwd_cuda", [&] {
    const auto* r = rewards.const_data_ptr<scalar_t>();
    const auto* v = values.const_data_ptr<scalar_t>();
    const bool* m = mask.const_data_ptr<bool>();
    const int64_t* cu = cu_seqlens.const_data_ptr<int64_t>();
    float* a = advantages.data_ptr<float>();
    float* rt = returns.data_ptr<float>();
    if (whiten) {
      gae_fwd_kernel<scalar_t, true><<<grid_for(n_seq, kWarps), kThreads, 0, stream>>>(
          r, v, m, cu, n_seq, g, gl, a, rt, moments.data_ptr<float>());
    } else {
      gae_fwd_kernel<scalar_t, false><<<grid_for(n_seq, kWarps), kThreads, 0, stream>>>(r, v, m, cu, n_seq, g, gl, a,
                                                                                         rt, nullptr);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (whiten) {
    at::Tensor stats = at::empty({2}, opts);
    gae_merge_moments_kernel<<<1, kMergeThreads, 0, stream>>>(moments.const_data_ptr<float>(), n_seq,
                                                              stats.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gae_whiten_kernel<<<grid_for(total, kApplyThreads), kApplyThreads, 0, stream>>>(
        advantages.data_ptr<float>(), mask.const_data_ptr<bool>(), stats.const_data_ptr<float>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {advantages, returns};
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) { m.impl("gae_fwd", &gae_fwd_cuda); }

}  // namespace rlhf_fast::cuda
