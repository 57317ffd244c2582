// CPU kernel of gae, compiled once per SIMD capability (see csrc/cpu/dispatch.h).
//
// Each sequence is walked backwards along its own contiguous memory, one block of kGaeWidth
// consecutive positions per step, four sequences interleaved block by block (twenty streams, each
// read or written in order). With AVX-512 (16 lanes) and AVX2 (8 lanes) a block is the recursion of
// rlhf_fast/gae_math.h in its parallel form, inside one register:
//   1. V' (the value at the next valid position) of every lane: the index of the next valid lane by
//      a suffix-min scan over lane indices (log2 W shifts), then one permute of the values; lanes with
//      no later valid lane in the block take the carry's value;
//   2. A: x_t = d_t + k_t * x_{t+1} with (d, k) = (delta_t, gamma * lam) at valid positions and
//      (0, 1) at masked ones (gae::Map once V' is known: a masked position is the identity), an
//      inclusive scan in log2 W steps; the carry's advantage enters through the product of the k's;
//   3. the carries of the block before: A at lane 0 (a masked lane passes the carry through), V at
//      the first valid lane (the carry's value when there is none).
// Only the carry crosses blocks (an FMA and a broadcast of latency per block), which the interleaved
// sequences hide. The portable build walks each block with gae::step, the sequential form. Blocks
// are aligned to the outputs: a sequence's positions after its last block boundary, and its first
// left % W positions, go through a padded block whose extra lanes are masked (they pass the carry
// through). Sequences of any lengths share the interleave: the four of a group are ordered longest
// first and the shortest leaves the interleave first.
//
// Why not one SIMD lane per sequence (W sequences walked together through transposed W x W tiles,
// the kernel before this one): measured at (256, 2048) fp32 from a flushed cache, one thread, it took
// 0.58 ms against 0.32-0.44 ms for this walk and 0.25 ms for a plain copy of the same bytes, and
// 0.45 ms even from a warm cache. The tiles touch W rows at once, 8 KB apart: for each tile, 4W lines
// of one L1 set (a transposed copy alone, without any GAE math, took 0.34 ms warm against 0.10 ms
// for a straight copy).
//
// Stores: outputs of kGaeStreamMin positions or more are written with streaming stores (a plain
// store first reads the line it writes: a third of the traffic; 0.41 -> 0.33 ms cold at (256, 2048)
// fp32), except the advantages when the whitening pass reads them again.
//
// Whitening: each sequence's moments by two SIMD passes over its advantages right after its walk
// (still in L1/L2; exact two-pass mean and variance, fp64 across blocks), Chan's merge across
// sequences in sequence order (deterministic whatever the thread count), then one pass over the
// advantages.
//
// Threads: the walk takes whole chunks of sequences per task of at::parallel_for from inputs of
// kGaeThreadsMin positions up, one thread below (waking a helper costs about what it saves there). The
// whitening pass, a plain element-wise loop, takes one task per kGaeGrain positions.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <rlhf_fast/gae_math.h>

#include "gae.h"
#include "register_kernel.h"
#include "vec_utils.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

// Positions per parallel task of the whitening pass, at least (see "Threads" above).
constexpr int64_t kGaeGrain = int64_t{1} << 20;
// The walk: tasks of this many positions (whole sequences), from inputs of kGaeThreadsMin positions up;
// one thread below. Waking a helper costs about what it saves below that size: (256, 512) fp32 took
// 0.17 ms from cold caches with a helper and 0.12-0.13 ms without (warm: 0.07-0.09 vs 0.07); at
// (256, 1024) the two are level.
constexpr int64_t kGaeChunk = int64_t{1} << 16;
constexpr int64_t kGaeThreadsMin = int64_t{1} << 18;
// Positions whose whitening sums are added in fp32 SIMD lanes before they are added in fp64.
constexpr int64_t kGaeBlock = 2048;
// Outputs of at least this many positions each (1 MB, a core's L2) are written with streaming stores
// (see "Stores" above).
constexpr int64_t kGaeStreamMin = int64_t{1} << 18;

// Which outputs a block writes with streaming (non-temporal) stores.
enum class GaeStores { kPlain, kStreamReturns, kStreamBoth };

