// CPU entry point of linear_ppo_loss: the fused RL head. One streaming pass over the lm_head gives
// each token's log-prob and entropy, its PPO-ptx loss terms and, because every token's loss is
// local, its gradient — in the forward, without materializing the logits.
//
// Rows are processed in blocks that span the whole vocabulary: a block's logits (rows x V fp32,
// at most `tile_rows` rows) are computed and folded (online logsumexp, entropy, label logit) one
// vocabulary chunk of kChunk rows of the weight at a time, and — the block's log-probs being final
// — turned into dL/dlogits in place and contracted into grad_hidden and grad_weight by two more
// GEMMs per chunk. 3 GEMMs per row instead of the 4 of linear_logprobs' forward + backward (which
// must recompute the logits because its upstream gradient is unknown in the forward), with the same
// bounded memory. Each chunk of the block's logits is its own contiguous (rows, kChunk) matrix, so
// every GEMM has operands of a few MB (a whole-vocabulary GEMM would have oneDNN pack the entire
// weight per call); 16-bit weights are widened to fp32 one chunk at a time.
//
// Per token (rlhf_fast/ppo_losses_math.h), valid policy rows with weight w (the aggregation):
//   loss += w * (l_pol + kl_coef * kl - entropy_coef * H),  dL/dlogprob = w * (dl_pol + kl_coef * dkl),
//   dL/dH = -w * entropy_coef;  ptx rows: loss += w * (-logprob),  dL/dlogprob = -w.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <rlhf_fast/checks.h>
#include <rlhf_fast/gather_logprobs_math.h>
#include <rlhf_fast/ppo_losses_math.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gemm.h"
#include "hugepage_alloc.h"
#include "kernels/linear_logprobs.h"

