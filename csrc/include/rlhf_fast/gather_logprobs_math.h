// Per-row math of gather_logprobs, shared by the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda) so both backends compute the same thing the same way.
//
// For one row x (V logits), temperature T and label y, with z = x / T:
//   lse      = log sum_j exp(z_j)
//   logprob  = z_y - lse
//   entropy  = -sum_j p_j log p_j = lse - sum_j p_j z_j,       p = softmax(z)
// and, for upstream gradients g_lp (of logprob) and g_H (of entropy):
//   dL/dx_j  = (g_lp * ([j == y] - p_j) - g_H * p_j * (log p_j + entropy)) / T
//
// The forward folds a row into RowStats in one read (online softmax): m is the running max,
// s = sum exp(z - m) and t = sum exp(z - m) * (z - m). Keeping t relative to m keeps it small and
// makes the entropy independent of m: entropy = log s - t / s.
//
// Defined values (never NaN): a row whose logits are all -inf has lse = -inf, logprob = -inf,
// entropy = 0 and a zero gradient; elements at -inf contribute p = 0 and no entropy.
//
// Element-wise helpers are templated on an `Ops` policy (exp, max, splat) so the same formula runs
// on scalars (CUDA threads, CPU tails) and on at::vec::Vectorized<float> (CPU SIMD bodies).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include <rlhf_fast/host_device.h>

namespace rlhf_fast {
namespace logprobs {

// Floor for log-probabilities: exp(kMinLog) == 0 and kMinLog * 0 == 0, so elements at -inf (or
// underflowing) contribute exactly nothing without a branch.
constexpr float kMinLog = -FLT_MAX;

struct ScalarOps {
  using F = float;
  static RLHF_FAST_HD float exp(float x) {
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return std::exp(x);
#endif
  }
  static RLHF_FAST_HD float max(float a, float b) { return a > b ? a : b; }
  static RLHF_FAST_HD float splat(float x) { return x; }
};

struct RowStats {
  float m;  // running max of z, -inf while nothing finite has been seen
  float s;  // sum exp(z - m)
  float t;  // sum exp(z - m) * (z - m)
};

RLHF_FAST_HD RowStats empty_stats() { return RowStats{-INFINITY, 0.f, 0.f}; }

// Move the reference point of `st` up to `new_m` (new_m >= st.m, finite).
RLHF_FAST_HD void rescale(RowStats& st, float new_m) {
  if (st.s == 0.f) {  // nothing accumulated yet (also covers st.m == -inf)
    st.m = new_m;
    return;
  }
  const float shift = st.m - new_m;  // <= 0
  const float a = ScalarOps::exp(shift);
  st.t = a * (st.t + st.s * shift);
  st.s *= a;
  st.m = new_m;
}

// Fold one scaled logit into the statistics (scalar path: CUDA threads, CPU tails).
RLHF_FAST_HD void push(RowStats& st, float z) {
  if (z == -INFINITY) return;  // masked elements carry no mass; NaN propagates into s
  if (z > st.m) {
    rescale(st, z);
    st.s += 1.f;  // exp(z - m) with m == z; t gains 1 * 0
    return;
  }
  const float d = z - st.m;
  const float e = ScalarOps::exp(d);
  st.s += e;
  st.t += e * d;
}

// Combine the statistics of two disjoint parts of a row (parallel reductions).
RLHF_FAST_HD RowStats merge(RowStats a, RowStats b) {
  if (a.s == 0.f) return b;
  if (b.s == 0.f) return a;
  const float m = a.m > b.m ? a.m : b.m;
  rescale(a, m);
  rescale(b, m);
  return RowStats{m, a.s + b.s, a.t + b.t};
}

RLHF_FAST_HD float row_lse(const RowStats& st) {
  return st.s > 0.f ? st.m + ::logf(st.s) : -INFINITY;
}

RLHF_FAST_HD float row_entropy(const RowStats& st) {
  if (!(st.s > 0.f)) return 0.f;
  const float h = ::logf(st.s) - st.t / st.s;
  return h > 0.f ? h : 0.f;  // true entropy is >= 0; clamp fp32 rounding below zero
}

// log softmax(z)[y] from the label's scaled logit and the row lse. -inf for an all -inf row.
RLHF_FAST_HD float label_logprob(float z_label, float lse) {
  if (!(lse > -INFINITY)) return -INFINITY;
  return z_label - lse;
}

// SIMD/scalar body of the forward fold for elements already known to be <= m:
// d = z - m (d <= 0, may be -inf), adds exp(d) to s and exp(d) * d to t.
template <class Ops, class F>
RLHF_FAST_HD void accumulate(F d, F& s, F& t, bool with_entropy) {
  const F e = Ops::exp(d);
  s = s + e;
  if (with_entropy) t = t + e * Ops::max(d, Ops::splat(kMinLog));
}

// Gradient w.r.t. the scaled logit z_j, without the label's +g_lp term (added by the caller at y):
//   -g_lp * p_j - g_H * p_j * (log p_j + entropy)
template <class Ops, class F>
RLHF_FAST_HD F grad_logit(F z, F lse, F g_lp, F g_ent, F entropy, bool with_entropy) {
  const F logp = Ops::max(z - lse, Ops::splat(kMinLog));
  const F p = Ops::exp(logp);
  F g = F(0.f) - g_lp * p;
  if (with_entropy) g = g - g_ent * p * (logp + entropy);
  return g;
}

// A row contributes a gradient only when its label is kept and it has finite mass.
RLHF_FAST_HD bool row_has_grad(int64_t label, int64_t ignore_index, float lse) {
  return label != ignore_index && lse > -INFINITY;
}

}  // namespace logprobs
}  // namespace rlhf_fast
