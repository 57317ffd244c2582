// CPU kernel of gae, compiled once per SIMD capability (see csrc/cpu/dispatch.h).
//
// One task per run of whole sequences (at::parallel_for over sequences). A sequence is one backward
// walk of the recursion of rlhf_fast/gae_math.h (gae::step, which the CUDA lanes run too); each step
// depends on the one after it, so the parallelism is across sequences:
//   - groups of kGaeTile = Vec::size() consecutive sequences of one length (every group of the padded
//     form; equal-length runs of the packed form) are walked with one SIMD lane per sequence, through
//     kGaeTile x kGaeTile transposed tiles (gae_walk_tiled);
//   - other runs of kGaeLanes equal-length sequences are walked as interleaved scalar lanes, whose
//     dependency chains overlap; the rest one by one.
// Selects are branch-free (BlendSelect): masks with holes make a branch unpredictable.
// Whitening: each walked sequence's moments by two SIMD passes over its advantages while they are in
// cache (exact two-pass mean and variance, fp64 across blocks), Chan's merge across sequences in
// sequence order (deterministic whatever the thread count), then one SIMD pass over the advantages.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <rlhf_fast/gae_math.h>

#include "gae.h"
#include "register_kernel.h"
#include "vec_utils.h"

#include <algorithm>
#include <vector>

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

// Positions per parallel task, at least.
constexpr int64_t kGaeGrain = 1 << 14;
// Sequences walked together by one thread.
constexpr int kGaeLanes = 4;
// Positions whose whitening sums are added in fp32 SIMD lanes before they are added in fp64.
constexpr int64_t kGaeBlock = 2048;

// Branch-free select of one float (the walk's mask is unpredictable when it has holes; a mispredicted
// branch costs more than the whole step).
struct BlendSelect {
  static inline float pick(bool c, float a, float b) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const __m128 mask = _mm_castsi128_ps(_mm_cvtsi32_si128(-int32_t(c)));
    return _mm_cvtss_f32(_mm_blendv_ps(_mm_set_ss(b), _mm_set_ss(a), mask));
#else
    return c ? a : b;
#endif
  }
};

// Lane-wise select of SIMD vectors by a lane mask (all-ones lanes where set).
struct VecSelect {
  static inline Vec pick(const Vec& mask, const Vec& a, const Vec& b) { return Vec::blendv(b, a, mask); }
};

// The arrays every lane of a walk reads and writes.
template <typename T>
struct GaeArrays {
  const T* r;
  const T* v;
  const bool* m;
  float* adv;
  float* ret;
};

// One sequence of a walk: its offset and its carry, in a plain local object per lane (never in an
// array indexed by the lane) so that the compiler keeps it in registers across the interleaved steps.
struct GaeLane {
  int64_t start;
  gae::Carry carry = gae::end_of_sequence();

  template <typename T>
  __attribute__((always_inline)) inline void step(const GaeArrays<T>& x, int64_t t, float gamma, float gamma_lam) {
    const int64_t i = start + t;
    const bool valid = x.m[i];
    const float value = float(x.v[i]);
    const float a = gae::step<BlendSelect>(carry, float(x.r[i]), value, valid, gamma, gamma_lam);
    x.adv[i] = a;
    x.ret[i] = BlendSelect::pick(valid, a + value, 0.f);
  }
};

// Walks the lanes (sequences of one length) backwards together, one position of each per step.
template <typename T, typename... Lanes>
inline void gae_walk(const GaeArrays<T>& x, int64_t len, float gamma, float gamma_lam, Lanes&... lanes) {
  for (int64_t t = len - 1; t >= 0; --t) (lanes.step(x, t, gamma, gamma_lam), ...);
}

// A group of kGaeTile = Vec::size() consecutive sequences of one length `len` is a dense (kGaeTile, len)
// block of the packed arrays (padded rows, or equal-length packed sequences). It is walked with one
// SIMD lane per sequence: tiles of kGaeTile positions x kGaeTile sequences are transposed into registers'
// order (at::vec::transpose_mxn, through an L1-resident tile), the kGaeTile steps run on whole vectors
// (the same formula as gae::step, selects by mask), and the advantage and return tiles are
// transposed back. The positions before the last whole tile (len % kGaeTile of them) are walked by
// scalar lanes from the SIMD carries.
constexpr int kGaeTile = Vec::size();

