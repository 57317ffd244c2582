// CPU kernels of the RL losses (kl_penalty, ppo_policy_loss, value_loss), compiled once per SIMD
// capability (see csrc/cpu/dispatch.h). The per-token math is rlhf_fast/ppo_losses_math.h, shared
// with the CUDA kernels; here it runs on at::vec::Vectorized<float>.
//
// Cost model. The ops are element-wise over (B, T) with a handful of flops per token, so at RL batch
// sizes ((64, 2048) = 131k tokens, ~2.5 MB of inputs) the time goes into passes over memory and,
// above all, per-call overhead: the eager reference of ppo_policy_loss runs ~40 ATen kernels forward
// and backward. Here the forward is ONE pass: it reads each input once and writes the loss terms,
// the statistics (as per-tile partial sums) and, when a gradient is needed, the per-token gradient
// m * dl/dx, which is known in the forward because the loss is a scalar (kl_penalty: dk/dx). The
// backward is a PyTorch multiply by the upstream gradient (rlhf_fast/ops/_aggregation.py): there
// are no backward kernels.
//
// Inputs may each have their own dtype (bf16 logprobs with fp32 old_logprobs and advantages, a bool
// or float mask) and a row stride: rows are read in chunks of kChunk elements that are widened to
// fp32 in an L1-resident buffer (fp32 rows are read in place), so each kernel is compiled once, not
// once per dtype combination. Work is split into tiles of at most kTile columns of one row, so both
// many short rows and a few very long ones spread over the threads; per-tile partials are combined
// in a fixed order by the host (ppo_losses.cpp), so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <rlhf_fast/ppo_losses_math.h>

#include "ppo_losses.h"
#include "register_kernel.h"
#include "vec_utils.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

// The Ops policy of ppo_losses_math.h on fp32 vectors; comparisons give all-ones lane masks.
struct PpoVecOps {
  using F = Vec;
  using M = Vec;
  // ATen's exp_u20 (~20 ulp, 2.4e-6: far below the losses' fp32 tolerance; 2x the speed of Sleef's
  // 1-ulp exp). It clamps its argument to [-87.3, 88.7], so NaN is put back explicitly.
  static Vec exp(const Vec& x) { return Vec::blendv(x.exp_u20(), x, x != x); }
  static Vec select(const Vec& m, const Vec& a, const Vec& b) { return Vec::blendv(b, a, m); }
  static Vec gt(const Vec& a, const Vec& b) { return a > b; }
  static Vec lt(const Vec& a, const Vec& b) { return a < b; }
  static Vec both(const Vec& a, const Vec& b) { return a & b; }
  static Vec either(const Vec& a, const Vec& b) { return a | b; }
  static Vec max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }  // NaN-propagating
  static Vec min(const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }
  static Vec abs(const Vec& a) { return a.abs(); }
  static Vec splat(float a) { return Vec(a); }
};

// Elements per chunk: 1 KB per fp32 buffer, so the widened inputs of a chunk stay in L1.
constexpr int64_t kChunk = 256;
static_assert(kChunk % kStep == 0, "a chunk is a whole number of steps");
// Columns per tile of the element-wise passes (the losses use the host's kPpoTile, ppo_losses.h).
constexpr int64_t kTile = kPpoTile;
static_assert(kTile % kChunk == 0, "a tile is a whole number of chunks");
// Elements per parallel task at least, so small inputs do not pay for waking threads.
constexpr int64_t kGrainElements = 16384;
// Buffer length: widened chunks are zero-padded to whole steps (kStep = two vectors), which is at
// most kChunk; the extra step is slack.
constexpr int64_t kBuf = kChunk + kStep;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One (R, C) input: rows at `row_stride` elements, columns at `col_stride` (1, or 0 for a broadcast).
struct Rows {
  const char* data;
  int64_t row_stride, col_stride;
  at::ScalarType dtype;
  int64_t elem_size;

  explicit Rows(const at::Tensor& t)
      : data(static_cast<const char*>(t.const_data_ptr())),
        row_stride(t.size(0) > 1 ? t.stride(0) : 0),
        col_stride(t.size(1) > 1 ? t.stride(1) : 1),
        dtype(t.scalar_type()),
        elem_size(int64_t(t.element_size())) {}

  const char* at(int64_t row, int64_t col) const { return data + (row * row_stride + col * col_stride) * elem_size; }
};

