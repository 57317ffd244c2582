// CPU kernels of gather_logprobs, compiled once per SIMD capability (see csrc/cpu/dispatch.h).
// The SIMD helpers it uses (loads/stores per dtype, the lean exp) are in vec_utils.h.
//
// Forward, one row at a time, in blocks of kBlock elements: each block is folded into lane-wise
// sums of exp(z - m) (and exp(z - m) * (z - m) for the entropy) against a reference point m that
// moves only when a block's max jumps far above it (see fold_row). The logits are read from
// memory once, with one exp per element.
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

#include "gather_logprobs.h"
#include "register_kernel.h"
#include "vec_utils.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

// Elements per forward block (8 KB of fp32): a block refolded against a new max is still in L1.
constexpr int64_t kBlock = 2048;
static_assert(kBlock % kStep == 0, "block must be a whole number of steps");

// Max of x[0:n) (unscaled; the scale 1/T > 0 commutes with max).
template <typename T>
inline float block_max(const T* x, int64_t n) {
  const Vec ninf(-std::numeric_limits<float>::infinity());
  Vec mx0 = ninf, mx1 = ninf;
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    Vec a, b;
    load2_unordered(x + j, a, b);
    mx0 = vmax(mx0, a);
    mx1 = vmax(mx1, b);
  }
  float m = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return vmax(p, q); }, vmax(mx0, mx1));
  for (; j < n; ++j) m = std::max(m, float(x[j]));
  return m;
}

// Sums of one block against the reference point m: s += exp(z - m), t += exp(z - m) * (z - m),
// z = x / T. Returns the block's max of z, found in the same pass.
template <typename T, bool kEntropy>
inline float fold_block(const T* xb, int64_t n, float inv_temp, float m, Vec& s0, Vec& s1, Vec& t0, Vec& t1) {
  using logprobs::accumulate;
  const Vec scale(inv_temp);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const Vec neg_m(-m), ninf(kNegInf);
  Vec mx0 = ninf, mx1 = ninf;
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    Vec a, b;
    load2_unordered(xb + j, a, b);
    mx0 = vmax(mx0, a);
    mx1 = vmax(mx1, b);
    accumulate<VecOps>(at::vec::fmadd(a, scale, neg_m), s0, t0, kEntropy);
    accumulate<VecOps>(at::vec::fmadd(b, scale, neg_m), s1, t1, kEntropy);
  }
  if (j < n) {  // tail: lanes past the row are set to -inf so they add exactly nothing
    const int64_t count = n - j;
    Vec a, b;
    load2(xb + j, count, a, b);
    const Vec lane = Vec::arange(0.f, 1.f);
    a = Vec::blendv(ninf, a, lane < Vec(float(count)));
    b = Vec::blendv(ninf, b, (lane + Vec(float(Vec::size()))) < Vec(float(count)));
    mx0 = vmax(mx0, a);
    mx1 = vmax(mx1, b);
    accumulate<VecOps>(at::vec::fmadd(a, scale, neg_m), s0, t0, kEntropy);
    accumulate<VecOps>(at::vec::fmadd(b, scale, neg_m), s1, t1, kEntropy);
  }
  return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return vmax(p, q); }, vmax(mx0, mx1)) * inv_temp;
}

// How far a block's max may rise above the reference point before the block is folded again
// against its own max: exp(kSlack) = 8.9e6 per element keeps the sums far from fp32 overflow
// (V * 8.9e6 << 3.4e38) at full relative precision.
constexpr float kSlack = 16.f;

// One read of the row from memory, one exp per element. The reference point m is the first block's
// max; later blocks are folded against it in a single pass that also finds their max, and only a
// block whose max exceeds m by more than kSlack is folded again (L1-hot) against its own max.
// The result does not depend on m: lse = m + log s and entropy = log s - t / s.
template <typename T, bool kEntropy>
inline logprobs::RowStats fold_row(const T* x, int64_t vocab, float inv_temp) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float m = kNegInf;
  Vec s0(0.f), s1(0.f), t0(0.f), t1(0.f);
  for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
    const T* xb = x + b0;
    const int64_t n = std::min(kBlock, vocab - b0);
    if (!(m > kNegInf)) {
      m = block_max(xb, n) * inv_temp;
      if (!(m > kNegInf)) continue;  // all -inf so far: no mass yet
    }
    Vec bs0(0.f), bs1(0.f), bt0(0.f), bt1(0.f);
    const float bmax = fold_block<T, kEntropy>(xb, n, inv_temp, m, bs0, bs1, bt0, bt1);
    if (bmax > m + kSlack) {  // online softmax: move the running sums up to the new max, refold
      const float shift = m - bmax;
      const Vec a(std::exp(shift)), sh(shift);
      t0 = a * (t0 + s0 * sh);
      t1 = a * (t1 + s1 * sh);
      s0 = s0 * a;
      s1 = s1 * a;
      m = bmax;
      bs0 = bs1 = bt0 = bt1 = Vec(0.f);
      fold_block<T, kEntropy>(xb, n, inv_temp, m, bs0, bs1, bt0, bt1);
    }
    s0 = s0 + bs0;
    s1 = s1 + bs1;
    if (kEntropy) {
      t0 = t0 + bt0;
      t1 = t1 + bt1;
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

RLHF_FAST_REGISTER_CPU_KERNEL(gather_logprobs_fwd, gather_logprobs_fwd_kernel)
RLHF_FAST_REGISTER_CPU_KERNEL(gather_logprobs_bwd, gather_logprobs_bwd_kernel)