// Loads the (kGaeTile sequences x kGaeTile positions) block at src (row stride ld) as floats, transposed:
// tile[c * kGaeTile + l] = src[l * ld + c].
template <typename T>
inline void load_tile(const T* src, int64_t ld, float* tile, float* stage) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float, kGaeTile, kGaeTile>(src, ld, tile, kGaeTile);
  } else {
    for (int l = 0; l < kGaeTile; ++l) {
      for (int c = 0; c < kGaeTile; ++c) stage[l * kGaeTile + c] = float(src[l * ld + c]);
    }
    at::vec::transpose_mxn<float, kGaeTile, kGaeTile>(stage, kGaeTile, tile, kGaeTile);
  }
}

// The mask of a tile as per-position lane masks: column(c) selects the lanes (sequences) whose position
// t0 + c is valid. AVX-512 and AVX2 keep one bit per (sequence, position) and test a column in one or
// two instructions; the portable build stages the bytes as floats and transposes them like the data.
#if defined(CPU_CAPABILITY_AVX512)
static_assert(kGaeTile == 16, "AVX-512 tiles are 16 x 16");
struct TileMask {
  __m256i rows;  // 16 x 16 bits: bit c of row l = position c of sequence l is valid

  void load(const uint8_t* keep, int64_t ld) {
    alignas(32) uint16_t bits[16];
    for (int l = 0; l < 16; ++l) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + l * ld));
      bits[l] = _mm_test_epi8_mask(b, b);
    }
    rows = _mm256_load_si256(reinterpret_cast<const __m256i*>(bits));
  }
  __mmask16 column(int c) const { return _mm256_test_epi16_mask(rows, _mm256_set1_epi16(short(1 << c))); }
};
struct TileSelect {
  static inline Vec pick(__mmask16 lanes, const Vec& a, const Vec& b) {
    return Vec(_mm512_mask_blend_ps(lanes, b, a));
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
static_assert(kGaeTile == 8, "AVX2 tiles are 8 x 8");
struct TileMask {
  __m256i rows;  // 8 x 32 bits: bit c of row l = position c of sequence l is valid

  void load(const uint8_t* keep, int64_t ld) {
    alignas(32) int32_t bits[8];
    for (int l = 0; l < 8; ++l) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep + l * ld));  // 8 bytes, rest 0
      bits[l] = ~_mm_movemask_epi8(_mm_cmpeq_epi8(b, _mm_setzero_si128())) & 0xff;
    }
    rows = _mm256_load_si256(reinterpret_cast<const __m256i*>(bits));
  }
  Vec column(int c) const {
    const __m256i bit = _mm256_set1_epi32(1 << c);
    return Vec(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(rows, bit), bit)));
  }
};
using TileSelect = VecSelect;
#else
struct TileMask {
  alignas(64) float cols[kGaeTile * kGaeTile];  // cols[c * kGaeTile + l] = 1 where valid, else 0

  void load(const uint8_t* keep, int64_t ld) {
    alignas(64) float stage[kGaeTile * kGaeTile];
    for (int l = 0; l < kGaeTile; ++l) {
      for (int c = 0; c < kGaeTile; ++c) stage[l * kGaeTile + c] = float(keep[l * ld + c]);
    }
    at::vec::transpose_mxn<float, kGaeTile, kGaeTile>(stage, kGaeTile, cols, kGaeTile);
  }
  Vec column(int c) const { return Vec::loadu(cols + c * kGaeTile) > Vec(0.5f); }
};
using TileSelect = VecSelect;
#endif