namespace rlhf_fast::cpu {
namespace {

// Vocabulary rows per GEMM.
constexpr int64_t kChunk = 2048;

// Sums returned to Python (float64), in this order.
enum Sum : int {
  kLoss = 0, kCount, kClipped, kDual, kK3, kRatio, kRatioMin, kRatioMax, kPolicyLoss, kKl, kEntropy,
  kPtxNll, kPtxCount, kNumSums
};

template <int kEstimator>
void kl_of(float x, float& kl, float& dkl) {
  ppo::kl_token<ppo::ScalarOps, kEstimator>(x, 0.f, kl, dkl);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ppo_loss_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& row_weight,
    const at::Tensor& old_logprobs, const at::Tensor& advantages, const std::optional<at::Tensor>& ref_logprobs,
    int64_t n_policy, double kl_coef, int64_t kl_estimator, double entropy_coef, double clip_low, double clip_high,
    double dual_clip, double temperature, int64_t ignore_index, bool compute_grad, int64_t tile_rows) {
  RLHF_FAST_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden: expected a contiguous (R, H) tensor");
  RLHF_FAST_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == hidden.size(1),
                  "weight: expected a contiguous (V, H) tensor with H = ", hidden.size(1), ", got ", weight.sizes());
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  RLHF_FAST_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == vocab && bias->device() == weight.device()),
                  "bias: expected a (", vocab, ",) tensor on the weight's device");
  check_vector(labels, "labels", rows, at::kLong, hidden);
  for (const auto* t : {&row_weight, &old_logprobs, &advantages}) check_vector(*t, "per-token input", rows, at::kFloat, hidden);
  const bool has_ref = ref_logprobs.has_value() && ref_logprobs->defined();
  if (has_ref) check_vector(*ref_logprobs, "ref_logprobs", rows, at::kFloat, hidden);
  RLHF_FAST_CHECK(kl_estimator >= 0 && kl_estimator <= 3, "kl_estimator: bad code ", kl_estimator);
  RLHF_FAST_CHECK(temperature > 0 && tile_rows >= 1, "temperature / tile_rows: expected > 0");
  const at::Tensor bad = (labels != ignore_index).logical_and_((labels < 0).logical_or_(labels >= vocab));
  RLHF_FAST_CHECK(!bad.any().item<bool>(), "labels: expected values in [0, ", vocab, ") or ignore_index=",
                  ignore_index, " at every valid position");

  const auto f32 = hidden.options().dtype(at::kFloat);
  std::vector<double> sums(kNumSums, 0.0);
  sums[kRatioMin] = std::numeric_limits<double>::infinity();
  sums[kRatioMax] = -std::numeric_limits<double>::infinity();
  at::Tensor grad_hidden = compute_grad ? at::zeros_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor gw32 = compute_grad ? empty_hugepage({vocab, weight.size(1)}, at::kFloat).zero_() : at::Tensor();
  at::Tensor gb32 = compute_grad && has_bias ? at::zeros({vocab}, f32) : at::Tensor();

  const at::Tensor keep = (labels != ignore_index).logical_and_(row_weight != 0);
  const at::Tensor idx = keep.nonzero().squeeze(1);
  const int64_t na = idx.size(0);
  if (na > 0) {
    const at::Tensor h32 = hidden.index_select(0, idx).to(at::kFloat).contiguous();
    const bool widen = weight.scalar_type() != at::kFloat;
    const int64_t chunk = std::min(kChunk, vocab);
    at::Tensor wbuf = widen ? at::empty({chunk, weight.size(1)}, f32) : at::Tensor();
    // fp32 rows [c0, c0 + vc) of the weight
    auto weight_chunk = [&](int64_t c0, int64_t vc) {
      const at::Tensor w_c = weight.narrow(0, c0, vc);
      return widen ? wbuf.narrow(0, 0, vc).copy_(w_c) : w_c;
    };
    const at::Tensor b32 = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const at::Tensor y = labels.index_select(0, idx).contiguous();
    const at::Tensor idx_c = idx.contiguous();
    const at::Tensor wt = row_weight.index_select(0, idx).contiguous();
    const at::Tensor old = old_logprobs.index_select(0, idx).contiguous();
    const at::Tensor adv = advantages.index_select(0, idx).contiguous();
    const at::Tensor ref = has_ref ? ref_logprobs->index_select(0, idx).contiguous() : at::Tensor();
    const int64_t block = std::min(tile_rows, na);
    at::Tensor buffer = empty_hugepage({block * vocab}, at::kFloat);
    at::Tensor m = at::empty({block}, f32), s = at::empty({block}, f32), t = at::empty({block}, f32);
    at::Tensor zl = at::empty({block}, f32), lse = at::empty({block}, f32), ent = at::empty({block}, f32);
    at::Tensor g_lp = at::empty({block}, f32), g_h = at::empty({block}, f32);
    at::Tensor gh32 = compute_grad ? at::zeros({na, hidden.size(1)}, f32) : at::Tensor();
    const float inv_temp = float(1.0 / temperature);
    const float lo = float(1.0 - clip_low), hi = float(1.0 + clip_high), dual_c = float(dual_clip);
    using KlFn = void (*)(float, float&, float&);
    const KlFn kl_fn = kl_estimator == 0 ? &kl_of<0> : kl_estimator == 1 ? &kl_of<1> : kl_estimator == 2 ? &kl_of<2>
                                                                                                      : &kl_of<3>;
    for (int64_t r0 = 0; r0 < na; r0 += block) {
      const int64_t nr = std::min(block, na - r0);
      const at::Tensor hr = h32.narrow(0, r0, nr);
      // chunk c0 of the block's logits: a contiguous (nr, vc) matrix at buffer offset nr * c0
      auto tile_of = [&](int64_t c0, int64_t vc) { return buffer.narrow(0, nr * c0, nr * vc).view({nr, vc}); };
      m.fill_(-std::numeric_limits<float>::infinity());
      s.zero_();
      t.zero_();
      for (int64_t c0 = 0; c0 < vocab; c0 += chunk) {
        const int64_t vc = std::min(chunk, vocab - c0);
        at::Tensor tile = tile_of(c0, vc);
        if (has_bias) tile.copy_(b32.narrow(0, c0, vc).unsqueeze(0).expand_as(tile));
        matmul_into(tile, hr, weight_chunk(c0, vc).t(), has_bias ? 1.0f : 0.0f);
        linear_fold_tile_stub()()(tile, y.const_data_ptr<int64_t>() + r0, c0, 0.f, inv_temp, m.data_ptr<float>(),
                                  s.data_ptr<float>(), t.data_ptr<float>(), zl.data_ptr<float>(), true);
      }
      const int64_t* rows_idx = idx_c.const_data_ptr<int64_t>() + r0;
      for (int64_t i = 0; i < nr; ++i) {
        const logprobs::RowStats st{m.data_ptr<float>()[i], s.data_ptr<float>()[i], t.data_ptr<float>()[i]};
        const float row_lse = logprobs::row_lse(st), h = logprobs::row_entropy(st);
        const float lp = logprobs::label_logprob(zl.data_ptr<float>()[i], row_lse);
        lse.data_ptr<float>()[i] = row_lse;
        ent.data_ptr<float>()[i] = h;
        const float w = wt.const_data_ptr<float>()[r0 + i];
        if (rows_idx[i] < n_policy) {
          const auto tok = ppo::policy_token<ppo::ScalarOps>(lp, old.const_data_ptr<float>()[r0 + i],
                                                             adv.const_data_ptr<float>()[r0 + i], lo, hi, dual_c);
          float kl = 0.f, dkl = 0.f;
          if (has_ref) kl_fn(lp - ref.const_data_ptr<float>()[r0 + i], kl, dkl);
          sums[kLoss] += double(w) * (tok.loss + kl_coef * kl - entropy_coef * h);
          sums[kPolicyLoss] += double(w) * tok.loss;
          sums[kCount] += 1;
          sums[kClipped] += tok.clipped;
          sums[kDual] += tok.dual;
          sums[kK3] += tok.k3;
          sums[kRatio] += tok.ratio;
          sums[kRatioMin] = std::min(sums[kRatioMin], double(tok.ratio));
          sums[kRatioMax] = std::max(sums[kRatioMax], double(tok.ratio));
          sums[kKl] += kl;
          sums[kEntropy] += h;
          g_lp.data_ptr<float>()[i] = w * (tok.grad + float(kl_coef) * dkl);
          g_h.data_ptr<float>()[i] = -w * float(entropy_coef);
        } else {
          sums[kLoss] += double(w) * -lp;
          sums[kPtxNll] += -lp;
          sums[kPtxCount] += 1;
          g_lp.data_ptr<float>()[i] = -w;
          g_h.data_ptr<float>()[i] = 0.f;
        }
      }
      if (!compute_grad) continue;
      for (int64_t c0 = 0; c0 < vocab; c0 += chunk) {
        const int64_t vc = std::min(chunk, vocab - c0);
        at::Tensor tile = tile_of(c0, vc);
        linear_grad_tile_stub()()(tile, y.const_data_ptr<int64_t>() + r0, c0, 0.f, inv_temp, lse.data_ptr<float>(),
                                  g_lp.data_ptr<float>(), g_h.data_ptr<float>(), ent.data_ptr<float>());
        matmul_into(gh32.narrow(0, r0, nr), tile, weight_chunk(c0, vc), 1.0f);  // (nr, vc) @ (vc, H)
        matmul_into(gw32.narrow(0, c0, vc), tile.t(), hr, 1.0f);                // (vc, nr) @ (nr, H)
        if (has_bias) gb32.narrow(0, c0, vc).add_(tile.sum(0));
      }
    }
    if (compute_grad) grad_hidden.index_copy_(0, idx, gh32.to(hidden.scalar_type()));
  }
  if (sums[kCount] == 0) sums[kRatioMin] = sums[kRatioMax] = 0;
  at::Tensor loss = at::scalar_tensor(sums[kLoss], f32);
  at::Tensor stats = at::tensor(sums, at::TensorOptions().dtype(at::kDouble));
  at::Tensor grad_weight = compute_grad ? gw32.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor grad_bias = gb32.defined() ? gb32.to(bias->scalar_type()) : at::empty({0}, weight.options());
  return {loss, stats, grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // hidden (R, H): policy rows [0, n_policy) then ptx rows; optional lm_head bias (V,); per-row fp32
  // weight (aggregation), old log-probs, advantages, optional reference log-probs. -> (loss (), sums
  // (13,) float64, grad_hidden (R, H) or (0,), grad_weight (V, H) or (0,), grad_bias (V,) or (0,)).
  m.def("linear_ppo_loss_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor row_weight, Tensor old_logprobs, "
        "Tensor advantages, Tensor? ref_logprobs, int n_policy, float kl_coef, int kl_estimator, float entropy_coef, "
        "float clip_low, float clip_high, float dual_clip, float temperature, int ignore_index, bool compute_grad, "
        "int tile_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) { m.impl("linear_ppo_loss_fwd", &linear_ppo_loss_fwd_cpu); }

}  // namespace rlhf_fast::cpu
