// CPU kernels of gather_logprobs, compiled once per SIMD capability (see csrc/cpu/dispatch.h).
//
// Forward, one row at a time, in blocks of kBlock elements that stay in L1: pass 1 takes the block's
// max; pass 2 re-reads the block from L1 and folds it into lane-wise running sums of exp(z - m)
// (and exp(z - m) * (z - m) for the entropy). The logits are read from memory once; there is one
// exp per element plus one per block whose max rises.
// Backward, one row at a time: recompute p = exp(z - lse) from the logits and the saved lse, write
// the gradient once in the logits' dtype. The row math is shared with the CUDA kernels through
// rlhf_fast/gather_logprobs_math.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <rlhf_fast/gather_logprobs_math.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;

struct VecOps {
  using F = Vec;
  // ~1e-6 relative error (ATen's flash attention uses the same), far below the fp32 tolerance of
  // a log-prob and about twice as fast as Sleef's 1-ulp exp.
  static Vec exp(const Vec& x) { return x.exp_u20(); }
  static Vec max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
  static Vec splat(float x) { return Vec(x); }
};

// float32, bfloat16 and float16: the dtypes every kernel accepts (no double: no SIMD path for it).
#define RLHF_FAST_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Two fp32 vectors per step: the natural unit for bf16/fp16, whose vectors hold twice as many lanes.
constexpr int64_t kStep = 2 * Vec::size();
// Elements per forward block: read twice, the second time from L1.
constexpr int64_t kBlock = 2048;
static_assert(kBlock % kStep == 0, "block must be a whole number of steps");

// Load `count` (<= kStep) elements starting at p as two fp32 vectors; lanes past count are 0.
template <typename T>
inline void load2(const T* p, int64_t count, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    if (count >= kStep) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      a = Vec::loadu(p, std::min<int64_t>(count, Vec::size()));
      b = count > Vec::size() ? Vec::loadu(p + Vec::size(), count - Vec::size()) : Vec(0.f);
    }
  } else {
    using RVec = at::vec::Vectorized<T>;
    const RVec r = count >= kStep ? RVec::loadu(p) : RVec::loadu(p, count);
    std::tie(a, b) = at::vec::convert_to_float<T>(r);
  }
}

template <typename T>
inline void store2(T* p, int64_t count, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    if (count >= kStep) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      a.store(p, std::min<int64_t>(count, Vec::size()));
      if (count > Vec::size()) b.store(p + Vec::size(), count - Vec::size());
    }
  } else {
    const auto r = at::vec::convert_from_float<T>(a, b);
    if (count >= kStep) r.store(p); else r.store(p, count);
  }
}

// Max of x[0:n) (unscaled; the scale 1/T > 0 commutes with max).
template <typename T>
inline float block_max(const T* x, int64_t n) {
  const Vec ninf(-std::numeric_limits<float>::infinity());
  Vec mx0 = ninf, mx1 = ninf;
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    Vec a, b;
    load2(x + j, kStep, a, b);
    mx0 = at::vec::maximum(mx0, a);
    mx1 = at::vec::maximum(mx1, b);
  }
  float m = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); },
                                           at::vec::maximum(mx0, mx1));
  for (; j < n; ++j) m = std::max(m, float(x[j]));
  return m;
}

// One read of the row from memory, in L1-sized blocks: the block's max first, then (re-reading the
// block from L1) the sums relative to the running max. One exp per element, plus one per block
// whose max raises the running max.
template <typename T, bool kEntropy>
inline logprobs::RowStats fold_row(const T* x, int64_t vocab, float inv_temp) {
  using logprobs::accumulate;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float m = kNegInf;  // running max of z = x / T
  Vec s0(0.f), s1(0.f), t0(0.f), t1(0.f);
  const Vec scale(inv_temp);
  for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
    const T* xb = x + b0;
    const int64_t n = std::min(kBlock, vocab - b0);
    const float bmax = block_max(xb, n) * inv_temp;
    if (!(bmax > kNegInf)) continue;  // an all -inf block carries no mass
    if (bmax > m) {
      if (m > kNegInf) {  // online softmax: move the running sums to the new max
        const float shift = m - bmax;
        const Vec a(std::exp(shift)), sh(shift);
        t0 = a * (t0 + s0 * sh);
        t1 = a * (t1 + s1 * sh);
        s0 = s0 * a;
        s1 = s1 * a;
      }
      m = bmax;
    }
    const Vec neg_m(-m);
    int64_t j = 0;
    for (; j + kStep <= n; j += kStep) {
      Vec a, b;
      load2(xb + j, kStep, a, b);
      accumulate<VecOps>(at::vec::fmadd(a, scale, neg_m), s0, t0, kEntropy);
      accumulate<VecOps>(at::vec::fmadd(b, scale, neg_m), s1, t1, kEntropy);
    }
    if (j < n) {  // tail: lanes past the row are set to -inf so they add exactly nothing
      const int64_t count = n - j;
      Vec a, b;
      load2(xb + j, count, a, b);
      const Vec ninf(kNegInf), lane = Vec::arange(0.f, 1.f);
      a = Vec::blendv(ninf, at::vec::fmadd(a, scale, neg_m), lane < Vec(float(count)));
      b = Vec::blendv(ninf, at::vec::fmadd(b, scale, neg_m), (lane + Vec(float(Vec::size()))) < Vec(float(count)));
      accumulate<VecOps>(a, s0, t0, kEntropy);
      accumulate<VecOps>(b, s1, t1, kEntropy);
    }
  }
  const auto sum = [](Vec& p, Vec& q) { return p + q; };
  return logprobs::RowStats{m, at::vec::vec_reduce_all<float>(sum, s0 + s1),
                            kEntropy ? at::vec::vec_reduce_all<float>(sum, t0 + t1) : 0.f};
}