#if defined(CPU_CAPABILITY_AVX512)
// ------------------------------------------------------------------------------------------------
// AVX-512: 16 positions per block.
constexpr int kGaeWidth = 16;

// Advantage and value at the next valid position, broadcast to every lane.
struct GaeCarry {
  __m512 adv = _mm512_setzero_ps();
  __m512 value = _mm512_setzero_ps();
};

// 16 consecutive elements as fp32.
template <typename T>
inline __m512 load_block(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
  } else {
    static_assert(std::is_same_v<T, at::Half>);
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// Lane i <- x[i + S]; the top S lanes <- fill.
template <int S>
inline __m512 shift_down(__m512 x, __m512 fill) {
  return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(fill), _mm512_castps_si512(x), S));
}

// A streaming store needs a 64-byte aligned address: the walk aligns its whole blocks.
template <bool kStream>
inline void store_block(float* p, __m512 x) {
  if constexpr (kStream) _mm512_stream_ps(p, x); else _mm512_storeu_ps(p, x);
}

template <typename T, GaeStores kStores = GaeStores::kPlain>
__attribute__((always_inline)) inline void gae_block(const T* r, const T* v, const uint8_t* m, float* adv, float* ret,
                                                     GaeCarry& c, float gamma, float gamma_lam) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
  const __mmask16 valid = _mm_test_epi8_mask(bytes, bytes);
  const __m512 rew = load_block(r), val = load_block(v);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i none = _mm512_set1_epi32(16), first_lane = _mm512_setzero_si512();
  // next[i]: the first valid lane after lane i, 16 (the carry) when none.
  __m512i next = _mm512_alignr_epi32(none, _mm512_mask_blend_epi32(valid, none, lane), 1);
  next = _mm512_min_epi32(next, _mm512_alignr_epi32(none, next, 1));
  next = _mm512_min_epi32(next, _mm512_alignr_epi32(none, next, 2));
  next = _mm512_min_epi32(next, _mm512_alignr_epi32(none, next, 4));
  next = _mm512_min_epi32(next, _mm512_alignr_epi32(none, next, 8));
  const __m512 next_value = _mm512_permutex2var_ps(val, next, c.value);  // index 16: lane 0 of the carry
  // x_t = d_t + k_t * x_{t+1}, scanned: lane t ends as the map of positions t..15 of the block.
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  __m512 d = _mm512_maskz_sub_ps(valid, _mm512_fmadd_ps(_mm512_set1_ps(gamma), next_value, rew), val);
  __m512 k = _mm512_mask_blend_ps(valid, one, _mm512_set1_ps(gamma_lam));
  d = _mm512_fmadd_ps(k, shift_down<1>(d, zero), d);
  k = _mm512_mul_ps(k, shift_down<1>(k, one));
  d = _mm512_fmadd_ps(k, shift_down<2>(d, zero), d);
  k = _mm512_mul_ps(k, shift_down<2>(k, one));
  d = _mm512_fmadd_ps(k, shift_down<4>(d, zero), d);
  k = _mm512_mul_ps(k, shift_down<4>(k, one));
  d = _mm512_fmadd_ps(k, shift_down<8>(d, zero), d);
  k = _mm512_mul_ps(k, shift_down<8>(k, one));
  const __m512 a = _mm512_fmadd_ps(k, c.adv, d);
  store_block<kStores == GaeStores::kStreamBoth>(adv, _mm512_maskz_mov_ps(valid, a));
  store_block<kStores != GaeStores::kPlain>(ret, _mm512_maskz_add_ps(valid, a, val));
  c.adv = _mm512_permutexvar_ps(first_lane, a);
  // the first valid lane of the block: 0 if lane 0 is valid, else next[0]
  const __m512i first = _mm512_permutexvar_epi32(first_lane, _mm512_mask_blend_epi32(valid, next, lane));
  c.value = _mm512_permutex2var_ps(val, first, c.value);
}

#elif defined(CPU_CAPABILITY_AVX2)
// ------------------------------------------------------------------------------------------------
// AVX2: 8 positions per block, the same steps with 256-bit permutes and blends.
constexpr int kGaeWidth = 8;

