// The CPU `Tiles` policy of the tiled lm_head ops (rlhf_fast/linear_logprobs_tiled.h and
// rlhf_fast/linear_ppo_loss_tiled.h): gemm.h's matmul_into (oneDNN, or ATen's BLAS) and the SIMD
// fold / grad tile kernels of csrc/cpu/kernels/linear_logprobs.h. linear_ppo_loss's policy extends it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "gemm.h"
#include "kernels/linear_logprobs.h"

namespace rlhf_fast::cpu {

struct CpuTiles {
  static void matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta) {
    matmul_into(out, a, b, beta);
  }
  static void fold(at::Tensor& tile, const int64_t* labels, int64_t c0, float softcap, float inv_temp, float* m,
                   float* s, float* t, float* z_label, bool with_entropy) {
    linear_fold_tile_stub()()(tile, labels, c0, softcap, inv_temp, m, s, t, z_label, with_entropy);
  }
  static void grad(at::Tensor& tile, const int64_t* labels, int64_t c0, float softcap, float inv_temp,
                   const float* lse, const float* g_lp, const float* g_ent, const float* entropy) {
    linear_grad_tile_stub()()(tile, labels, c0, softcap, inv_temp, lse, g_lp, g_ent, entropy);
  }
};

}  // namespace rlhf_fast::cpu
