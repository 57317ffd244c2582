// The CUDA `Tiles` policy of the tiled lm_head ops (rlhf_fast/linear_logprobs_tiled.h and
// rlhf_fast/linear_ppo_loss_tiled.h): cuBLAS GEMMs through ATen (mm_out / addmm_) into an fp32
// logits tile, and two passes over each tile while it is hot in L2:
//   fold   caps each raw logit (softcap, in registers: the forward does not need the capped tile
//          afterwards, so it is not written back), folds the row into the running online-softmax
//          statistics m / s / t with logprobs::push and logprobs::merge, and picks the label's z;
//   grad   turns the raw logits into dL/dlogits in place: logprobs::grad_logit (+ g_lp at the
//          label), times the chain rule of the temperature and the softcap, (1 - tanh^2) / T.
// The row math is rlhf_fast/gather_logprobs_math.h, the header the CPU kernels use.
//
// The tile is fp32 (rows, cols) contiguous raw logits of vocabulary columns [c0, c0 + cols);
// per-row arrays (labels, m, s, t, z_label, lse, g_lp, g_ent, entropy) are device pointers offset
// to the tile's first row; only rows that take part are in a tile. An out-of-range label is never
// picked, so it reads nothing out of bounds. The cost of both passes is in csrc/cuda/linear_logprobs.cu.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <rlhf_fast/cuda_row_stats.cuh>
#include <rlhf_fast/gather_logprobs_math.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace rlhf_fast::cuda {

using logprobs::RowStats;

// Fold: 256-thread blocks; one warp per row (8 rows per block) for rows of at most kWarpRowCols
// columns -- the default tiles of N >= 4096 rows have 1024 -- and the whole block per row above.
constexpr int kFoldThreads = 256;
constexpr int64_t kWarpRowCols = 2048;
// Grad: 256 threads x kGradItems elements of one row per block; blockIdx.y walks the rows.
constexpr int kGradThreads = 256;
constexpr int kGradItems = 4;
constexpr int kMaxGridY = 65535;
// Elements a thread loads before folding any (memory-level parallelism on the fp32 tile).
constexpr int kFoldLoads = 4;

// tanh accurate to a few fp32 ulps. --use_fast_math does not touch tanhf, but an approximate
// tanh (tanh.approx.f32, 2^-11 relative) would move capped logits by up to c * 5e-4, so this is
// spelled out: |x| >= 0.25: (1 - e) / (1 + e), e = exp(-2|x|) (1 - e loses at most ~2 bits);
// |x| < 0.25: the odd Taylor series to x^11 (truncation < 1e-8 relative). The Triton kernels use
// the same formula (kernels/linear_logprobs.py).
__device__ __forceinline__ float accurate_tanh(float x) {
  const float ax = fabsf(x);
  float r;
  if (ax < 0.25f) {
    const float x2 = x * x;
    float p = -1382.f / 155925.f;
    p = fmaf(x2, p, 62.f / 2835.f);
    p = fmaf(x2, p, -17.f / 315.f);
    p = fmaf(x2, p, 2.f / 15.f);
    p = fmaf(x2, p, -1.f / 3.f);
    r = fmaf(ax * x2, p, ax);
  } else {
    const float e = expf(-2.f * ax);  // __expf under --use_fast_math: ~2 ulp, fine here
    r = __fdividef(1.f - e, 1.f + e);
  }
  return copysignf(r, x);
}

