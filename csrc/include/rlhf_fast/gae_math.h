// Math of gae (generalized advantage estimation) shared by the CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda), so both backends compute the same recursion the same way.
//
// One sequence, positions t = 0 .. L-1, rewards r, values V, mask m (valid = m_t). Masked positions
// (padding, or tool/observation tokens inside a multi-turn response) are skipped: their reward and
// value are never read, and the recursion carries across them. For valid t, with V' and A' the value
// and the advantage at the next VALID position of the sequence (0 after the last one):
//   delta_t = r_t + gamma * V' - V_t
//   A_t     = delta_t + gamma * lam * A'
//   R_t     = A_t + V_t                                  (the value target, "returns")
// and A_t = R_t = 0 at masked positions.
//
// Two forms of the same recursion:
//   step()  the sequential form (CPU kernel, and each CUDA lane over its own few positions): a Carry
//           (A', V') walked from the end of the sequence to its start;
//   Map     the parallel form: position t is the affine map of the carry
//             (A, V) -> (dA + a*A + b*V, dV + e*V)
//           valid: dA = r - V_t, a = gamma*lam, b = gamma, dV = V_t, e = 0;  masked: the identity.
//           Maps compose into maps of the same shape (compose below), so a run of positions is one
//           Map and a warp or a Triton block scans them in log steps (kernels/gae.py uses the same).
//
// Whitening (optional): over all valid advantages of the batch, A <- (A - mean) / sqrt(var + eps) with
// the UNBIASED variance (Bessel, n - 1; var := 0 when n < 2, so one valid token whitens to 0 and an
// empty batch stays all 0), eps = kWhitenEps. Masked positions stay 0; returns are not whitened.
// Moments are accumulated per sequence (Welford, push) and combined (Chan, merge).
#pragma once

#include <cmath>
#include <cstdint>

#include <rlhf_fast/host_device.h>

namespace rlhf_fast {
namespace gae {

constexpr float kWhitenEps = 1e-8f;

// Advantage and value at the next valid position of the sequence; zero past its end. F is float, or a
// SIMD vector of floats when a kernel walks one sequence per lane (the CPU kernel does).
template <typename F>
struct CarryOf {
  F adv;
  F value;
};
using Carry = CarryOf<float>;

RLHF_FAST_HD Carry end_of_sequence() { return Carry{0.f, 0.f}; }

// Picks a or b on a flag; kernels may pass a branch-free policy of their own (the CPU kernel does:
// compilers turn these ternaries into branches, which masks with holes make unpredictable).
struct TernarySelect {
  static RLHF_FAST_HD float pick(bool c, float a, float b) { return c ? a : b; }
};

// One position, walking backwards. Returns A_t (0 at a masked position, which leaves the carry as is).
// The update is computed and then selected, never multiplied by the mask, so a masked position's
// reward and value (padding may hold anything, NaN included) cannot leak into the result. `valid` is
// whatever Select::pick takes: a bool for scalars, a lane mask for vectors.
template <class Select = TernarySelect, typename F = float, typename Mask = bool>
RLHF_FAST_HD F step(CarryOf<F>& c, F reward, F value, Mask valid, F gamma, F gamma_lam) {
  const F delta = reward + gamma * c.value - value;
  const F a = delta + gamma_lam * c.adv;
  c.adv = Select::pick(valid, a, c.adv);
  c.value = Select::pick(valid, value, c.value);
  return Select::pick(valid, a, F(0.f));
}

// Affine map of the carry: (A, V) -> (dA + a*A + b*V, dV + e*V).
struct Map {
  float dA, a, b, dV, e;
};

RLHF_FAST_HD Map identity() { return Map{0.f, 1.f, 0.f, 0.f, 1.f}; }

// The map of one position. A masked position is the identity whatever its (unread) reward and value.
RLHF_FAST_HD Map position_map(float reward, float value, bool valid, float gamma, float gamma_lam) {
  if (!valid) return identity();
  return Map{reward - value, gamma_lam, gamma, value, 0.f};
}

// left o right: apply `right` (the later positions) first, then `left`.
RLHF_FAST_HD Map compose(const Map& left, const Map& right) {
  return Map{left.dA + left.a * right.dA + left.b * right.dV, left.a * right.a, left.a * right.b + left.b * right.e,
             left.dV + left.e * right.dV, left.e * right.e};
}

RLHF_FAST_HD Carry apply(const Map& m, const Carry& c) {
  return Carry{m.dA + m.a * c.adv + m.b * c.value, m.dV + m.e * c.value};
}

// Count, mean and sum of squared deviations of a set of advantages.
template <typename F>
struct Moments {
  F n, mean, m2;
};

template <typename F>
RLHF_FAST_HD Moments<F> no_moments() {
  return Moments<F>{F(0), F(0), F(0)};
}

// Welford: add one value.
template <typename F>
RLHF_FAST_HD void push(Moments<F>& m, F x) {
  m.n += F(1);
  const F d = x - m.mean;
  m.mean += d / m.n;
  m.m2 += d * (x - m.mean);
}

// Chan et al.: the moments of the union of two disjoint sets.
template <typename F>
RLHF_FAST_HD Moments<F> merge(const Moments<F>& x, const Moments<F>& y) {
  const F n = x.n + y.n;
  if (n == F(0)) return x;
  const F d = y.mean - x.mean, wy = y.n / n;
  return Moments<F>{n, x.mean + d * wy, x.m2 + y.m2 + d * d * x.n * wy};
}

// 1 / sqrt(unbiased variance + eps); the variance is taken as 0 below two values.
template <typename F>
RLHF_FAST_HD F whiten_rstd(const Moments<F>& m) {
  const F var = m.n >= F(2) ? m.m2 / (m.n - F(1)) : F(0);
  return F(1) / sqrt(var + F(kWhitenEps));
}

}  // namespace gae
}  // namespace rlhf_fast

