// Stubs of the CPU kernels of the RL losses: kl_penalty, ppo_policy_loss, value_loss (one build per
// SIMD capability, see ../dispatch.h; the kernels are in ppo_losses_kernel.h, the host entry points
// and the finalize step in ../ppo_losses.cpp). There are no backward kernels: each forward writes the
// per-token derivative, and the backward is a PyTorch multiply (rlhf_fast/ops/_aggregation.py).
#pragma once

#include <ATen/core/Tensor.h>

#include "../dispatch.h"

namespace rlhf_fast::cpu {
// Columns per tile: the unit of parallel work and of the per-tile partial sums of the losses (the
// host allocates B * ceil(T / kPpoTile) tiles of partials and combines them in order).
constexpr int64_t kPpoTile = 4096;

// logprobs, ref_logprobs (R, C), any strides, any float dtype each; writes kl (R, C) fp32 contiguous
// and, when dkl is non-null, the derivative dk/dx (R, C) fp32 contiguous. estimator:
// rlhf_fast::ppo::Estimator; clamp (of x) <= 0: none; cap (of the value) <= 0: none.
using KlPenaltyFwdFn = void (*)(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t estimator,
                                float clamp, float cap, at::Tensor& kl, at::Tensor* dkl);
// The per-token pass of ppo_policy_loss over (B, T) inputs (unit stride along T, any float dtype
// each; mask bool or float), cut into tiles of `tile` columns of one row: writes kPolicyPartials
// floats per tile to `partials` (tile-major, row by row) and, when token_grad is non-null, the
// unweighted per-token gradient m * dl/dlogprobs to token_grad (B, T) fp32 contiguous.
// log_ratio_clamp <= 0: none; cispo: the CISPO objective (ppo::policy_token).
using PpoPolicyPartialsFn = void (*)(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                     const at::Tensor& advantages, const at::Tensor& mask, float ratio_low,
                                     float ratio_high, float dual_clip, float log_ratio_clamp, bool cispo, int64_t tile,
                                     float* partials, float* token_grad);
// The same for value_loss: kValuePartials floats per tile, token_grad = m * dl/dvalues.
using ValuePartialsFn = void (*)(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                                 const at::Tensor& mask, float clip_eps, int64_t tile, float* partials,
                                 float* token_grad);
}  // namespace rlhf_fast::cpu

RLHF_FAST_CPU_STUB(kl_penalty_fwd, KlPenaltyFwdFn)
RLHF_FAST_CPU_STUB(ppo_policy_partials, PpoPolicyPartialsFn)
RLHF_FAST_CPU_STUB(value_partials, ValuePartialsFn)