struct GaeCarry {
  __m256 adv = _mm256_setzero_ps();
  __m256 value = _mm256_setzero_ps();
};

template <typename T>
inline __m256 load_block(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
  } else {
    static_assert(std::is_same_v<T, at::Half>);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// Lane i <- x[i + S]; the top S lanes <- fill.
template <int S>
inline __m256i shift_down(__m256i x, __m256i fill) {
  const __m256i up = _mm256_setr_epi32(S & 7, (S + 1) & 7, (S + 2) & 7, (S + 3) & 7, (S + 4) & 7, (S + 5) & 7,
                                       (S + 6) & 7, (S + 7) & 7);
  constexpr int kTop = (0xff << (8 - S)) & 0xff;
  return _mm256_blend_epi32(_mm256_permutevar8x32_epi32(x, up), fill, kTop);
}
template <int S>
inline __m256 shift_down(__m256 x, __m256 fill) {
  return _mm256_castsi256_ps(shift_down<S>(_mm256_castps_si256(x), _mm256_castps_si256(fill)));
}

// A streaming store needs a 32-byte aligned address: the walk aligns its whole blocks.
template <bool kStream>
inline void store_block(float* p, __m256 x) {
  if constexpr (kStream) _mm256_stream_ps(p, x); else _mm256_storeu_ps(p, x);
}

template <typename T, GaeStores kStores = GaeStores::kPlain>
__attribute__((always_inline)) inline void gae_block(const T* r, const T* v, const uint8_t* m, float* adv, float* ret,
                                                     GaeCarry& c, float gamma, float gamma_lam) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m));
  const __m256i valid_i = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_setzero_si256());
  const __m256 valid = _mm256_castsi256_ps(valid_i);
  const __m256 rew = load_block(r), val = load_block(v);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), none = _mm256_set1_epi32(8);
  const __m256i first_lane = _mm256_setzero_si256();
  // next[i]: the first valid lane after lane i, 8 (the carry) when none.
  __m256i next = shift_down<1>(_mm256_blendv_epi8(none, lane, valid_i), none);
  next = _mm256_min_epi32(next, shift_down<1>(next, none));
  next = _mm256_min_epi32(next, shift_down<2>(next, none));
  next = _mm256_min_epi32(next, shift_down<4>(next, none));
  const __m256 from_carry = _mm256_castsi256_ps(_mm256_cmpeq_epi32(next, none));
  const __m256 next_value = _mm256_blendv_ps(_mm256_permutevar8x32_ps(val, next), c.value, from_carry);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
  __m256 d = _mm256_and_ps(valid, _mm256_sub_ps(_mm256_fmadd_ps(_mm256_set1_ps(gamma), next_value, rew), val));
  __m256 k = _mm256_blendv_ps(one, _mm256_set1_ps(gamma_lam), valid);
  d = _mm256_fmadd_ps(k, shift_down<1>(d, zero), d);
  k = _mm256_mul_ps(k, shift_down<1>(k, one));
  d = _mm256_fmadd_ps(k, shift_down<2>(d, zero), d);
  k = _mm256_mul_ps(k, shift_down<2>(k, one));
  d = _mm256_fmadd_ps(k, shift_down<4>(d, zero), d);
  k = _mm256_mul_ps(k, shift_down<4>(k, one));
  const __m256 a = _mm256_fmadd_ps(k, c.adv, d);
  store_block<kStores == GaeStores::kStreamBoth>(adv, _mm256_and_ps(valid, a));
  store_block<kStores != GaeStores::kPlain>(ret, _mm256_and_ps(valid, _mm256_add_ps(a, val)));
  c.adv = _mm256_permutevar8x32_ps(a, first_lane);
  const __m256i first = _mm256_permutevar8x32_epi32(_mm256_blendv_epi8(next, lane, valid_i), first_lane);
  c.value = _mm256_blendv_ps(_mm256_permutevar8x32_ps(val, first),
                             c.value, _mm256_castsi256_ps(_mm256_cmpeq_epi32(first, none)));
}

#else
// ------------------------------------------------------------------------------------------------
// Portable build: the sequential recursion over the block's positions.
constexpr int kGaeWidth = 8;

using GaeCarry = gae::Carry;