// Rows per parallel task: enough that each task touches >= 32K elements.
inline int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 15) / vocab); }

template <typename T>
int64_t gather_logprobs_fwd_impl(const at::Tensor& logits, const at::Tensor& labels, float inv_temp,
                                 int64_t ignore_index, at::Tensor& logprobs, at::Tensor* entropy,
                                 at::Tensor& lse) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  const T* x = logits.const_data_ptr<T>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  float* lp_out = logprobs.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  float* ent_out = entropy != nullptr ? entropy->data_ptr<float>() : nullptr;
  std::atomic<int64_t> first_bad{n_rows};

  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = x + i * row_stride;
      const int64_t label = y[i];
      const bool keep = label != ignore_index;
      if (keep && (label < 0 || label >= vocab)) {
        int64_t cur = first_bad.load();
        while (i < cur && !first_bad.compare_exchange_weak(cur, i)) {}
      }
      const logprobs::RowStats st = ent_out != nullptr ? fold_row<T, true>(row, vocab, inv_temp)
                                                       : fold_row<T, false>(row, vocab, inv_temp);
      const float row_lse = logprobs::row_lse(st);
      lse_out[i] = row_lse;
      const bool valid = keep && label >= 0 && label < vocab;
      lp_out[i] = valid ? logprobs::label_logprob(float(row[label]) * inv_temp, row_lse) : 0.f;
      if (ent_out != nullptr) ent_out[i] = valid ? logprobs::row_entropy(st) : 0.f;
    }
  });
  const int64_t bad = first_bad.load();
  return bad < n_rows ? bad : -1;
}

template <typename T>
void gather_logprobs_bwd_impl(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const at::Tensor& entropy, float inv_temp, int64_t ignore_index,
                              at::Tensor& grad_logits) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  const T* x = logits.const_data_ptr<T>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const float* g_lp = grad_logprobs.const_data_ptr<float>();
  const bool with_entropy = grad_entropy.defined();
  const float* g_ent = with_entropy ? grad_entropy.const_data_ptr<float>() : nullptr;
  const float* ent = with_entropy ? entropy.const_data_ptr<float>() : nullptr;
  const float* lse_in = lse.const_data_ptr<float>();
  T* out = grad_logits.data_ptr<T>();

  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = x + i * row_stride;
      T* grow = out + i * vocab;
      const int64_t label = y[i];
      const float row_lse = lse_in[i];
      if (!logprobs::row_has_grad(label, ignore_index, row_lse)) {
        std::memset(static_cast<void*>(grow), 0, sizeof(T) * vocab);
        continue;
      }
      const float g = g_lp[i], ge = with_entropy ? g_ent[i] : 0.f, h = with_entropy ? ent[i] : 0.f;
      const Vec scale(inv_temp), lse_v(row_lse), g_v(g), ge_v(ge), h_v(h);
      for (int64_t j = 0; j < vocab; j += kStep) {
        const int64_t count = std::min(kStep, vocab - j);
        Vec a, b;
        load2(row + j, count, a, b);
        a = logprobs::grad_logit<VecOps>(a * scale, lse_v, g_v, ge_v, h_v, with_entropy) * scale;
        b = logprobs::grad_logit<VecOps>(b * scale, lse_v, g_v, ge_v, h_v, with_entropy) * scale;
        store2(grow + j, count, a, b);
      }
      // The label's own term, [j == y] * g, computed in fp32 and stored once.
      const float z_y = float(row[label]) * inv_temp;
      const float gz = logprobs::grad_logit<logprobs::ScalarOps>(z_y, row_lse, g, ge, h, with_entropy) + g;
      grow[label] = static_cast<T>(gz * inv_temp);
    }
  });
}

inline int64_t gather_logprobs_fwd_kernel(const at::Tensor& logits, const at::Tensor& labels, float inv_temp,
                                          int64_t ignore_index, at::Tensor& logprobs, at::Tensor* entropy,
                                          at::Tensor& lse) {
  int64_t bad = -1;
  RLHF_FAST_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "gather_logprobs_fwd", [&] {
    bad = gather_logprobs_fwd_impl<scalar_t>(logits, labels, inv_temp, ignore_index, logprobs, entropy, lse);
  });
  return bad;
}

inline void gather_logprobs_bwd_kernel(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                                       const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                       const at::Tensor& entropy, float inv_temp, int64_t ignore_index,
                                       at::Tensor& grad_logits) {
  RLHF_FAST_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "gather_logprobs_bwd", [&] {
    gather_logprobs_bwd_impl<scalar_t>(grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temp,
                                       ignore_index, grad_logits);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace rlhf_fast::cpu
