// The host algorithm of linear_ppo_loss (the fused RL head), shared by the CPU and CUDA backends.
// One streaming pass over the lm_head gives each token's log-prob and entropy, its PPO-ptx loss
// terms and, because every token's loss is local, its gradient -- in the forward, without
// materializing the (N, V) logits.
//
// Rows are processed in blocks that span the whole vocabulary: a block's logits (rows x V fp32, at
// most `tile_rows` rows) are computed and folded (online logsumexp, entropy, label logit) one
// vocabulary chunk of the weight at a time (chunk_cols below: on CPU the whole vocabulary for fp32),
// and -- the block's log-probs being final -- turned into dL/dlogits in place and contracted into
// grad_hidden and grad_weight by two more GEMMs per chunk. 3 GEMMs per row instead of the 4 of
// linear_logprobs' forward + backward (which must recompute the logits because its upstream gradient
// is unknown in the forward), with the same bounded memory. Each chunk of the block's logits is its own contiguous (rows, chunk)
// matrix; 16-bit weights are widened to fp32 one chunk at a time.
//
// The device supplies a `Tiles` policy: linear_logprobs' three hooks (rlhf_fast/linear_logprobs_tiled.h)
//   Tiles::matmul(out, a, b, beta)   out = beta * out + a @ b
//   Tiles::fold(...)  Tiles::grad(...)   the two passes over a logits tile
// and
//   Tiles::kChunk                    vocabulary rows per GEMM, or, where the policy has it,
//   Tiles::chunk_cols(vocab, widen)  the vocabulary rows per GEMM for this call (widen: 16-bit weights,
//                                    widened to fp32 one chunk at a time)
//   Tiles::empty_f32(sizes, like)    an uninitialised fp32 buffer on like's device (the logits block
//                                    and the fp32 weight gradient: huge pages on CPU)
//   Tiles::rows(block, params, kl_estimator, sums)
//                                    the per-row step of one block: row_step below for each of its
//                                    rows, accumulated into sums (float64 (kNumSums,) on the tile's
//                                    device) -- a scalar loop on CPU, one small kernel on CUDA.
//
// Per token (rlhf_fast/ppo_losses_math.h), valid policy rows with weight w (the aggregation):
//   loss += w * (l_pol + kl_coef * kl - entropy_coef * H),  dL/dlogprob = w * (dl_pol + kl_coef * dkl),
//   dL/dH = -w * entropy_coef;  ptx rows: loss += w * (-logprob),  dL/dlogprob = -w.
// Only rows whose label is kept and whose weight is non-zero take part.
#pragma once

#include <ATen/ATen.h>

#include <rlhf_fast/checks.h>
#include <rlhf_fast/gather_logprobs_math.h>
#include <rlhf_fast/host_device.h>
#include <rlhf_fast/linear_logprobs_tiled.h>
#include <rlhf_fast/ppo_losses_math.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace rlhf_fast::linear_ppo {

// Sums returned to Python (float64), in this order (SUMS in rlhf_fast/ops/linear_ppo_loss.py).
enum Sum : int {
  kLoss = 0, kCount, kClipped, kDual, kK3, kRatio, kRatioMin, kRatioMax, kPolicyLoss, kKl, kEntropy,
  kPtxNll, kPtxCount, kNumSums
};

// Per-call constants of the per-row step.
struct RowParams {
  int64_t n_policy;     // rows with an original index below it are policy rows, the rest ptx rows
  double kl_coef;
  double entropy_coef;
  float lo, hi;         // 1 - clip_low, 1 + clip_high
  float dual_c;         // <= 0: no dual clip
  bool has_ref;         // the KL term is computed only with reference log-probs
  float log_ratio_clamp = ppo::kDefaultLogRatioClamp;  // of logprob - old before exp; <= 0: none
  float kl_cap = 0.f;   // cap of the KL value; <= 0: none
};

// One row block's per-row arrays: pointers on the tile's device, offset to the block's first row.
struct BlockRows {
  int64_t rows;
  const int64_t* index;   // original row index (policy rows: < n_policy)
  const float* m;         // fold statistics (rlhf_fast/gather_logprobs_math.h: RowStats)
  const float* s;
  const float* t;
  const float* z_label;   // the label's scaled logit
  const float* weight;    // per-row weight w (aggregation, ptx_coef / n_ptx)
  const float* old;       // old log-probs, advantages, reference log-probs (null without)
  const float* adv;
  const float* ref;
  float* lse;             // out: per-row lse, entropy and the upstream gradients of the grad pass
  float* entropy;
  float* g_lp;
  float* g_h;
};

// The starting values of the sums: zeros, and +inf / -inf for the running ratio min / max.
RLHF_FAST_HD void init_sums(double* acc) {
#pragma unroll
  for (int k = 0; k < kNumSums; ++k) acc[k] = 0.0;
  acc[kRatioMin] = INFINITY;
  acc[kRatioMax] = -INFINITY;
}

