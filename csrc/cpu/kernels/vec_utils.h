// SIMD helpers shared by the CPU kernels, compiled once per capability like the kernels that
// include them: fp32 vectors, loads and stores of fp32/bf16/fp16 as fp32, the lean exp of the
// softmax math, and the dtype dispatch every kernel uses.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// float32, bfloat16 and float16: the dtypes every kernel accepts (no double: no SIMD path for it).
#define RLHF_FAST_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;

// exp(x) for the arguments the softmax math produces: x <= kSlack (16) or -inf,
// where exp(-inf) must be exactly 0 (it multiplies -FLT_MAX in the entropy sums). Same reduction
// and degree-5 polynomial as ATen's exp_u20 (~1e-6 relative error, far below a log-prob's fp32
// tolerance), without its overflow handling: ~10 vector ops instead of ~19. The forward is bound by
// this exp, so it sets how close the forward gets to one read of the logits.
inline Vec exp_bounded(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using R = __m512;
#define RLHF_OP(name) _mm512_##name
#else
  using R = __m256;
#define RLHF_OP(name) _mm256_##name
#endif
  const R c1 = RLHF_OP(set1_ps)(0.999999701f), c2 = RLHF_OP(set1_ps)(0.499991506f),
          c3 = RLHF_OP(set1_ps)(0.166676521f), c4 = RLHF_OP(set1_ps)(0.0418978221f),
          c5 = RLHF_OP(set1_ps)(0.00828929059f), one = RLHF_OP(set1_ps)(1.f);
#if defined(CPU_CAPABILITY_AVX512)
  // Below -110, 2^n underflows to exactly 0 in scalef; -inf is clamped there too.
  const R v = _mm512_max_ps(x, _mm512_set1_ps(-110.f));
  const R n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  // 2^n is built from exponent bits, valid for n >= -126: clamp there, then zero what was below.
  const R v = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const R n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504089f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  const R r = RLHF_OP(fnmadd_ps)(n, RLHF_OP(set1_ps)(0.693147181f), v);  // x - n ln2, |r| <= ln2 / 2
  R p = RLHF_OP(fmadd_ps)(r, c5, c4);
  p = RLHF_OP(fmadd_ps)(r, p, c3);
  p = RLHF_OP(fmadd_ps)(r, p, c2);
  p = RLHF_OP(fmadd_ps)(r, p, c1);
  p = RLHF_OP(fmadd_ps)(r, p, one);
#undef RLHF_OP
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_scalef_ps(p, n));  // p * 2^n
#else
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const R res = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return Vec(_mm256_and_ps(res, _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ)));
#endif
#else
  return x.exp_u20();
#endif
}

struct VecOps {
  using F = Vec;
  static Vec exp(const Vec& x) { return exp_bounded(x); }
  static Vec max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
  static Vec splat(float x) { return Vec(x); }
};

// Two fp32 vectors per step: the natural unit for bf16/fp16, whose vectors hold twice as many lanes.
constexpr int64_t kStep = 2 * Vec::size();

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

// Lane-wise max that does not propagate NaN (one instruction); NaN logits still reach the sums
// through exp and come out as a NaN lse.
inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::clamp_min(a, b); }

// Two fp32 vectors holding the kStep elements at p in SOME order, for reductions only. bf16 is
// the upper half of an fp32, so the even elements are (word << 16) and the odd ones
// (word & 0xffff0000): two instructions instead of an in-order widening.
template <typename T>
inline void load2_unordered(const T* p, Vec& a, Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i w = _mm512_loadu_si512(p);
    a = Vec(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    b = Vec(_mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u)))));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = Vec(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    b = Vec(_mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xffff0000u)))));
    return;
  }
#endif
  load2(p, kStep, a, b);
}

}  // namespace CPU_CAPABILITY
}  // namespace rlhf_fast::cpu
