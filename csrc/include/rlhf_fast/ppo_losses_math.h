// Per-token math of the RL losses (kl_penalty, ppo_policy_loss, value_loss) and the aggregation
// weights, shared by the CPU kernels (csrc/cpu/kernels/ppo_losses_kernel.h, on at::vec vectors and
// scalars) and the CUDA kernels (csrc/cuda/ppo_losses.cu, on scalars), so both compute the same
// thing the same way. The Triton kernels (kernels/ppo_losses.py) follow the same formulas.
//
// Element-wise functions are templated on an `Ops` policy: F is the value type (float, or
// at::vec::Vectorized<float>), M the type of a comparison (bool, or a lane mask), with
//   exp(F), select(M, F if_true, F if_false), gt(F, F), lt(F, F), both(M, M), either(M, M),
//   max(F, F), min(F, F), abs(F), splat(float).
//
// kl_penalty, x = logprobs - ref_logprobs, clamped to [-c, c] first if a clamp c is given:
//   k1 = x          d/dx = 1
//   abs = |x|       d/dx = sign(x)
//   k2 = x^2 / 2    d/dx = x
//   k3 = e^-x - 1 + x  (computed as expm1(-x) + x, by a series near 0)   d/dx = 1 - e^-x
//   and d/dx = 0 where the clamp is active (|x| > c).
//   Then the value cap k (kl_token's `cap`, <= 0: none): kl = clamp(kl, -k, k), d/dx = 0 where it is
//   active (|kl| > k). Default: k = 10 for k3 (verl's low_var_kl), no cap for k1 / abs / k2
//   (default_kl_cap); an exploding k3 (e^-x of a very negative x, inf past x = -88) becomes k.
//
// ppo_policy_loss, per valid token: d = clamp(logprobs - old, -c, c) with the log-ratio clamp c
// (default 20, as verl and OpenRLHF clamp before exp; <= 0: none), r = e^d, A = advantage,
//   l1 = -A r,  l2 = -A clip(r, 1 - eps_low, 1 + eps_high),  l = max(l1, l2),  clipped = l2 > l1
//   dual clip c > 1, for A < 0: l = min(l, -A c),  dual_clipped = A < 0 and l > -A c
//   dl/d logprobs = -A r unless clipped or dual_clipped or the log-ratio clamp is active (|d| > c),
//   then 0
//   k3 = e^d - 1 - d (of the clamped d): the k3 estimate of KL(old || new) (x = old - new in the k3 above)
//   cispo (MiniMax-M1's CISPO): w = min(r, 1 + eps_high) as a constant weight, l = -A w logprobs,
//   dl/d logprobs = -A w everywhere, clipped = r > 1 + eps_high; lo and dual_c are unused
//
// value_loss, per valid token: v_c = clip(v, v_old - eps, v_old + eps),
//   l = 0.5 max((v - R)^2, (v_c - R)^2),  clipped = (v_c - R)^2 > (v - R)^2,
//   dl/dv = v - R unless clipped (then v is outside the clip range and the gradient is 0)
//
// Aggregation (rlhf_fast/ops/_aggregation.py has the table): loss = sum_b w_b sum_t l_bt m_bt with a
// weight per sequence; the forward pass writes the per-token gradient without the weight,
// m_bt * dl_bt/dlogprobs_bt, and the backward multiplies it by grad_loss * w_b.
//
// Masked positions (m == 0) are replaced by zeros before any of this math, so whatever they hold
// (padding, -inf, NaN) reaches neither the loss, nor the statistics, nor the gradient.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include <rlhf_fast/host_device.h>