// Two partial sums combined (k: which sum; ratio min / max as std::min / std::max do).
RLHF_FAST_HD double combine_sum(int k, double a, double b) {
  if (k == kRatioMin) return b < a ? b : a;
  if (k == kRatioMax) return a < b ? b : a;
  return a + b;
}

// Row i of block `b`: log-prob and entropy from its fold statistics, its loss terms, g_lp / g_h,
// its lse and entropy for the grad pass, and its contributions to the sums in `acc`.
template <int kEstimator>
RLHF_FAST_HD void row_step(const BlockRows& b, int64_t i, const RowParams& p, double* acc) {
  const logprobs::RowStats st{b.m[i], b.s[i], b.t[i]};
  const float row_lse = logprobs::row_lse(st), h = logprobs::row_entropy(st);
  const float lp = logprobs::label_logprob(b.z_label[i], row_lse);
  b.lse[i] = row_lse;
  b.entropy[i] = h;
  const float w = b.weight[i];
  if (b.index[i] < p.n_policy) {
    const auto tok = ppo::policy_token<ppo::ScalarOps>(lp, b.old[i], b.adv[i], p.lo, p.hi, p.dual_c,
                                                       p.log_ratio_clamp);
    float kl = 0.f, dkl = 0.f;
    if (p.has_ref) ppo::kl_token<ppo::ScalarOps, kEstimator>(lp - b.ref[i], 0.f, kl, dkl, p.kl_cap);
    acc[kLoss] += double(w) * (tok.loss + p.kl_coef * kl - p.entropy_coef * h);
    acc[kPolicyLoss] += double(w) * tok.loss;
    acc[kCount] += 1;
    acc[kClipped] += tok.clipped;
    acc[kDual] += tok.dual;
    acc[kK3] += tok.k3;
    acc[kRatio] += tok.ratio;
    acc[kRatioMin] = combine_sum(kRatioMin, acc[kRatioMin], double(tok.ratio));
    acc[kRatioMax] = combine_sum(kRatioMax, acc[kRatioMax], double(tok.ratio));
    acc[kKl] += kl;
    acc[kEntropy] += h;
    b.g_lp[i] = w * (tok.grad + float(p.kl_coef) * dkl);
    b.g_h[i] = -w * float(p.entropy_coef);
  } else {
    acc[kLoss] += double(w) * -lp;
    acc[kPtxNll] += -lp;
    acc[kPtxCount] += 1;
    b.g_lp[i] = -w;
    b.g_h[i] = 0.f;
  }
}

// fn(std::integral_constant<int, estimator>{}): the estimator becomes a template parameter once,
// outside the loops over rows.
template <typename Fn>
void with_estimator(int64_t kl_estimator, Fn&& fn) {
  switch (kl_estimator) {
    case ppo::kK1: fn(std::integral_constant<int, ppo::kK1>{}); break;
    case ppo::kAbs: fn(std::integral_constant<int, ppo::kAbs>{}); break;
    case ppo::kK2: fn(std::integral_constant<int, ppo::kK2>{}); break;
    default: fn(std::integral_constant<int, ppo::kK3>{}); break;
  }
}

// Vocabulary rows per GEMM: the policy's chunk_cols(vocab, widen) where it has one, else kChunk.
template <typename Tiles>
int64_t chunk_cols(int64_t vocab, bool widen) {
  if constexpr (requires { Tiles::chunk_cols(vocab, widen); }) {
    return std::clamp<int64_t>(Tiles::chunk_cols(vocab, widen), 1, vocab);
  } else {
    return std::min<int64_t>(Tiles::kChunk, vocab);
  }
}

