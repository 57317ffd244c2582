// Math of ranking_loss (the InstructGPT reward-model loss; pairwise_loss is its K = 2 case) shared by
// the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
//
// Prompt p has n_p scored candidates r_0 .. r_{n_p - 1} (n_p = K unless num_candidates is given).
// Candidate i is ranked above j when key_i < key_j, key = ranks[p] when given (0 = best; equal ranks
// are a tie and form no pair), else the position (candidates ordered best -> worst). Every ranked
// pair (w above l) contributes, with m the margin of the prompt,
//   pair_loss = softplus(-(r_w - r_l - m)) = -log sigmoid(r_w - r_l - m)
// and
//   loss = mean over prompts with >= 1 pair of (mean over the prompt's pairs of pair_loss)
// (0 with a zero gradient when no prompt has a pair). Gradient of one pair's term:
//   d pair_loss / d r_w = -sigmoid(m - (r_w - r_l)) = -d pair_loss / d r_l
// times 1 / (pairs_p * ranked_prompts) and the upstream gradient.
//
// Stability: softplus(x) = max(x, 0) + log1p(exp(-|x|)) and sigmoid(x) = exp(min(x, 0)) / (1 +
// exp(-|x|)) never overflow, so rewards of any finite magnitude (1e4 and beyond) give a finite loss
// and gradient.
// Statistics over all ranked pairs of the batch: accuracy = fraction with r_w > r_l, mean_margin =
// mean of r_w - r_l (the raw difference, without m); both 0 when there is no pair.
#pragma once

#include <cmath>
#include <cstdint>

#include <rlhf_fast/host_device.h>

namespace rlhf_fast {
namespace ranking {

// +1 when the candidate with key_i is ranked above the one with key_j, -1 when below, 0 for a tie.
RLHF_FAST_HD int orient(int64_t key_i, int64_t key_j) { return key_i < key_j ? 1 : (key_j < key_i ? -1 : 0); }

// Element-wise functions are templated on an `Ops` policy (exp, log1p, abs, max, min, splat) so the
// same formula runs on scalars (CUDA threads, CPU tails) and on at::vec::Vectorized<float> (CPU SIMD).
struct ScalarOps {
  using F = float;
  // On the GPU log(1 + e) instead of log1p(e): CUDA's log1pf is an out-of-line call (it spills around
  // the call site) and Triton has no log1p; with the fast __logf the difference is below 1e-6
  // absolute, far inside a loss's fp32 tolerance.
#if defined(__CUDA_ARCH__)
  static RLHF_FAST_HD float exp(float x) { return __expf(x); }
  static RLHF_FAST_HD float log1p(float x) { return __logf(1.f + x); }
#else
  static RLHF_FAST_HD float exp(float x) { return std::exp(x); }
  static RLHF_FAST_HD float log1p(float x) { return std::log1p(x); }
#endif
  static RLHF_FAST_HD float abs(float x) { return fabsf(x); }
  static RLHF_FAST_HD float max(float a, float b) { return fmaxf(a, b); }
  static RLHF_FAST_HD float min(float a, float b) { return fminf(a, b); }
  static RLHF_FAST_HD float splat(float x) { return x; }
};

// log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): no overflow for any finite x.
template <class Ops, class F>
RLHF_FAST_HD F softplus(F x) {
  return Ops::max(x, Ops::splat(0.f)) + Ops::log1p(Ops::exp(Ops::splat(0.f) - Ops::abs(x)));
}

// 1 / (1 + exp(-x)) = exp(min(x, 0)) / (1 + exp(-|x|)): no overflow, no branch, for any finite x.
template <class Ops, class F>
RLHF_FAST_HD F sigmoid(F x) {
  return Ops::exp(Ops::min(x, Ops::splat(0.f))) / (Ops::splat(1.f) + Ops::exp(Ops::splat(0.f) - Ops::abs(x)));
}

// The loss of one ranked pair from x = m - (r_w - r_l), and d loss / d r_w (the loser gets the opposite).
template <class Ops, class F>
RLHF_FAST_HD F pair_loss(F x) {
  return softplus<Ops>(x);
}
template <class Ops, class F>
RLHF_FAST_HD F pair_winner_grad(F x) {
  return Ops::splat(0.f) - sigmoid<Ops>(x);
}

// Sums over ranked pairs (one prompt's, or a part of one).
struct PairSums {
  float loss;       // sum of pair_loss
  int64_t pairs;    // ranked pairs
  int64_t correct;  // pairs with r_w > r_l
  float diff;       // sum of r_w - r_l
};

RLHF_FAST_HD PairSums no_pairs() { return PairSums{0.f, 0, 0, 0.f}; }

RLHF_FAST_HD void add_pair(PairSums& s, float r_w, float r_l, float margin) {
  const float diff = r_w - r_l;
  s.loss += pair_loss<ScalarOps>(margin - diff);
  s.pairs += 1;
  s.correct += diff > 0.f ? 1 : 0;
  s.diff += diff;
}

RLHF_FAST_HD PairSums merge(const PairSums& x, const PairSums& y) {
  return PairSums{x.loss + y.loss, x.pairs + y.pairs, x.correct + y.correct, x.diff + y.diff};
}

// d pair_loss / d r_w of a ranked pair (the loser gets the opposite).
RLHF_FAST_HD float winner_grad(float r_w, float r_l, float margin) {
  return pair_winner_grad<ScalarOps>(margin - (r_w - r_l));
}

// Gradient of candidate i of a prompt, summed over its pairs (unscaled): over j != i in [0, n),
// +winner_grad where i wins, -winner_grad where i loses. `key(j)` and `reward(j)` read the prompt.
template <class Key, class Reward>
RLHF_FAST_HD float candidate_grad(int64_t i, int64_t n, float margin, const Key& key, const Reward& reward) {
  const int64_t ki = key(i);
  const float ri = reward(i);
  float g = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const int o = orient(ki, key(j));
    if (o > 0) g += winner_grad(ri, reward(j), margin);
    if (o < 0) g -= winner_grad(reward(j), ri, margin);
  }
  return g;
}

}  // namespace ranking
}  // namespace rlhf_fast