template <typename T, GaeStores kStores = GaeStores::kPlain>  // plain stores only
inline void gae_block(const T* r, const T* v, const uint8_t* m, float* adv, float* ret, GaeCarry& c, float gamma,
                      float gamma_lam) {
  for (int t = kGaeWidth - 1; t >= 0; --t) {
    const bool valid = m[t] != 0;
    const float value = float(v[t]);
    const float a = gae::step(c, float(r[t]), value, valid, gamma, gamma_lam);
    adv[t] = a;
    ret[t] = valid ? a + value : 0.f;
  }
}
#endif

// The arrays every sequence of a walk reads and writes.
template <typename T>
struct GaeArrays {
  const T* r;
  const T* v;
  const uint8_t* m;
  float* adv;
  float* ret;
};

// One sequence walked backwards, block by block: its positions [at, at + left) are still to walk. A
// plain local object per sequence (never an array indexed by the sequence), so that the compiler keeps
// offsets and carries in registers across the interleaved walks.
template <typename T, GaeStores kStores>
struct GaeSequence {
  int64_t index;  // the sequence's number (-1: none, the padding of a group)
  int64_t at;
  int64_t left;
  GaeCarry carry{};

  __attribute__((always_inline)) inline void block(const GaeArrays<T>& x, float gamma, float gamma_lam) {
    left -= kGaeWidth;
    const int64_t i = at + left;
    gae_block<T, kStores>(x.r + i, x.v + i, x.m + i, x.adv + i, x.ret + i, carry, gamma, gamma_lam);
  }

  // Positions [at + from, at + from + count), count <= kGaeWidth, through a padded block whose lanes
  // past count are masked (they pass the carry through; their outputs are dropped).
  void padded(const GaeArrays<T>& x, int64_t from, int64_t count, float gamma, float gamma_lam) {
    alignas(64) float sr[kGaeWidth] = {}, sv[kGaeWidth] = {}, sa[kGaeWidth], sret[kGaeWidth];
    alignas(64) uint8_t sm[kGaeWidth] = {};
    const int64_t i = at + from;
    for (int64_t t = 0; t < count; ++t) {
      sr[t] = float(x.r[i + t]);
      sv[t] = float(x.v[i + t]);
      sm[t] = x.m[i + t];
    }
    gae_block(sr, sv, sm, sa, sret, carry, gamma, gamma_lam);
    std::memcpy(x.adv + i, sa, size_t(count) * sizeof(float));
    std::memcpy(x.ret + i, sret, size_t(count) * sizeof(float));
  }

  // The positions after the last block boundary of the outputs (the end of the sequence, walked
  // first), so that every whole block is stored aligned: a streaming store needs it, and a plain
  // store then never splits a cache line. Needs outputs aligned to a whole block (checked).
  void start(const GaeArrays<T>& x, float gamma, float gamma_lam) {
    const int64_t tail = std::min<int64_t>(left, (at + left) % kGaeWidth);
    if (tail == 0) return;
    left -= tail;
    padded(x, left, tail, gamma, gamma_lam);
  }

  // The rest: whole blocks, then the first left % kGaeWidth positions.
  void finish(const GaeArrays<T>& x, float gamma, float gamma_lam) {
    while (left >= kGaeWidth) block(x, gamma, gamma_lam);
    if (left > 0) padded(x, 0, left, gamma, gamma_lam);
    left = 0;
  }
};

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