template <typename T>
inline void widen(const T* p, int64_t stride, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, bool>) {
    // A bool mask, the common case: bytes 0/1 zero-extended and converted a vector at a time (the
    // compiler does not vectorize bool -> float, and the scalar loop cost a quarter of a loss pass).
    if (stride == 1) {
      const auto* b = reinterpret_cast<const uint8_t*>(p);
      int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
      for (; k + 16 <= n; k += 16) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k));
        _mm512_storeu_ps(buf + k, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)));
      }
#elif defined(CPU_CAPABILITY_AVX2)
      for (; k + 8 <= n; k += 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + k));
        _mm256_storeu_ps(buf + k, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
      }
#endif
      for (; k < n; ++k) buf[k] = b[k] != 0 ? 1.f : 0.f;
      return;
    }
  }
  if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
    if (stride == 1) {
      int64_t k = 0;
      for (; k + kStep <= n; k += kStep) {
        Vec a, b;
        load2(p + k, kStep, a, b);
        a.store(buf + k);
        b.store(buf + k + Vec::size());
      }
      for (; k < n; ++k) buf[k] = float(p[k]);
      return;
    }
  }
  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) buf[k] = float(p[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = float(p[k * stride]);
  }
}

// n (<= kChunk) elements of row `row` of `src` from column `col`, as fp32: in place for a whole
// chunk of a unit-stride fp32 row, else widened into `buf` and zero-padded to whole steps.
inline const float* chunk_as_float(const Rows& src, int64_t row, int64_t col, int64_t n, float* buf) {
  const char* p = src.at(row, col);
  if (src.dtype == at::kFloat && src.col_stride == 1 && n == kChunk) return reinterpret_cast<const float*>(p);
  switch (src.dtype) {
    case at::kFloat:
      widen(reinterpret_cast<const float*>(p), src.col_stride, n, buf);
      break;
    case at::kBFloat16:
      widen(reinterpret_cast<const at::BFloat16*>(p), src.col_stride, n, buf);
      break;
    case at::kHalf:
      widen(reinterpret_cast<const at::Half*>(p), src.col_stride, n, buf);
      break;
    case at::kBool:
      widen(reinterpret_cast<const bool*>(p), src.col_stride, n, buf);
      break;
    default:
      TORCH_CHECK(false, "rlhf_fast: unsupported dtype ", src.dtype, " (checked by the host code)");
  }
  std::fill(buf + n, buf + round_up(n, kStep), 0.f);
  return buf;
}

// Tiles of a (rows, cols) problem and the grain that gives each task >= kGrainElements elements.
struct Tiling {
  int64_t rows, cols, per_row, count, grain;
  Tiling(int64_t rows_, int64_t cols_, int64_t tile)
      : rows(rows_), cols(cols_), per_row(cols_ > 0 ? (cols_ + tile - 1) / tile : 0), count(rows_ * per_row),
        grain(std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, std::min(cols_, tile)))) {}
};

inline float lane_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}
inline float lane_min(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, v);
}
inline float lane_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// ---------------------------------------------------------------------------------------------
// kl_penalty

template <int kEstimator>
void kl_penalty_fwd_impl(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, float clamp, float cap,
                         at::Tensor& kl, at::Tensor* dkl) {
  const Rows lp(logprobs), ref(ref_logprobs);
  const Tiling tiles(logprobs.size(0), logprobs.size(1), kTile);
  float* out = kl.data_ptr<float>();
  float* out_d = dkl != nullptr ? dkl->data_ptr<float>() : nullptr;
  at::parallel_for(0, tiles.count, tiles.grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf_lp[kBuf], buf_ref[kBuf];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row = tile / tiles.per_row, c0 = (tile % tiles.per_row) * kTile;
      const int64_t c1 = std::min(tiles.cols, c0 + kTile);
      for (int64_t j0 = c0; j0 < c1; j0 += kChunk) {
        const int64_t n = std::min(kChunk, c1 - j0);
        const float* a = chunk_as_float(lp, row, j0, n, buf_lp);
        const float* b = chunk_as_float(ref, row, j0, n, buf_ref);
        const int64_t at = row * tiles.cols + j0;
        for (int64_t k = 0; k < n; k += Vec::size()) {
          const int count = int(std::min<int64_t>(Vec::size(), n - k));
          Vec v, dv;
          ppo::kl_token<PpoVecOps, kEstimator>(Vec::loadu(a + k) - Vec::loadu(b + k), clamp, v, dv, cap);
          v.store(out + at + k, count);
          if (out_d != nullptr) dv.store(out_d + at + k, count);
        }
      }
    }
  });
}

