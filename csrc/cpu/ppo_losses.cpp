// CPU entry points of the RL losses: kl_penalty, ppo_policy_loss, value_loss. Argument checks,
// allocation and the finalize step (per-tile partials -> loss, per-row weights, statistics) are
// here; the SIMD kernels are csrc/cpu/kernels/ppo_losses_kernel.h (chosen per CPU capability by
// csrc/cpu/dispatch.h), the per-token math rlhf_fast/ppo_losses_math.h.
//
// Numerical safety: kl_penalty_capped_fwd and ppo_policy_loss_clamped_fwd take the value cap of the
// KL estimate and the log-ratio clamp before exp as arguments (the Python layer passes the defaults of
// rlhf_fast/ppo_losses_math.h: log-ratio clamp 20, k3 capped at 10).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <rlhf_fast/ppo_losses_checks.h>
#include <rlhf_fast/ppo_losses_math.h>

#include "kernels/ppo_losses.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace rlhf_fast::cpu {

namespace {

float clamp_arg(const std::optional<double>& clamp) { return clamp.has_value() ? float(*clamp) : 0.f; }

// A cap or clamp argument: None (no cap), else a finite number > 0 (then as a float; 0 means none).
float positive_or_none(const std::optional<double>& value, const char* name) {
  RLHF_FAST_CHECK(!value.has_value() || (*value > 0 && std::isfinite(*value)), name,
                  ": expected a finite number > 0 or None, got ", value.value_or(0));
  return clamp_arg(value);
}

// num_items as a double, -1 when not given. A CPU tensor is read directly (no device sync involved).
double num_items_value(const std::optional<at::Tensor>& num_items, int64_t num_items_int) {
  if (num_items.has_value()) return num_items->item<double>();
  return num_items_int >= 0 ? double(num_items_int) : -1.0;
}

// Per-row loss sums and token counts -> the loss, and the weights w_b written to row_scale.
// (ppo::agg_divisor / ppo::row_weight; rows are combined in order, so the result is deterministic.)
float finalize_loss(int64_t aggregation, const std::vector<double>& row_loss, const std::vector<double>& row_tokens,
                    double num_items, double norm_length, float* row_scale) {
  const int64_t rows = int64_t(row_loss.size());
  double total_tokens = 0, rows_with_tokens = 0;
  for (int64_t b = 0; b < rows; ++b) {
    total_tokens += row_tokens[b];
    rows_with_tokens += row_tokens[b] > 0 ? 1 : 0;
  }
  const float divisor = float(ppo::agg_divisor(int(aggregation), total_tokens, rows_with_tokens, double(rows),
                                               num_items, norm_length));
  double loss = 0;
  for (int64_t b = 0; b < rows; ++b) {
    const float w = ppo::row_weight(int(aggregation), divisor, float(row_tokens[b]));
    row_scale[b] = w;
    loss += double(w) * row_loss[b];
  }
  return float(loss);
}

struct LossOutputs {
  at::Tensor loss, stats, token_grad, row_scale;
};

LossOutputs allocate(const at::Tensor& like, int64_t n_stats, bool need_grad) {
  const auto opts = like.options().dtype(at::kFloat);
  const int64_t rows = like.size(0), cols = like.size(1);
  return LossOutputs{at::empty({}, opts), at::empty({n_stats}, opts),
                     need_grad ? at::empty({rows, cols}, opts) : at::empty({0}, opts), at::empty({rows}, opts)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kl_penalty_capped_fwd_cpu(const at::Tensor& logprobs,
                                                             const at::Tensor& ref_logprobs, int64_t estimator,
                                                             std::optional<double> clamp, std::optional<double> cap,
                                                             bool need_grad) {
  check_kl_penalty(logprobs, ref_logprobs, estimator, clamp);
  const float cap_value = positive_or_none(cap, "cap");
  const auto opts = logprobs.options().dtype(at::kFloat);
  at::Tensor kl = at::empty(logprobs.sizes(), opts);
  at::Tensor dkl = need_grad ? at::empty(logprobs.sizes(), opts) : at::empty({0}, opts);
  if (kl.numel() == 0) return {kl, dkl};
  kl_penalty_fwd_stub()()(logprobs, ref_logprobs, estimator, clamp_arg(clamp), cap_value, kl,
                          need_grad ? &dkl : nullptr);
  return {kl, dkl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_clamped_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    double clip_eps_low, double clip_eps_high, std::optional<double> dual_clip, std::optional<double> log_ratio_clamp,
    int64_t aggregation, const std::optional<at::Tensor>& num_items, int64_t num_items_int, int64_t norm_length,
    bool need_grad, bool cispo) {
  TORCH_CHECK(!(cispo && dual_clip.has_value()), "dual_clip: not used with the cispo objective, expected None");
  check_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps_low, clip_eps_high, dual_clip, aggregation,
                    num_items, norm_length);
  const float clamp = positive_or_none(log_ratio_clamp, "log_ratio_clamp");

  const int64_t rows = logprobs.size(0), cols = logprobs.size(1);
  LossOutputs out = allocate(logprobs, ppo::kPolicyStats, need_grad);
  const int64_t per_row = cols > 0 ? (cols + kPpoTile - 1) / kPpoTile : 0;
  std::vector<float> partials(size_t(rows * per_row * ppo::kPolicyPartials));
  if (rows * per_row > 0) {
    // 1 - eps and 1 + eps rounded to fp32 the way the reference's ratio.clamp(1 - eps, 1 + eps) does
    ppo_policy_partials_stub()()(logprobs, old_logprobs, advantages, mask, float(1.0 - clip_eps_low),
                                 float(1.0 + clip_eps_high), dual_clip.has_value() ? float(*dual_clip) : 0.f, clamp,
                                 cispo, kPpoTile, partials.data(), need_grad ? out.token_grad.data_ptr<float>() : nullptr);
  }

  // Tiles -> rows (in order), and the statistics' totals.
  constexpr double kInf = std::numeric_limits<double>::infinity();
  double sums[ppo::kPolicyPartials] = {0, 0, 0, 0, 0, 0, kInf, -kInf};
  std::vector<double> row_loss(size_t(rows), 0.0), row_tokens(size_t(rows), 0.0);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t j = 0; j < per_row; ++j) {
      const float* p = partials.data() + (b * per_row + j) * ppo::kPolicyPartials;
      row_loss[b] += p[ppo::kPolLoss];
      row_tokens[b] += p[ppo::kPolCount];
      for (int k = ppo::kPolCount; k < ppo::kPolRatioMin; ++k) sums[k] += p[k];
      sums[ppo::kPolRatioMin] = std::min(sums[ppo::kPolRatioMin], double(p[ppo::kPolRatioMin]));
      sums[ppo::kPolRatioMax] = std::max(sums[ppo::kPolRatioMax], double(p[ppo::kPolRatioMax]));
    }
  }
  const double norm = norm_length > 0 ? double(norm_length) : double(cols);
  out.loss.data_ptr<float>()[0] = finalize_loss(aggregation, row_loss, row_tokens,
                                                num_items_value(num_items, num_items_int), norm,
                                                out.row_scale.data_ptr<float>());
  ppo::policy_stats(sums[ppo::kPolCount], sums[ppo::kPolClipped], sums[ppo::kPolDual], sums[ppo::kPolK3],
                    sums[ppo::kPolRatio], sums[ppo::kPolRatioMin], sums[ppo::kPolRatioMax], out.stats.data_ptr<float>());
  return {out.loss, out.stats, out.token_grad, out.row_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_fwd_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    double clip_eps, int64_t aggregation, const std::optional<at::Tensor>& num_items, int64_t num_items_int,
    int64_t norm_length, bool need_grad) {
  check_value_loss(values, old_values, returns, mask, clip_eps, aggregation, num_items, norm_length);

  const int64_t rows = values.size(0), cols = values.size(1);
  LossOutputs out = allocate(values, ppo::kValueStats, need_grad);
  const int64_t per_row = cols > 0 ? (cols + kPpoTile - 1) / kPpoTile : 0;
  std::vector<float> partials(size_t(rows * per_row * ppo::kValuePartials));
  if (rows * per_row > 0) {
    value_partials_stub()()(values, old_values, returns, mask, float(clip_eps), kPpoTile, partials.data(),
                            need_grad ? out.token_grad.data_ptr<float>() : nullptr);
  }

  double clipped = 0;
  ppo::Moments ret{0, 0, 0}, err{0, 0, 0};
  std::vector<double> row_loss(size_t(rows), 0.0), row_tokens(size_t(rows), 0.0);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t j = 0; j < per_row; ++j) {
      const float* p = partials.data() + (b * per_row + j) * ppo::kValuePartials;
      row_loss[b] += p[ppo::kValLoss];
      row_tokens[b] += p[ppo::kValCount];
      clipped += p[ppo::kValClipped];
      ret = ppo::merge_moments(ret, ppo::Moments{p[ppo::kValCount], p[ppo::kValRetMean], p[ppo::kValRetM2]});
      err = ppo::merge_moments(err, ppo::Moments{p[ppo::kValCount], p[ppo::kValErrMean], p[ppo::kValErrM2]});
    }
  }
  const double norm = norm_length > 0 ? double(norm_length) : double(cols);
  out.loss.data_ptr<float>()[0] = finalize_loss(aggregation, row_loss, row_tokens,
                                                num_items_value(num_items, num_items_int), norm,
                                                out.row_scale.data_ptr<float>());
  ppo::value_stats(clipped, ret, err, out.stats.data_ptr<float>());
  return {out.loss, out.stats, out.token_grad, out.row_scale};
}

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // logprobs, ref_logprobs (R, C) -> (kl (R, C) fp32, dk/dx (R, C) fp32 or (0,) without need_grad);
  // estimator 0..3 = k1, abs, k2, k3
  // cap: the cap of the value (None: no cap)
  m.def("kl_penalty_capped_fwd(Tensor logprobs, Tensor ref_logprobs, int estimator, float? clamp, float? cap, "
        "bool need_grad) -> (Tensor, Tensor)");
  // (B, T) inputs -> (loss () fp32, stats (6,) fp32, token_grad (B, T) fp32 or (0,), row_scale (B,) fp32);
  // aggregation 0..3 as AGGREGATIONS; num_items tensor, else num_items_int (-1: none); norm_length -1: T;
  // log_ratio_clamp: the clamp of logprobs - old_logprobs before exp (None: none); cispo: the CISPO objective
  m.def("ppo_policy_loss_clamped_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "float clip_eps_low, float clip_eps_high, float? dual_clip, float? log_ratio_clamp, int aggregation, "
        "Tensor? num_items, int num_items_int, int norm_length, bool need_grad, bool cispo=False) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // the same for value_loss, stats (2,)
  m.def("value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip_eps, "
        "int aggregation, Tensor? num_items, int num_items_int, int norm_length, bool need_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("kl_penalty_capped_fwd", &kl_penalty_capped_fwd_cpu);
  m.impl("ppo_policy_loss_clamped_fwd", &ppo_policy_loss_clamped_fwd_cpu);
  m.impl("value_loss_fwd", &value_loss_fwd_cpu);
}

}  // namespace rlhf_fast::cpu