// rlhf_fast_C::linear_ppo_loss_clamped_fwd (schema in csrc/cpu/linear_ppo_loss.cpp) on the policy's
// device. log_ratio_clamp <= 0: no clamp of logprob - old before exp; kl_cap == 0: no cap of the KL
// value, < 0: the estimator's default (ppo::default_kl_cap). The defaults are what the CUDA entry
// point (linear_ppo_loss_fwd, which has no such arguments) computes.
template <typename Tiles>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& row_weight, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const std::optional<at::Tensor>& ref_logprobs, int64_t n_policy, double kl_coef, int64_t kl_estimator,
    double entropy_coef, double clip_low, double clip_high, double dual_clip, double temperature, int64_t ignore_index,
    bool compute_grad, int64_t tile_rows, double log_ratio_clamp = ppo::kDefaultLogRatioClamp,
    double kl_cap = -1.0) {
  RLHF_FAST_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden: expected a contiguous (R, H) tensor");
  RLHF_FAST_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == hidden.size(1),
                  "weight: expected a contiguous (V, H) tensor with H = ", hidden.size(1), ", got ", weight.sizes());
  RLHF_FAST_CHECK(weight.device() == hidden.device(), "weight: expected device ", hidden.device(), ", got ",
                  weight.device());
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
  // The sums stay on the device until the caller reads them: no host sync per block.
  at::Tensor sums = at::zeros({kNumSums}, hidden.options().dtype(at::kDouble));
  sums.narrow(0, kRatioMin, 1).fill_(std::numeric_limits<double>::infinity());
  sums.narrow(0, kRatioMax, 1).fill_(-std::numeric_limits<double>::infinity());
  at::Tensor grad_hidden = compute_grad ? at::zeros_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor gw32 = compute_grad ? Tiles::empty_f32({vocab, weight.size(1)}, hidden).zero_() : at::Tensor();
  at::Tensor gb32 = compute_grad && has_bias ? at::zeros({vocab}, f32) : at::Tensor();

  const at::Tensor keep = (labels != ignore_index).logical_and_(row_weight != 0);
  const at::Tensor idx = keep.nonzero().squeeze(1);
  const int64_t na = idx.size(0);
  if (na > 0) {
    const at::Tensor h32 = hidden.index_select(0, idx).to(at::kFloat).contiguous();
    const bool widen = weight.scalar_type() != at::kFloat;
    const int64_t chunk = chunk_cols<Tiles>(vocab, widen);
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
    at::Tensor buffer = Tiles::empty_f32({block * vocab}, hidden);
    at::Tensor m = at::empty({block}, f32), s = at::empty({block}, f32), t = at::empty({block}, f32);
    at::Tensor zl = at::empty({block}, f32), lse = at::empty({block}, f32), ent = at::empty({block}, f32);
    at::Tensor g_lp = at::empty({block}, f32), g_h = at::empty({block}, f32);
    at::Tensor gh32 = compute_grad ? at::zeros({na, hidden.size(1)}, f32) : at::Tensor();
    const float inv_temp = float(1.0 / temperature);
    const RowParams params{n_policy, kl_coef, entropy_coef, float(1.0 - clip_low), float(1.0 + clip_high),
                           float(dual_clip), has_ref, float(log_ratio_clamp),
                           kl_cap < 0 ? ppo::default_kl_cap(int(kl_estimator)) : float(kl_cap)};
    double* sums_ptr = sums.data_ptr<double>();
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
        linear::tile_logits<Tiles>(tile, hr, weight_chunk(c0, vc), has_bias ? b32.narrow(0, c0, vc) : at::Tensor());
        Tiles::fold(tile, y.const_data_ptr<int64_t>() + r0, c0, 0.f, inv_temp, m.data_ptr<float>(),
                    s.data_ptr<float>(), t.data_ptr<float>(), zl.data_ptr<float>(), true);
      }
      const BlockRows rows_of_block{nr, idx_c.const_data_ptr<int64_t>() + r0, m.const_data_ptr<float>(),
                                    s.const_data_ptr<float>(), t.const_data_ptr<float>(), zl.const_data_ptr<float>(),
                                    wt.const_data_ptr<float>() + r0, old.const_data_ptr<float>() + r0,
                                    adv.const_data_ptr<float>() + r0,
                                    has_ref ? ref.const_data_ptr<float>() + r0 : nullptr, lse.data_ptr<float>(),
                                    ent.data_ptr<float>(), g_lp.data_ptr<float>(), g_h.data_ptr<float>()};
      Tiles::rows(rows_of_block, params, kl_estimator, sums_ptr);
      if (!compute_grad) continue;
      for (int64_t c0 = 0; c0 < vocab; c0 += chunk) {
        const int64_t vc = std::min(chunk, vocab - c0);
        at::Tensor tile = tile_of(c0, vc);
        Tiles::grad(tile, y.const_data_ptr<int64_t>() + r0, c0, 0.f, inv_temp, lse.const_data_ptr<float>(),
                    g_lp.const_data_ptr<float>(), g_h.const_data_ptr<float>(), ent.const_data_ptr<float>());
        Tiles::matmul(gh32.narrow(0, r0, nr), tile, weight_chunk(c0, vc), 1.0f);  // (nr, vc) @ (vc, H)
        Tiles::matmul(gw32.narrow(0, c0, vc), tile.t(), hr, 1.0f);                // (vc, nr) @ (nr, H)
        if (has_bias) gb32.narrow(0, c0, vc).add_(tile.sum(0));
      }
    }
    if (compute_grad) grad_hidden.index_copy_(0, idx, gh32.to(hidden.scalar_type()));
  }
  // No policy row: ratio min / max are 0 (as ppo_policy_loss reports them).
  sums.narrow(0, kRatioMin, 2).masked_fill_(sums.narrow(0, kCount, 1) == 0, 0.0);
  at::Tensor loss = sums.select(0, kLoss).to(at::kFloat);
  at::Tensor grad_weight = compute_grad ? gw32.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor grad_bias = gb32.defined() ? gb32.to(bias->scalar_type()) : at::empty({0}, weight.options());
  return {loss, sums, grad_hidden, grad_weight, grad_bias};
}

}  // namespace rlhf_fast::linear_ppo
