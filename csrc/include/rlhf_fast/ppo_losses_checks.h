// Host-side argument checks of the RL-loss entry points (rlhf_fast_C::kl_penalty_fwd, ppo_policy_loss_fwd,
// value_loss_fwd), shared by csrc/cpu/ppo_losses.cpp and csrc/cuda/ppo_losses.cu. The
// Python layer validates first with friendlier messages; these keep direct torch.ops calls safe.
// Failures are c10::ValueError (Python ValueError) naming the argument, expected and actual value.
#pragma once

#include <ATen/core/Tensor.h>

#include <rlhf_fast/checks.h>
#include <rlhf_fast/ppo_losses_math.h>

#include <optional>

namespace rlhf_fast {

inline bool is_float_dtype(at::ScalarType dt) { return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf; }

// A (B, T) input shaped like `like`, float32/bfloat16/float16 (or bool when allow_bool), on like's device.
inline void check_token_rows(const at::Tensor& t, const char* name, const at::Tensor& like, bool allow_bool = false) {
  RLHF_FAST_CHECK(t.dim() == 2, name, ": expected a 2-D (B, T) tensor, got ", t.dim(), " dims");
  RLHF_FAST_CHECK(t.sizes() == like.sizes(), name, ": expected shape ", like.sizes(), ", got ", t.sizes());
  const auto dt = t.scalar_type();
  RLHF_FAST_CHECK(is_float_dtype(dt) || (allow_bool && dt == at::kBool), name, ": expected float32, bfloat16 or float16",
                  allow_bool ? " (or bool)" : "", ", got ", dt);
  RLHF_FAST_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
}

inline void check_kl_penalty(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t estimator,
                             const std::optional<double>& clamp) {
  check_token_rows(logprobs, "logprobs", logprobs);
  check_token_rows(ref_logprobs, "ref_logprobs", logprobs);
  RLHF_FAST_CHECK(estimator >= ppo::kK1 && estimator <= ppo::kK3, "estimator: expected a code in [0, 3], got ",
                  estimator);
  RLHF_FAST_CHECK(!clamp.has_value() || *clamp > 0, "clamp: expected > 0 or None, got ", clamp.value_or(0));
}

// Arguments common to ppo_policy_loss_fwd and value_loss_fwd.
inline void check_aggregation_args(int64_t aggregation, const std::optional<at::Tensor>& num_items, int64_t norm_length,
                                   const at::Tensor& like) {
  RLHF_FAST_CHECK(aggregation >= ppo::kTokenMean && aggregation <= ppo::kSeqMeanTokenSumNorm,
                  "aggregation: expected a code in [0, 3], got ", aggregation);
  if (num_items.has_value()) {
    RLHF_FAST_CHECK(num_items->numel() == 1, "num_items: expected a 0-dim tensor, got shape ", num_items->sizes());
    RLHF_FAST_CHECK(num_items->device() == like.device(), "num_items: expected device ", like.device(), ", got ",
                    num_items->device());
  }
  RLHF_FAST_CHECK(norm_length == -1 || norm_length > 0, "norm_length: expected > 0 (or -1 for T), got ", norm_length);
}

// All arguments of ppo_policy_loss_fwd.
inline void check_policy_loss(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                              const at::Tensor& mask, double clip_eps_low, double clip_eps_high,
                              const std::optional<double>& dual_clip, int64_t aggregation,
                              const std::optional<at::Tensor>& num_items, int64_t norm_length) {
  check_token_rows(logprobs, "logprobs", logprobs);
  check_token_rows(old_logprobs, "old_logprobs", logprobs);
  check_token_rows(advantages, "advantages", logprobs);
  check_token_rows(mask, "mask", logprobs, /*allow_bool=*/true);
  RLHF_FAST_CHECK(clip_eps_low > 0 && clip_eps_high > 0, "clip_eps: expected > 0, got ", clip_eps_low, " and ",
                  clip_eps_high);
  RLHF_FAST_CHECK(!dual_clip.has_value() || *dual_clip > 1, "dual_clip: expected > 1, got ", dual_clip.value_or(0));
  check_aggregation_args(aggregation, num_items, norm_length, logprobs);
}

// All arguments of value_loss_fwd.
inline void check_value_loss(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                             const at::Tensor& mask, double clip_eps, int64_t aggregation,
                             const std::optional<at::Tensor>& num_items, int64_t norm_length) {
  check_token_rows(values, "values", values);
  check_token_rows(old_values, "old_values", values);
  check_token_rows(returns, "returns", values);
  check_token_rows(mask, "mask", values, /*allow_bool=*/true);
  RLHF_FAST_CHECK(clip_eps > 0, "clip_eps: expected > 0, got ", clip_eps);
  check_aggregation_args(aggregation, num_items, norm_length, values);
}

}  // namespace rlhf_fast