// ---------------------------------------------------------------------------------------------
// Host-side argument checks of rlhf_fast_C::gae_fwd, run the same way by the CPU and CUDA entry
// points (value checks of cu_seqlens need its data on the host: the CPU entry does them, the Python
// layer does them for the GPU backends before launching).
#include <rlhf_fast/checks.h>

namespace rlhf_fast {

// rewards, values (N,) float32 / bfloat16 / float16 of one dtype, contiguous; mask (N,) bool;
// cu_seqlens (S+1,) int64 contiguous, all on one device.
inline void check_gae_fwd(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                          const at::Tensor& cu_seqlens, double gamma, double lam) {
  RLHF_FAST_CHECK(rewards.dim() == 1 && rewards.is_contiguous(), "rewards: expected a contiguous 1-D (N,) tensor, got ",
                  rewards.sizes());
  const auto dt = rewards.scalar_type();
  RLHF_FAST_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                  "rewards: expected float32, bfloat16 or float16, got ", dt);
  const int64_t n = rewards.size(0);
  check_vector(values, "values", n, dt, rewards);
  RLHF_FAST_CHECK(values.is_contiguous(), "values: expected a contiguous tensor");
  check_vector(mask, "mask", n, at::kBool, rewards);
  RLHF_FAST_CHECK(mask.is_contiguous(), "mask: expected a contiguous tensor");
  RLHF_FAST_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.is_contiguous(),
                  "cu_seqlens: expected a contiguous 1-D (S+1,) tensor, got ", cu_seqlens.sizes());
  check_vector(cu_seqlens, "cu_seqlens", cu_seqlens.size(0), at::kLong, rewards);
  RLHF_FAST_CHECK(gamma >= 0 && gamma <= 1, "gamma: expected a number in [0, 1], got ", gamma);
  RLHF_FAST_CHECK(lam >= 0 && lam <= 1, "lam: expected a number in [0, 1], got ", lam);
}

}  // namespace rlhf_fast
