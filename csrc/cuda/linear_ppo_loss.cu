// CUDA backend of linear_ppo_loss: the fused RL head. Each token's log-prob and entropy straight from
// the lm_head, its PPO-ptx loss terms (clipped-ratio policy loss, KL, entropy bonus, ptx NLL) and,
// because every token's loss is local, the gradients of hidden, weight and bias -- in the forward,
// without an (N, V) tensor.
//
// The algorithm is the host loop shared with the CPU backend (rlhf_fast/linear_ppo_loss_tiled.h):
// row blocks spanning the vocabulary; per vocabulary chunk a cuBLAS GEMM into the block's fp32
// logits buffer and the fold kernel; the per-row step; then per chunk the grad kernel (dL/dlogits in
// place) and two more GEMMs into grad_hidden and grad_weight -- 3 GEMMs per token. The GEMMs and the
// fold / grad tile kernels are linear_logprobs' CudaTiles (rlhf_fast/cuda_linear_tiles.cuh); this
// file adds the per-row step: one kernel per row block, linear_ppo_rows_kernel, that runs
// linear_ppo::row_step (the CPU's row math, rlhf_fast/ppo_losses_math.h) on every row of the block,
// writes lse / entropy / g_lp / g_h for the grad pass and adds the block's 13 statistics sums into
// a float64 vector on the device: no host sync per block, and the sums are read only by the caller.
//
// Shapes: hidden (R, H), weight (V, H), bias (V,) float32 / bfloat16 / float16, contiguous; labels
// (R,) int64 in [0, V) or ignore_index (checked on the host, one sync per call, as is the nonzero()
// that lists the kept rows); row_weight / old_logprobs / advantages / ref_logprobs (R,) fp32.
//
// Cost model, R = 8192 tokens, H = 4096, V = 128256 bf16 on an H100 (67 TFLOP/s fp32 SIMT, 3.35 TB/s,
// 50 MB L2), blocks of tile_rows = 130 rows (the Python layer's 64 MB logits block):
//   GEMMs     3 x 2 R V H = 25.8 TFLOP. The shared host algorithm widens bf16/fp16 weights to fp32 one
//             chunk at a time and calls fp32 at::mm / addmm_ (cuBLAS SGEMM, TF32 only if the user set
//             torch.backends.cuda.matmul.allow_tf32): ~400 ms at SGEMM rates. kChunk = 16384 columns
//             gives a block's GEMMs at least 128 output tiles of 128 x 128 (about one wave on 132
//             SMs); the widened chunk is (16384, H) fp32, 256 MB, as for linear_logprobs' widest tile.
//   grad_weight  every row block adds into the whole (V, H) fp32 accumulator: 2 x 2.1 GB of HBM per
//             block (63 blocks: ~80 ms at 3.35 TB/s); taller blocks amortize it.
//   fold / grad  4 + 8 bytes per logit: 12.6 GB, ~4 ms. The per-row kernel: ~60 bytes per row, nothing.
// The GEMMs set this backend's speed; 16-bit tensor-core GEMMs with fp32 output would cut them ~10x.
//
// Build and compile-only checks: as csrc/cuda/linear_logprobs.cu (tests/test_cuda_build.py compiles
// this file alone for sm_80 and sm_90 with `-Xptxas -v` and requires zero spills).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <rlhf_fast/cuda_linear_tiles.cuh>
#include <rlhf_fast/cuda_row_stats.cuh>
#include <rlhf_fast/linear_ppo_loss_tiled.h>

namespace rlhf_fast::cuda {
namespace {

using linear_ppo::kNumSums;

// One 256-thread block per row block: a row block holds tile_rows rows (130 at V = 128256, 512 at
// V = 32768 with the Python layer's 64 MB logits block), a few per thread, and a single block sums
// them in a fixed order -- deterministic, with no atomics and no second launch.
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / kWarp;

// The 13 sums of the 32 lanes, in every lane (fixed butterfly order).
__device__ __forceinline__ void warp_combine(double* acc) {
#pragma unroll
  for (int k = 0; k < kNumSums; ++k) {
#pragma unroll
    for (int mask = kWarp / 2; mask > 0; mask >>= 1) {
      acc[k] = linear_ppo::combine_sum(k, acc[k], __shfl_xor_sync(kFullMask, acc[k], mask));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-row step of one row block (linear_ppo::BlockRows: fold statistics and per-row inputs in,
// lse / entropy / g_lp / g_h out); sums (kNumSums,) float64 += the block's sums (min / max for the
// ratio). Launched with one block of kRowThreads threads.
template <int kEstimator>
__global__ void __launch_bounds__(kRowThreads)
    linear_ppo_rows_kernel(const linear_ppo::BlockRows block, const linear_ppo::RowParams params,
                           double* __restrict__ sums) {
  double acc[kNumSums];  // constant indices only: registers
  linear_ppo::init_sums(acc);
  for (int64_t i = threadIdx.x; i < block.rows; i += kRowThreads) {
    linear_ppo::row_step<kEstimator>(block, i, params, acc);
  }
  warp_combine(acc);
  __shared__ double warp_acc[kRowWarps][kNumSums];
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) warp_acc[warp][k] = acc[k];
  }
  __syncthreads();
  if (warp != 0) return;
  linear_ppo::init_sums(acc);
  if (lane < kRowWarps) {
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) acc[k] = warp_acc[lane][k];
  }
  warp_combine(acc);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) sums[k] = linear_ppo::combine_sum(k, sums[k], acc[k]);
  }
}

// ---------------------------------------------------------------------------------------------
// The Tiles policy of rlhf_fast::linear_ppo::forward: linear_logprobs' CudaTiles (matmul, fold, grad)
// plus the chunk width, the buffers and the per-row step.

struct CudaPpoTiles : CudaTiles {
  // Vocabulary rows per GEMM (see the cost model above).
  static constexpr int64_t kChunk = 16384;

  static at::Tensor empty_f32(at::IntArrayRef sizes, const at::Tensor& like) {
    return at::empty(sizes, like.options().dtype(at::kFloat));
  }
  static void rows(const linear_ppo::BlockRows& block, const linear_ppo::RowParams& params, int64_t kl_estimator,
                   double* sums) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    linear_ppo::with_estimator(kl_estimator, [&](auto estimator) {
      linear_ppo_rows_kernel<decltype(estimator)::value><<<1, kRowThreads, 0, stream>>>(block, params, sums);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry point (schema in csrc/cpu/linear_ppo_loss.cpp; same signature as the CPU one).

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ppo_loss_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& row_weight, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const std::optional<at::Tensor>& ref_logprobs, int64_t n_policy, double kl_coef, int64_t kl_estimator,
    double entropy_coef, double clip_low, double clip_high, double dual_clip, double temperature, int64_t ignore_index,
    bool compute_grad, int64_t tile_rows) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_ppo::forward<CudaPpoTiles>(hidden, weight, bias, labels, row_weight, old_logprobs, advantages,
                                           ref_logprobs, n_policy, kl_coef, kl_estimator, entropy_coef, clip_low,
                                           clip_high, dual_clip, temperature, ignore_index, compute_grad, tile_rows);
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) { m.impl("linear_ppo_loss_fwd", &linear_ppo_loss_fwd_cuda); }

}  // namespace rlhf_fast::cuda