template <typename T>
void gae_walk_tiled(const GaeArrays<T>& x, int64_t start, int64_t len, float gamma, float gamma_lam) {
  constexpr int kArea = kGaeTile * kGaeTile;
  alignas(64) float tr[kArea], tv[kArea], stage[kArea];
  const uint8_t* keep = reinterpret_cast<const uint8_t*>(x.m);
  const Vec g(gamma), gl(gamma_lam), zero(0.f);
  gae::CarryOf<Vec> carry{zero, zero};  // one sequence per lane
  TileMask mask;
  int64_t t0 = len;
  while (t0 >= kGaeTile) {
    t0 -= kGaeTile;
    const int64_t at = start + t0;  // position t0 of the group's first sequence
    load_tile(x.r + at, len, tr, stage);
    load_tile(x.v + at, len, tv, stage);
    mask.load(keep + at, len);
    for (int c = kGaeTile - 1; c >= 0; --c) {  // tr, tv become the advantage and return tiles in place
      const Vec rew = Vec::loadu(tr + c * kGaeTile), val = Vec::loadu(tv + c * kGaeTile);
      const auto valid = mask.column(c);
      const Vec a = gae::step<TileSelect>(carry, rew, val, valid, g, gl);
      a.store(tr + c * kGaeTile);
      TileSelect::pick(valid, a + val, zero).store(tv + c * kGaeTile);
    }
    at::vec::transpose_mxn<float, kGaeTile, kGaeTile>(tr, kGaeTile, x.adv + at, len);
    at::vec::transpose_mxn<float, kGaeTile, kGaeTile>(tv, kGaeTile, x.ret + at, len);
  }
  if (t0 == 0) return;
  alignas(64) float ca[kGaeTile], cv[kGaeTile];
  carry.adv.store(ca);
  carry.value.store(cv);
  for (int l = 0; l < kGaeTile; ++l) {
    GaeLane lane{start + l * len, gae::Carry{ca[l], cv[l]}};
    gae_walk(x, t0, gamma, gamma_lam, lane);
  }
}

// Moments of the valid advantages of one sequence just walked (still in cache): two SIMD passes,
// the exact mean first, then the squared deviations from it. Advantages at masked positions are
// exactly 0, so the first pass needs no mask; the second multiplies by the mask byte (0 or 1).
inline gae::Moments<double> sequence_moments(const float* __restrict__ a, const bool* m, int64_t len) {
  const uint8_t* __restrict__ keep = reinterpret_cast<const uint8_t*>(m);
  double sum = 0.0, n = 0.0;
  for (int64_t b = 0; b < len; b += kGaeBlock) {
    const int64_t e = std::min(len, b + kGaeBlock);
    float s = 0.f;
    int32_t c = 0;
#pragma omp simd reduction(+ : s, c)
    for (int64_t i = b; i < e; ++i) {
      s += a[i];
      c += keep[i];
    }
    sum += s;
    n += c;
  }
  if (n == 0.0) return gae::no_moments<double>();
  const double mean = sum / n;
  const float mu = float(mean);
  double m2 = 0.0;
  for (int64_t b = 0; b < len; b += kGaeBlock) {
    const int64_t e = std::min(len, b + kGaeBlock);
    float q = 0.f;
#pragma omp simd reduction(+ : q)
    for (int64_t i = b; i < e; ++i) {
      const float d = (a[i] - mu) * float(keep[i]);
      q += d * d;
    }
    m2 += q;
  }
  const double off = double(mu) - mean;  // deviations were taken from mu, the fp32 rounding of the mean
  return gae::Moments<double>{n, mean, std::max(m2 - n * off * off, 0.0)};
}

