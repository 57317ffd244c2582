// Stubs of the ranking_loss CPU kernels (one build per SIMD capability, see ../dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../dispatch.h"

namespace rlhf_fast::cpu {
// Where the forward found an argument value out of range: the first bad flat index of num_candidates
// and of ranks, -1 when there is none.
struct RankingBadInput {
  int64_t num_candidates = -1;
  int64_t ranks = -1;
};

// rewards (P, K) contiguous; num_candidates (P,) int64, ranks (P, K) int64 and margins (P,) fp32 may be
// undefined. Writes loss, accuracy, mean_margin (0-dim fp32) and counts (2,) int64 = (pairs, ranked prompts).
using RankingLossFwdFn = RankingBadInput (*)(const at::Tensor& rewards, const at::Tensor& num_candidates,
                                             const at::Tensor& ranks, const at::Tensor& margins, float margin,
                                             at::Tensor& loss, at::Tensor& accuracy, at::Tensor& mean_margin,
                                             at::Tensor& counts);
// The gradient of the loss w.r.t. rewards for an upstream gradient `grad_loss`, given the forward's
// number of ranked prompts. Writes grad_rewards (P, K) contiguous, dtype of rewards.
using RankingLossBwdFn = void (*)(float grad_loss, const at::Tensor& rewards, const at::Tensor& num_candidates,
                                  const at::Tensor& ranks, const at::Tensor& margins, float margin,
                                  int64_t ranked_prompts, at::Tensor& grad_rewards);
}  // namespace rlhf_fast::cpu

RLHF_FAST_CPU_STUB(ranking_loss_fwd, RankingLossFwdFn)
RLHF_FAST_CPU_STUB(ranking_loss_bwd, RankingLossBwdFn)