// Sequences [begin, end), four at a time: after their tails, the four are ordered longest first
// and walked interleaved block by block, the shortest leaving the interleave first.
template <typename T, GaeStores kStores>
void gae_sequences(const GaeArrays<T>& x, const bool* m, const int64_t* cu, int64_t begin, int64_t end, float gamma,
                   float gamma_lam, gae::Moments<double>* moments) {
  using Seq = GaeSequence<T, kStores>;
  const auto sequence = [&](int64_t s) {
    return s < end ? Seq{s, cu[s], cu[s + 1] - cu[s]} : Seq{-1, 0, 0};
  };
  const auto longest_first = [](Seq& p, Seq& q) {
    if (p.left < q.left) std::swap(p, q);
  };
  for (int64_t s = begin; s < end; s += 4) {
    Seq a = sequence(s), b = sequence(s + 1), c = sequence(s + 2), d = sequence(s + 3);
    a.start(x, gamma, gamma_lam);
    b.start(x, gamma, gamma_lam);
    c.start(x, gamma, gamma_lam);
    d.start(x, gamma, gamma_lam);
    longest_first(a, b);
    longest_first(c, d);
    longest_first(a, c);
    longest_first(b, d);
    longest_first(b, c);
    while (d.left >= kGaeWidth) {
      a.block(x, gamma, gamma_lam);
      b.block(x, gamma, gamma_lam);
      c.block(x, gamma, gamma_lam);
      d.block(x, gamma, gamma_lam);
    }
    d.finish(x, gamma, gamma_lam);
    while (c.left >= kGaeWidth) {
      a.block(x, gamma, gamma_lam);
      b.block(x, gamma, gamma_lam);
      c.block(x, gamma, gamma_lam);
    }
    c.finish(x, gamma, gamma_lam);
    while (b.left >= kGaeWidth) {
      a.block(x, gamma, gamma_lam);
      b.block(x, gamma, gamma_lam);
    }
    b.finish(x, gamma, gamma_lam);
    a.finish(x, gamma, gamma_lam);
    for (const int64_t i : {a.index, b.index, c.index, d.index}) {
      if (moments != nullptr && i >= 0) moments[i] = sequence_moments(x.adv + cu[i], m + cu[i], cu[i + 1] - cu[i]);
    }
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStores != GaeStores::kPlain) _mm_sfence();  // streaming stores are weakly ordered
#endif
}

template <typename T>
void gae_fwd_impl(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                  const at::Tensor& cu_seqlens, float gamma, float lam, bool whiten, at::Tensor& advantages,
                  at::Tensor& returns) {
  const T* r = rewards.const_data_ptr<T>();
  const T* v = values.const_data_ptr<T>();
  const bool* m = mask.const_data_ptr<bool>();
  const int64_t* cu = cu_seqlens.const_data_ptr<int64_t>();
  float* adv = advantages.data_ptr<float>();
  float* ret = returns.data_ptr<float>();
  const int64_t total = rewards.size(0), n_seq = cu_seqlens.size(0) - 1;
  const float gamma_lam = gamma * lam;
  std::vector<gae::Moments<double>> moments(whiten ? n_seq : 0);
  gae::Moments<double>* mom = moments.data();

  const int64_t mean_len = std::max<int64_t>(1, total / std::max<int64_t>(n_seq, 1));
  const int64_t per_chunk = std::max<int64_t>(4, kGaeChunk / mean_len);  // sequences per chunk, at least
  const int64_t n_chunks = (n_seq + per_chunk - 1) / per_chunk;
  const GaeArrays<T> x{r, v, reinterpret_cast<const uint8_t*>(m), adv, ret};
  const auto walk = [&](auto stores) {
    const auto chunk = [&](int64_t c) {
      const int64_t begin = c * per_chunk, end = std::min(n_seq, begin + per_chunk);
      gae_sequences<T, decltype(stores)::value>(x, m, cu, begin, end, gamma, gamma_lam, whiten ? mom : nullptr);
    };
    if (total < kGaeThreadsMin) {
      for (int64_t c = 0; c < n_chunks; ++c) chunk(c);
    } else {
      at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
        for (int64_t c = first; c < last; ++c) chunk(c);
      });
    }
  };
  // Streaming stores for large outputs aligned to whole blocks; the advantages stay in cache when the
  // whitening pass reads them again.
  constexpr uintptr_t kAlign = kGaeWidth * sizeof(float);
  const bool aligned = reinterpret_cast<uintptr_t>(adv) % kAlign == 0 && reinterpret_cast<uintptr_t>(ret) % kAlign == 0;
  if (!aligned || total < kGaeStreamMin) {
    walk(std::integral_constant<GaeStores, GaeStores::kPlain>{});
  } else if (whiten) {
    walk(std::integral_constant<GaeStores, GaeStores::kStreamReturns>{});
  } else {
    walk(std::integral_constant<GaeStores, GaeStores::kStreamBoth>{});
  }
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