// ---------------------------------------------------------------------------------------------
// Host-side argument checks of rlhf_fast_C::ranking_loss_fwd / _bwd, the same on every device.
#include <rlhf_fast/checks.h>

#include <optional>

namespace rlhf_fast {

// rewards (P, K) float32 / bfloat16 / float16 contiguous; num_candidates (P,) int64, ranks (P, K)
// int64 and margins (P,) float32, each optional, contiguous, on the device of rewards. Value ranges
// (num_candidates in [0, K], ranks in [0, n_p)) are checked where the data is read.
inline void check_ranking_loss(const at::Tensor& rewards, const std::optional<at::Tensor>& num_candidates,
                               const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& margins) {
  RLHF_FAST_CHECK(rewards.dim() == 2 && rewards.is_contiguous(), "rewards: expected a contiguous 2-D (P, K) tensor, got ",
                  rewards.sizes());
  const auto dt = rewards.scalar_type();
  RLHF_FAST_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                  "rewards: expected float32, bfloat16 or float16, got ", dt);
  const int64_t p = rewards.size(0), k = rewards.size(1);
  if (num_candidates.has_value() && num_candidates->defined()) {
    check_vector(*num_candidates, "num_candidates", p, at::kLong, rewards);
    RLHF_FAST_CHECK(num_candidates->is_contiguous(), "num_candidates: expected a contiguous tensor");
  }
  if (ranks.has_value() && ranks->defined()) {
    RLHF_FAST_CHECK(ranks->dim() == 2 && ranks->size(0) == p && ranks->size(1) == k && ranks->is_contiguous(),
                    "ranks: expected a contiguous (", p, ", ", k, ") tensor, got ", ranks->sizes());
    RLHF_FAST_CHECK(ranks->scalar_type() == at::kLong, "ranks: expected dtype int64, got ", ranks->scalar_type());
    RLHF_FAST_CHECK(ranks->device() == rewards.device(), "ranks: expected device ", rewards.device(), ", got ",
                    ranks->device());
  }
  if (margins.has_value() && margins->defined()) {
    check_vector(*margins, "margin", p, at::kFloat, rewards);
    RLHF_FAST_CHECK(margins->is_contiguous(), "margin: expected a contiguous tensor");
  }
}

}  // namespace rlhf_fast
