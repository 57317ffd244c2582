// CPU entry point of linear_ppo_loss: the fused RL head. One streaming pass over the lm_head gives
// each token's log-prob and entropy, its PPO-ptx loss terms and, because every token's loss is
// local, its gradient — in the forward, without materializing the logits.
//
// The host algorithm (row blocks spanning the vocabulary; per vocabulary chunk a GEMM into the
// block's logits buffer and a fold; the per-row loss step; per chunk the grad transform and two
// GEMMs into grad_hidden / grad_weight: 3 GEMMs per row) is rlhf_fast/linear_ppo_loss_tiled.h, shared
// with the CUDA backend (csrc/cuda/linear_ppo_loss.cu). This file supplies the CPU `Tiles` policy:
//   GEMMs     gemm.h's matmul_into (oneDNN, or ATen's BLAS); fp32 weights: one GEMM per pass over the
//             whole vocabulary (see chunk_cols), 16-bit weights: chunks of kChunk vocabulary rows,
//             widened to fp32 one at a time;
//   tiles     the SIMD fold / grad kernels of linear_logprobs (csrc/cpu/kernels/linear_logprobs.h);
//   buffers   the block's logits and the fp32 weight gradient in huge pages (hugepage_alloc.h);
//   rows      a scalar loop of linear_ppo::row_step over the block's rows, summed in float64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <rlhf_fast/linear_ppo_loss_tiled.h>

#include "hugepage_alloc.h"
#include "linear_tiles.h"

namespace rlhf_fast::cpu {
namespace {

// linear_logprobs' CpuTiles (matmul, fold, grad) plus the buffers and the per-row step.
struct CpuPpoTiles : CpuTiles {
  // Vocabulary rows per GEMM of 16-bit weights (the fp32 copy of a chunk: kChunk x H floats).
  static constexpr int64_t kChunk = 2048;

  // Vocabulary rows per GEMM. fp32 weights: all of them. Each GEMM, fold and grad step is an OpenMP
  // parallel region ending in a barrier: with 2048-row chunks a call at N=2048, V=65536 (256-row
  // blocks) ran 1280 of them, and on a shared CPU every region in which one thread is preempted
  // waits a scheduler time slice for it. Measured on 2 Zen 5 cores while other processes ran:
  // 9.6 s against composed linear_logprobs' 3.4 s (1.1 vs 1.4 s when idle). Whole-vocabulary steps
  // are 5 regions per block (2.1 s in the same busy spell), run at the same GEMM rate when the CPU
  // is idle (oneDNN: ~440 GFLOP/s for the logits at 512 x 65536 as at 512 x 2048) and take no more
  // memory (the block buffer is (rows, V) either way; same peak RSS).
  static int64_t chunk_cols(int64_t vocab, bool widen) { return widen ? kChunk : vocab; }

  static at::Tensor empty_f32(at::IntArrayRef sizes, const at::Tensor& /*like: CPU*/) {
    return empty_hugepage(sizes, at::kFloat);
  }
  static void rows(const linear_ppo::BlockRows& block, const linear_ppo::RowParams& params, int64_t kl_estimator,
                   double* sums) {
    linear_ppo::with_estimator(kl_estimator, [&](auto estimator) {
      for (int64_t i = 0; i < block.rows; ++i) linear_ppo::row_step<decltype(estimator)::value>(block, i, params, sums);
    });
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // hidden (R, H): policy rows [0, n_policy) then ptx rows; optional lm_head bias (V,); per-row fp32
  // weight (aggregation), old log-probs, advantages, optional reference log-probs. -> (loss (), sums
  // (13,) float64, grad_hidden (R, H) or (0,), grad_weight (V, H) or (0,), grad_bias (V,) or (0,)).
  // log_ratio_clamp: the clamp of logprob - old_logprobs before exp; kl_cap: the cap of the KL value (0: none,
  // kl_cap < 0: the estimator's default)
  m.def("linear_ppo_loss_clamped_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor row_weight, "
        "Tensor old_logprobs, Tensor advantages, Tensor? ref_logprobs, int n_policy, float kl_coef, int kl_estimator, "
        "float entropy_coef, float clip_low, float clip_high, float dual_clip, float temperature, int ignore_index, "
        "bool compute_grad, int tile_rows, float log_ratio_clamp, float kl_cap) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("linear_ppo_loss_clamped_fwd", &linear_ppo::forward<CpuPpoTiles>);
}

}  // namespace rlhf_fast::cpu