// ---------------------------------------------------------------------------------------------
// Fold: tile (rows, cols) fp32 raw logits of vocabulary columns [c0, c0 + cols). For each row i,
// merges the statistics of its capped, scaled logits into (m[i], s[i], t[i]) and, when the label
// lies in this chunk, stores its z in z_label[i]. kThreadsPerRow: kWarp or kFoldThreads.
template <bool kSoftcap, int kThreadsPerRow>
__global__ void __launch_bounds__(kFoldThreads)
    linear_fold_tile_kernel(const float* __restrict__ tile, int64_t rows, int64_t cols,
                            const int64_t* __restrict__ labels, int64_t c0, float softcap, float inv_softcap,
                            float inv_temp, float* __restrict__ m, float* __restrict__ s, float* __restrict__ t,
                            float* __restrict__ z_label) {
  static_assert(kThreadsPerRow == kWarp || kThreadsPerRow == kFoldThreads, "warp or block per row");
  constexpr int kRowsPerBlock = kFoldThreads / kThreadsPerRow;
  constexpr int kWarps = kFoldThreads / kWarp;
  __shared__ RowStats warp_stats[kThreadsPerRow > kWarp ? kWarps : 1];
  const int lane = int(threadIdx.x) % kThreadsPerRow;
  const int64_t row_step = int64_t(gridDim.x) * kRowsPerBlock;
  // Uniform trip counts per row group (per block when a block owns a row): the __syncthreads
  // below are reached by every thread.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + int(threadIdx.x) / kThreadsPerRow; row < rows;
       row += row_step) {
    const float* x = tile + row * cols;
    auto scaled = [&](float raw) {
      if constexpr (kSoftcap) raw = softcap * accurate_tanh(raw * inv_softcap);
      return raw * inv_temp;
    };
    RowStats st = logprobs::empty_stats();
    for (int64_t j0 = lane; j0 < cols; j0 += int64_t(kFoldLoads) * kThreadsPerRow) {
      float v[kFoldLoads];
#pragma unroll
      for (int u = 0; u < kFoldLoads; ++u) {  // coalesced: a warp reads 128 contiguous bytes per u
        const int64_t j = j0 + int64_t(u) * kThreadsPerRow;
        v[u] = j < cols ? x[j] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kFoldLoads; ++u) {
        // push skips z == -inf (no mass). A -inf raw logit stays -inf without a cap and becomes
        // -c / T with one, as in the reference (c * tanh(-inf) = -c).
        if (j0 + int64_t(u) * kThreadsPerRow < cols) logprobs::push(st, scaled(v[u]));
      }
    }
    st = warp_merge(st);
    if constexpr (kThreadsPerRow > kWarp) {
      const int warp = int(threadIdx.x) / kWarp, wlane = int(threadIdx.x) % kWarp;
      if (wlane == 0) warp_stats[warp] = st;
      __syncthreads();
      if (warp == 0) st = warp_merge(wlane < kWarps ? warp_stats[wlane] : logprobs::empty_stats());
      __syncthreads();  // warp_stats is rewritten by the next row
    }
    if (lane == 0) {
      const RowStats cur = logprobs::merge(RowStats{m[row], s[row], t[row]}, st);
      m[row] = cur.m;
      s[row] = cur.s;
      t[row] = cur.t;
      const int64_t y = labels[row] - c0;
      if (y >= 0 && y < cols) z_label[row] = scaled(x[y]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Grad: tile (rows, cols) fp32 raw logits -> dL/dlogits in place, for rows that all have a
// gradient (label kept, lse finite). g_ent / entropy are read only when kEntropy.
template <bool kSoftcap, bool kEntropy>
__global__ void __launch_bounds__(kGradThreads)
    linear_grad_tile_kernel(float* __restrict__ tile, int64_t rows, int64_t cols, const int64_t* __restrict__ labels,
                            int64_t c0, float softcap, float inv_softcap, float inv_temp,
                            const float* __restrict__ lse, const float* __restrict__ g_lp,
                            const float* __restrict__ g_ent, const float* __restrict__ entropy) {
  using logprobs::ScalarOps;
  const int64_t j0 = int64_t(blockIdx.x) * (kGradThreads * kGradItems) + threadIdx.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    float* x = tile + row * cols;
    const int64_t y = labels[row] - c0;  // the label's column in this chunk, if in [0, cols)
    const float row_lse = lse[row], g = g_lp[row];
    const float ge = kEntropy ? g_ent[row] : 0.f, h = kEntropy ? entropy[row] : 0.f;
    float v[kGradItems];
#pragma unroll
    for (int u = 0; u < kGradItems; ++u) {
      const int64_t j = j0 + int64_t(u) * kGradThreads;
      v[u] = j < cols ? x[j] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kGradItems; ++u) {
      const int64_t j = j0 + int64_t(u) * kGradThreads;
      if (j >= cols) continue;
      float raw = v[u], chain = inv_temp;
      if constexpr (kSoftcap) {
        const float th = accurate_tanh(raw * inv_softcap);
        raw = softcap * th;
        chain *= 1.f - th * th;
      }
      float dz = logprobs::grad_logit<ScalarOps>(raw * inv_temp, row_lse, g, ge, h, kEntropy);
      if (j == y) dz += g;  // the label's own term
      x[j] = dz * chain;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The Tiles policy of rlhf_fast::linear::forward / backward.

inline unsigned blocks_for(int64_t work, int64_t per_block) {
  return unsigned(std::min<int64_t>(std::max<int64_t>((work + per_block - 1) / per_block, 1), INT_MAX));
}

struct CudaTiles {
  static void matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta) {
    at::Tensor o = out;
    if (beta == 0.0f) {
      at::mm_out(o, a, b);
    } else {
      o.addmm_(a, b, beta, 1.0);
    }
  }
  static void fold(at::Tensor& tile, const int64_t* labels, int64_t c0, float softcap, float inv_temp, float* m,
                   float* s, float* t, float* z_label, bool /*with_entropy: t costs one FMA, always kept*/) {
    const int64_t rows = tile.size(0), cols = tile.size(1);
    const float* x = tile.const_data_ptr<float>();
    const float inv_softcap = softcap > 0.f ? 1.f / softcap : 0.f;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    auto launch = [&](auto softcap_tag) {
      constexpr bool kCap = decltype(softcap_tag)::value;
      if (cols <= kWarpRowCols) {
        linear_fold_tile_kernel<kCap, kWarp><<<blocks_for(rows, kFoldThreads / kWarp), kFoldThreads, 0, stream>>>(
            x, rows, cols, labels, c0, softcap, inv_softcap, inv_temp, m, s, t, z_label);
      } else {
        linear_fold_tile_kernel<kCap, kFoldThreads><<<blocks_for(rows, 1), kFoldThreads, 0, stream>>>(
            x, rows, cols, labels, c0, softcap, inv_softcap, inv_temp, m, s, t, z_label);
      }
    };
    if (softcap > 0.f) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void grad(at::Tensor& tile, const int64_t* labels, int64_t c0, float softcap, float inv_temp,
                   const float* lse, const float* g_lp, const float* g_ent, const float* entropy) {
    const int64_t rows = tile.size(0), cols = tile.size(1);
    float* x = tile.data_ptr<float>();
    const float inv_softcap = softcap > 0.f ? 1.f / softcap : 0.f;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(blocks_for(cols, int64_t(kGradThreads) * kGradItems),
                    unsigned(std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxGridY)));
    auto launch = [&](auto softcap_tag, auto entropy_tag) {
      constexpr bool kCap = decltype(softcap_tag)::value, kEnt = decltype(entropy_tag)::value;
      linear_grad_tile_kernel<kCap, kEnt><<<grid, kGradThreads, 0, stream>>>(
          x, rows, cols, labels, c0, softcap, inv_softcap, inv_temp, lse, g_lp, g_ent, entropy);
    };
    const bool with_entropy = g_ent != nullptr;
    if (softcap > 0.f) {
      if (with_entropy) launch(std::true_type{}, std::true_type{}); else launch(std::true_type{}, std::false_type{});
    } else {
      if (with_entropy) launch(std::false_type{}, std::true_type{}); else launch(std::false_type{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace rlhf_fast::cuda