template <typename Fn>
void dispatch_estimator(int64_t estimator, const Fn& fn) {
  switch (estimator) {
    case ppo::kK1:
      fn(std::integral_constant<int, ppo::kK1>{});
      break;
    case ppo::kAbs:
      fn(std::integral_constant<int, ppo::kAbs>{});
      break;
    case ppo::kK2:
      fn(std::integral_constant<int, ppo::kK2>{});
      break;
    case ppo::kK3:
      fn(std::integral_constant<int, ppo::kK3>{});
      break;
    default:
      TORCH_CHECK_VALUE(false, "estimator: unknown code ", estimator);
  }
}

inline void kl_penalty_fwd_kernel(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t estimator,
                                  float clamp, float cap, at::Tensor& kl, at::Tensor* dkl) {
  dispatch_estimator(estimator, [&](auto est) {
    kl_penalty_fwd_impl<decltype(est)::value>(logprobs, ref_logprobs, clamp, cap, kl, dkl);
  });
}

// ---------------------------------------------------------------------------------------------
// ppo_policy_loss

inline void ppo_policy_partials_kernel(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                       const at::Tensor& advantages, const at::Tensor& mask, float ratio_low,
                                       float ratio_high, float dual_clip, float log_ratio_clamp, bool cispo,
                                       int64_t tile_len, float* partials, float* token_grad) {
  const Rows lp(logprobs), old(old_logprobs), adv(advantages), msk(mask);
  const Tiling tiles(logprobs.size(0), logprobs.size(1), tile_len);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, tiles.count, tiles.grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[4][kBuf];
    const Vec zero(0.f), pinf(kInf), ninf(-kInf);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row = tile / tiles.per_row, c0 = (tile % tiles.per_row) * tile_len;
      const int64_t c1 = std::min(tiles.cols, c0 + tile_len);
      Vec s_loss(0.f), s_count(0.f), s_clipped(0.f), s_dual(0.f), s_k3(0.f), s_ratio(0.f), r_min(kInf),
          r_max(-kInf);
      for (int64_t j0 = c0; j0 < c1; j0 += kChunk) {
        const int64_t n = std::min(kChunk, c1 - j0);
        const float* pl = chunk_as_float(lp, row, j0, n, buf[0]);
        const float* po = chunk_as_float(old, row, j0, n, buf[1]);
        const float* pa = chunk_as_float(adv, row, j0, n, buf[2]);
        const float* pm = chunk_as_float(msk, row, j0, n, buf[3]);
        float* tg = token_grad != nullptr ? token_grad + row * tiles.cols + j0 : nullptr;
        for (int64_t k = 0; k < n; k += Vec::size()) {
          const Vec m = Vec::loadu(pm + k);
          const Vec valid = m != zero;
          // masked positions become zeros: whatever they hold cannot reach a sum or the gradient
          const auto t = ppo::policy_token<PpoVecOps>(Vec::blendv(zero, Vec::loadu(pl + k), valid),
                                                      Vec::blendv(zero, Vec::loadu(po + k), valid),
                                                      Vec::blendv(zero, Vec::loadu(pa + k), valid), ratio_low,
                                                      ratio_high, dual_clip, log_ratio_clamp, cispo);
          s_loss = at::vec::fmadd(m, t.loss, s_loss);
          s_count = s_count + m;
          s_clipped = at::vec::fmadd(m, t.clipped, s_clipped);
          s_dual = at::vec::fmadd(m, t.dual, s_dual);
          s_k3 = at::vec::fmadd(m, t.k3, s_k3);
          s_ratio = at::vec::fmadd(m, t.ratio, s_ratio);
          r_min = at::vec::minimum(r_min, Vec::blendv(pinf, t.ratio, valid));
          r_max = at::vec::maximum(r_max, Vec::blendv(ninf, t.ratio, valid));
          if (tg != nullptr) (m * t.grad).store(tg + k, int(std::min<int64_t>(Vec::size(), n - k)));
        }
      }
      float* out = partials + tile * ppo::kPolicyPartials;
      out[ppo::kPolLoss] = lane_sum(s_loss);
      out[ppo::kPolCount] = lane_sum(s_count);
      out[ppo::kPolClipped] = lane_sum(s_clipped);
      out[ppo::kPolDual] = lane_sum(s_dual);
      out[ppo::kPolK3] = lane_sum(s_k3);
      out[ppo::kPolRatio] = lane_sum(s_ratio);
      out[ppo::kPolRatioMin] = lane_min(r_min);
      out[ppo::kPolRatioMax] = lane_max(r_max);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// value_loss

// Moments of R and of R - v over a tile are computed chunk by chunk in two passes over the
// L1-resident chunk (sums, then squared deviations from the chunk mean) and merged across chunks
// with Chan's formula (ppo::merge_moments): no E[x^2] - E[x]^2 cancellation, no division per element.
inline void value_partials_kernel(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                                  const at::Tensor& mask, float clip_eps, int64_t tile_len, float* partials,
                                  float* token_grad) {
  const Rows val(values), old(old_values), ret(returns), msk(mask);
  const Tiling tiles(values.size(0), values.size(1), tile_len);
  at::parallel_for(0, tiles.count, tiles.grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[4][kBuf];
    const Vec zero(0.f);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row = tile / tiles.per_row, c0 = (tile % tiles.per_row) * tile_len;
      const int64_t c1 = std::min(tiles.cols, c0 + tile_len);
      Vec s_loss(0.f), s_clipped(0.f);
      ppo::Moments mom_ret{0, 0, 0}, mom_err{0, 0, 0};
      for (int64_t j0 = c0; j0 < c1; j0 += kChunk) {
        const int64_t n = std::min(kChunk, c1 - j0);
        const float* pv = chunk_as_float(val, row, j0, n, buf[0]);
        const float* po = chunk_as_float(old, row, j0, n, buf[1]);
        const float* pr = chunk_as_float(ret, row, j0, n, buf[2]);
        const float* pm = chunk_as_float(msk, row, j0, n, buf[3]);
        float* tg = token_grad != nullptr ? token_grad + row * tiles.cols + j0 : nullptr;
        Vec c_count(0.f), c_ret(0.f), c_err(0.f);
        for (int64_t k = 0; k < n; k += Vec::size()) {
          const Vec m = Vec::loadu(pm + k);
          const Vec valid = m != zero;
          const Vec v = Vec::blendv(zero, Vec::loadu(pv + k), valid);
          const Vec r = Vec::blendv(zero, Vec::loadu(pr + k), valid);
          const auto t = ppo::value_token<PpoVecOps>(v, Vec::blendv(zero, Vec::loadu(po + k), valid), r, clip_eps);
          s_loss = at::vec::fmadd(m, t.loss, s_loss);
          s_clipped = at::vec::fmadd(m, t.clipped, s_clipped);
          c_count = c_count + m;
          c_ret = at::vec::fmadd(m, r, c_ret);
          c_err = at::vec::fmadd(m, r - v, c_err);
          if (tg != nullptr) (m * t.grad).store(tg + k, int(std::min<int64_t>(Vec::size(), n - k)));
        }
        const float count = lane_sum(c_count);
        if (!(count != 0.f)) continue;
        const float mean_ret = lane_sum(c_ret) / count, mean_err = lane_sum(c_err) / count;
        const Vec mr(mean_ret), me(mean_err);
        Vec c_m2_ret(0.f), c_m2_err(0.f);
        for (int64_t k = 0; k < n; k += Vec::size()) {
          const Vec m = Vec::loadu(pm + k);
          const Vec valid = m != zero;
          const Vec r = Vec::loadu(pr + k);
          const Vec dr = Vec::blendv(zero, r - mr, valid);
          const Vec de = Vec::blendv(zero, r - Vec::loadu(pv + k) - me, valid);
          c_m2_ret = at::vec::fmadd(m * dr, dr, c_m2_ret);
          c_m2_err = at::vec::fmadd(m * de, de, c_m2_err);
        }
        mom_ret = ppo::merge_moments(mom_ret, ppo::Moments{count, mean_ret, lane_sum(c_m2_ret)});
        mom_err = ppo::merge_moments(mom_err, ppo::Moments{count, mean_err, lane_sum(c_m2_err)});
      }
      float* out = partials + tile * ppo::kValuePartials;
      out[ppo::kValLoss] = lane_sum(s_loss);
      out[ppo::kValCount] = float(mom_ret.n);
      out[ppo::kValClipped] = lane_sum(s_clipped);
      out[ppo::kValRetMean] = float(mom_ret.mean);
      out[ppo::kValRetM2] = float(mom_ret.m2);
      out[ppo::kValErrMean] = float(mom_err.mean);
      out[ppo::kValErrM2] = float(mom_err.m2);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace rlhf_fast::cpu

RLHF_FAST_REGISTER_CPU_KERNEL(kl_penalty_fwd, kl_penalty_fwd_kernel)
RLHF_FAST_REGISTER_CPU_KERNEL(ppo_policy_partials, ppo_policy_partials_kernel)
RLHF_FAST_REGISTER_CPU_KERNEL(value_partials, value_partials_kernel)