template <typename T>
void gae_sequences(const T* r, const T* v, const bool* m, const int64_t* cu, int64_t begin, int64_t end, float gamma,
                   float gamma_lam, float* adv, float* ret, gae::Moments<double>* moments) {
  static_assert(kGaeLanes == 4, "the interleaved walk below names its four lanes");
  const GaeArrays<T> x{r, v, m, adv, ret};
  const auto same_length = [&](int64_t s, int64_t count) {
    const int64_t len = cu[s + 1] - cu[s];
    for (int64_t l = 1; l < count; ++l) {
      if (cu[s + l + 1] - cu[s + l] != len) return false;
    }
    return true;
  };
  int64_t s = begin;
  // Groups of kGaeTile sequences of one length (every group of the padded form): SIMD across sequences.
  while (s + kGaeTile <= end && same_length(s, kGaeTile)) {
    const int64_t len = cu[s + 1] - cu[s];
    gae_walk_tiled(x, cu[s], len, gamma, gamma_lam);
    for (int l = 0; moments != nullptr && l < kGaeTile; ++l) {
      moments[s + l] = sequence_moments(adv + cu[s + l], m + cu[s + l], len);
    }
    s += kGaeTile;
  }
  // Runs of kGaeLanes consecutive sequences of one length go together.
  while (s + kGaeLanes <= end) {
    if (!same_length(s, kGaeLanes)) break;
    const int64_t len = cu[s + 1] - cu[s];
    GaeLane a{cu[s]}, b{cu[s + 1]}, c{cu[s + 2]}, d{cu[s + 3]};
    gae_walk(x, len, gamma, gamma_lam, a, b, c, d);
    for (int l = 0; moments != nullptr && l < kGaeLanes; ++l) {
      moments[s + l] = sequence_moments(adv + cu[s + l], m + cu[s + l], len);
    }
    s += kGaeLanes;
  }
  for (; s < end; ++s) {
    const int64_t len = cu[s + 1] - cu[s];
    GaeLane a{cu[s]};
    gae_walk(x, len, gamma, gamma_lam, a);
    if (moments != nullptr) moments[s] = sequence_moments(adv + cu[s], m + cu[s], len);
  }
}

template <typename T>
void gae_fwd_impl(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                  const at::Tensor& cu_seqlens, float gamma, float lam, bool whiten, at::Tensor& advantages,
                  at::Tensor& returns) {
  const int64_t n_seq = cu_seqlens.size(0) - 1, total = rewards.size(0);
  const T* r = rewards.const_data_ptr<T>();
  const T* v = values.const_data_ptr<T>();
  const bool* m = mask.const_data_ptr<bool>();
  const int64_t* cu = cu_seqlens.const_data_ptr<int64_t>();
  float* adv = advantages.data_ptr<float>();
  float* ret = returns.data_ptr<float>();
  const float gamma_lam = gamma * lam;
  std::vector<gae::Moments<double>> moments(whiten ? n_seq : 0);
  gae::Moments<double>* mom = moments.data();

  const int64_t mean_len = std::max<int64_t>(1, total / std::max<int64_t>(n_seq, 1));
  // Whole SIMD groups per task: a multiple of kGaeTile sequences.
  const int64_t grain = (std::max<int64_t>(kGaeTile, kGaeGrain / mean_len) + kGaeTile - 1) / kGaeTile * kGaeTile;
  at::parallel_for(0, n_seq, grain, [&](int64_t begin, int64_t end) {
    gae_sequences<T>(r, v, m, cu, begin, end, gamma, gamma_lam, adv, ret, whiten ? mom : nullptr);
  });
  if (!whiten) return;

  // Batch moments in a fixed order (deterministic whatever the thread count), then one pass.
  gae::Moments<double> all = gae::no_moments<double>();
  for (int64_t s = 0; s < n_seq; ++s) all = gae::merge(all, moments[s]);
  if (all.n == 0) return;  // no valid token: the advantages are all 0 already
  const float mean = float(all.mean), rstd = float(gae::whiten_rstd(all));
  const uint8_t* keep = reinterpret_cast<const uint8_t*>(m);
  at::parallel_for(0, total, kGaeGrain, [&](int64_t begin, int64_t end) {
    float* __restrict__ a = adv;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) a[i] = (a[i] - mean) * rstd * float(keep[i]);  // masked stay 0
  });
}

inline void gae_fwd_kernel(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                           const at::Tensor& cu_seqlens, float gamma, float lam, bool whiten, at::Tensor& advantages,
                           at::Tensor& returns) {
  RLHF_FAST_DISPATCH_FLOAT_TYPES(rewards.scalar_type(), "gae_fwd", [&] {
    gae_fwd_impl<scalar_t>(rewards, values, mask, cu_seqlens, gamma, lam, whiten, advantages, returns);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace rlhf_fast::cpu

RLHF_FAST_REGISTER_CPU_KERNEL(gae_fwd, gae_fwd_kernel)