namespace rlhf_fast {
namespace ppo {

// KL estimators (the order of KL_ESTIMATORS in rlhf_fast/reference.py).
enum Estimator : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };
// Defaults of the numerical safety clamps (LOG_RATIO_CLAMP and K3_CAP in rlhf_fast/ops/_numerics.py).
// The CUDA kernels (csrc/cuda/ppo_losses.cu, linear_ppo_loss.cu) call policy_token and kl_token
// without these arguments and so always compute the defaults; the CPU kernels pass the caller's.
constexpr float kDefaultLogRatioClamp = 20.f;
constexpr float kDefaultK3Cap = 10.f;
// The default cap of an estimator's value: kDefaultK3Cap for k3, none (0) for the others.
RLHF_FAST_HD constexpr float default_kl_cap(int estimator) { return estimator == kK3 ? kDefaultK3Cap : 0.f; }

// Aggregation modes (the order of AGGREGATIONS in rlhf_fast/ops/_aggregation.py).
enum Aggregation : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

// Per-tile partial results of the forward passes, in this order (kernels write n_tiles x kPartials
// floats; a tile is a piece of one row).
enum PolicyPartial : int {
  kPolLoss = 0,      // sum m * l
  kPolCount = 1,     // sum m
  kPolClipped = 2,   // sum m * clipped
  kPolDual = 3,      // sum m * dual_clipped
  kPolK3 = 4,        // sum m * k3
  kPolRatio = 5,     // sum m * r
  kPolRatioMin = 6,  // min r over m != 0 (+inf if none)
  kPolRatioMax = 7,  // max r over m != 0 (-inf if none)
  kPolicyPartials = 8
};
enum ValuePartial : int {
  kValLoss = 0,     // sum m * l
  kValCount = 1,    // sum m (also the weight of the moments below)
  kValClipped = 2,  // sum m * clipped
  kValRetMean = 3,  // weighted mean of R
  kValRetM2 = 4,    // sum m (R - mean R)^2
  kValErrMean = 5,  // weighted mean of R - v
  kValErrM2 = 6,    // sum m (R - v - mean)^2
  kValuePartials = 7
};
// Statistics, in the order of PPO_POLICY_STATS / VALUE_STATS in rlhf_fast/reference.py.
constexpr int kPolicyStats = 6;  // clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_min, ratio_max
constexpr int kValueStats = 2;   // clip_frac, explained_variance

struct ScalarOps {
  using F = float;
  using M = bool;
  static RLHF_FAST_HD float exp(float x) {
#if defined(__CUDA_ARCH__)
    // __expf under setup.py's --use_fast_math: relative error about 2^-21 |x|, < 5e-6 for |x| <= 50.
    return ::expf(x);
#else
    return std::exp(x);
#endif
  }
  static RLHF_FAST_HD float select(bool c, float a, float b) { return c ? a : b; }
  static RLHF_FAST_HD bool gt(float a, float b) { return a > b; }
  static RLHF_FAST_HD bool lt(float a, float b) { return a < b; }
  static RLHF_FAST_HD bool both(bool a, bool b) { return a && b; }
  static RLHF_FAST_HD bool either(bool a, bool b) { return a || b; }
  // NaN-propagating like torch.maximum / torch.minimum.
  static RLHF_FAST_HD float max(float a, float b) { return (a != a || a > b) ? a : b; }
  static RLHF_FAST_HD float min(float a, float b) { return (a != a || a < b) ? a : b; }
  static RLHF_FAST_HD float abs(float a) { return ::fabsf(a); }
  static RLHF_FAST_HD float splat(float a) { return a; }
};

// e^y, e^y - 1 and e^y - 1 - y. Near 0 (|y| < 1/2) the last two come from the Taylor series
// e^y - 1 - y = y^2 (1/2 + y/6 + ... + y^8/10!) (truncation < 2e-9 relative), which avoids the
// cancellation of computing them from e^y; elsewhere from e^y directly (a few ulp).
template <class Ops, class F>
RLHF_FAST_HD void exp_parts(F y, F& e, F& em1, F& em1_minus_y) {
  const F p = ((((((((Ops::splat(1.f / 3628800.f) * y + Ops::splat(1.f / 362880.f)) * y +
                     Ops::splat(1.f / 40320.f)) * y + Ops::splat(1.f / 5040.f)) * y +
                   Ops::splat(1.f / 720.f)) * y + Ops::splat(1.f / 120.f)) * y + Ops::splat(1.f / 24.f)) * y +
                Ops::splat(1.f / 6.f)) * y + Ops::splat(0.5f));
  const F series = y * y * p;
  e = Ops::exp(y);
  const auto small = Ops::lt(Ops::abs(y), Ops::splat(0.5f));
  const F big_em1 = e - Ops::splat(1.f);
  em1 = Ops::select(small, y + series, big_em1);
  em1_minus_y = Ops::select(small, series, big_em1 - y);
}

// ---------------------------------------------------------------------------------------------
// kl_penalty

// The estimate `kl` and its derivative `dkl` w.r.t. logprobs at x = logprobs - ref_logprobs, for
// estimator kEstimator (a template parameter: kernels choose it once, outside their loops).
// clamp <= 0 means no clamp of x; cap <= 0 means no cap of the value.
template <class Ops, int kEstimator, class F>
RLHF_FAST_HD void kl_token(F x, float clamp, F& kl, F& dkl, float cap = default_kl_cap(kEstimator)) {
  using M = typename Ops::M;
  const F zero = Ops::splat(0.f), one = Ops::splat(1.f);
  M active{};
  if (clamp > 0.f) {
    const F c = Ops::splat(clamp);
    active = Ops::gt(Ops::abs(x), c);  // false for NaN, which propagates
    x = Ops::select(Ops::gt(x, c), c, Ops::select(Ops::lt(x, zero - c), zero - c, x));
  }
  if constexpr (kEstimator == kK1) {
    kl = x;
    dkl = one;
  } else if constexpr (kEstimator == kAbs) {
    kl = Ops::abs(x);
    dkl = Ops::select(Ops::gt(x, zero), one, Ops::select(Ops::lt(x, zero), zero - one, zero));  // sign(x)
  } else if constexpr (kEstimator == kK2) {
    kl = Ops::splat(0.5f) * x * x;
    dkl = x;
  } else {  // kK3: e^-x - 1 + x = expm1(-x) + x, derivative 1 - e^-x = -expm1(-x)
    static_assert(kEstimator == kK3, "unknown estimator");
    F e, em1, q;
    exp_parts<Ops>(zero - x, e, em1, q);
    kl = q;
    dkl = zero - em1;
  }
  if (clamp > 0.f) dkl = Ops::select(active, zero, dkl);
  if (cap > 0.f) {
    const F k = Ops::splat(cap);
    const auto above = Ops::gt(kl, k), below = Ops::lt(kl, zero - k);  // false for NaN, which propagates
    kl = Ops::select(above, k, Ops::select(below, zero - k, kl));
    dkl = Ops::select(Ops::either(above, below), zero, dkl);
  }
}

// ---------------------------------------------------------------------------------------------
// ppo_policy_loss

template <class F>
struct PolicyToken {
  F loss;     // per-token loss l
  F grad;     // dl / dlogprobs
  F clipped;  // 1 where the clipped branch is the active one, else 0
  F dual;     // 1 where the dual clip is active, else 0
  F k3;       // e^d - 1 - d, d = logprobs - old
  F ratio;    // e^d
};

// One (valid) token. lo = 1 - eps_low, hi = 1 + eps_high; dual_c <= 0 means no dual clip;
// log_ratio_clamp <= 0 means no clamp of d before exp; cispo: the CISPO objective instead of the clip.
template <class Ops, class F>
RLHF_FAST_HD PolicyToken<F> policy_token(F logprob, F old_logprob, F adv, float lo, float hi, float dual_c,
                                         float log_ratio_clamp = kDefaultLogRatioClamp, bool cispo = false) {
  using M = typename Ops::M;
  const F zero = Ops::splat(0.f), one = Ops::splat(1.f);
  F d = logprob - old_logprob;
  M clamped{};
  if (log_ratio_clamp > 0.f) {
    const F c = Ops::splat(log_ratio_clamp);
    clamped = Ops::gt(Ops::abs(d), c);  // false for NaN, which propagates
    d = Ops::select(Ops::gt(d, c), c, Ops::select(Ops::lt(d, zero - c), zero - c, d));
  }
  F r, em1, k3;
  exp_parts<Ops>(d, r, em1, k3);
  const F neg_adv = zero - adv;
  if (cispo) {
    const F g = neg_adv * Ops::min(r, Ops::splat(hi));  // the capped ratio is data: no clamp stops the gradient
    return PolicyToken<F>{g * logprob, g, Ops::select(Ops::gt(r, Ops::splat(hi)), one, zero), zero, k3, r};
  }
  const F l1 = neg_adv * r;
  const F l2 = neg_adv * Ops::min(Ops::max(r, Ops::splat(lo)), Ops::splat(hi));
  const M clipped = Ops::gt(l2, l1);
  F loss = Ops::max(l1, l2);
  F grad = Ops::select(clipped, zero, l1);  // d(-A e^d)/dd = -A e^d = l1
  if (log_ratio_clamp > 0.f) grad = Ops::select(clamped, zero, grad);  // d is constant outside [-c, c]
  F dual = zero;
  if (dual_c > 0.f) {
    const F l3 = neg_adv * Ops::splat(dual_c);
    const M on = Ops::both(Ops::lt(adv, zero), Ops::gt(loss, l3));
    loss = Ops::select(on, l3, loss);
    grad = Ops::select(on, zero, grad);
    dual = Ops::select(on, one, zero);
  }
  return PolicyToken<F>{loss, grad, Ops::select(clipped, one, zero), dual, k3, r};
}

// ---------------------------------------------------------------------------------------------
// value_loss

template <class F>
struct ValueToken {
  F loss;     // per-token loss l
  F grad;     // dl / dvalues
  F clipped;  // 1 where the clipped term is the larger, else 0
};

template <class Ops, class F>
RLHF_FAST_HD ValueToken<F> value_token(F v, F v_old, F ret, float eps) {
  const F zero = Ops::splat(0.f), one = Ops::splat(1.f);
  const F v_clipped = Ops::min(Ops::max(v, v_old - Ops::splat(eps)), v_old + Ops::splat(eps));
  const F e1 = v - ret, e2 = v_clipped - ret;
  const F l1 = e1 * e1, l2 = e2 * e2;
  const auto clipped = Ops::gt(l2, l1);
  return ValueToken<F>{Ops::splat(0.5f) * Ops::max(l1, l2), Ops::select(clipped, zero, e1),
                       Ops::select(clipped, one, zero)};
}

// Weighted moments (weight sum n, mean, sum of weighted squared deviations m2) of a set of values,
// merged with Chan et al.'s pairwise formula: exact in exact arithmetic, and free of the
// cancellation of E[x^2] - E[x]^2 when the mean is large next to the spread.
struct Moments {
  double n, mean, m2;
};

// a / b of the fp64 accumulators. On the device in fp32: an fp64 division is a called subroutine
// whose calling convention spills registers, and the ratios below only need fp32 precision.
RLHF_FAST_HD double quotient(double a, double b) {
#if defined(__CUDA_ARCH__)
  return double(float(a) / float(b));
#else
  return a / b;
#endif
}

RLHF_FAST_HD Moments merge_moments(Moments a, Moments b) {
  const double n = a.n + b.n;
  if (!(b.n > 0)) return a;
  if (!(a.n > 0)) return b;
  const double delta = b.mean - a.mean;
  return Moments{n, a.mean + delta * quotient(b.n, n), a.m2 + b.m2 + delta * delta * quotient(a.n * b.n, n)};
}

// ---------------------------------------------------------------------------------------------
// Aggregation and statistics (the finalize step: per-row sums -> loss, row weights, statistics)

// The final divisor of `aggregation` (see _aggregation.py): D = total tokens (token-mean), S = rows
// with tokens (seq-mean-token-mean), B (seq-mean-token-sum), B * L (seq-mean-token-sum-norm);
// num_items >= 0 replaces D or S / B.
RLHF_FAST_HD double agg_divisor(int aggregation, double total_tokens, double rows_with_tokens, double n_rows,
                                double num_items, double norm_length) {
  const bool given = num_items >= 0;
  switch (aggregation) {
    case kTokenMean:
      return given ? num_items : total_tokens;
    case kSeqMeanTokenMean:
      return given ? num_items : rows_with_tokens;
    case kSeqMeanTokenSum:
      return given ? num_items : n_rows;
    default:  // kSeqMeanTokenSumNorm
      return (given ? num_items : n_rows) * norm_length;
  }
}

// w_b of a row with `tokens` valid tokens (sum of its mask); 0 where the divisor is 0.
RLHF_FAST_HD float row_weight(int aggregation, float divisor, float tokens) {
  const float d = aggregation == kSeqMeanTokenMean ? divisor * tokens : divisor;
  return d != 0.f ? 1.f / d : 0.f;
}

// sum / count, 0 when count is 0.
RLHF_FAST_HD float safe_mean(double sum, double count) { return count != 0 ? float(quotient(sum, count)) : 0.f; }

// The statistics of ppo_policy_loss (PPO_POLICY_STATS order) from the totals over all tiles: count =
// sum m, the m-weighted sums of clipped, dual_clipped, k3 and r, and min / max of r over m != 0
// (+inf / -inf when no token is valid). Scalars by value: no array whose address escapes (which
// would put it on the stack of a CUDA kernel).
RLHF_FAST_HD void policy_stats(double count, double clipped, double dual, double k3, double ratio, double ratio_min,
                               double ratio_max, float* out) {
  const bool any = ratio_min <= ratio_max;  // some token has m != 0
  out[0] = safe_mean(clipped, count);
  out[1] = safe_mean(dual, count);
  out[2] = safe_mean(k3, count);
  out[3] = safe_mean(ratio, count);
  out[4] = any ? float(ratio_min) : 0.f;
  out[5] = any ? float(ratio_max) : 0.f;
}

// clip_frac and explained variance 1 - Var[R - v] / Var[R] (0 when Var[R] == 0).
RLHF_FAST_HD void value_stats(double clipped_sum, Moments ret, Moments err, float* out) {
  out[0] = safe_mean(clipped_sum, ret.n);
  const float var_ret = safe_mean(ret.m2, ret.n), var_err = safe_mean(err.m2, err.n);
  out[1] = var_ret > 0.f ? 1.f - var_err / var_ret : 0.f;
}

}  // namespace ppo
}  // namespace rlhf_fast
