// CPU tile kernels of linear_logprobs, compiled once per SIMD capability. The GEMMs that produce the
// tiles run in ATen's BLAS (csrc/include/rlhf_fast/linear_logprobs_tiled.h); these are the passes
// over each tile while it is hot in cache: the forward's fold (reusing gather_logprobs' row fold)
// and the backward's logits -> gradient transform (gather_logprobs' row math plus the softcap and
// temperature chain rule).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <rlhf_fast/gather_logprobs_math.h>

#include "gather_logprobs_kernel.h"
#include "linear_logprobs.h"
#include "register_kernel.h"
#include "vec_utils.h"

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

// x = c * tanh(x / c) over a row, in place.
inline void softcap_row(float* x, int64_t n, float cap) {
  const Vec c(cap), inv_c(1.f / cap);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (c * (Vec::loadu(x + j) * inv_c).tanh()).store(x + j);
  for (; j < n; ++j) x[j] = cap * std::tanh(x[j] / cap);
}

inline void linear_fold_tile_kernel(at::Tensor& tile, const int64_t* labels, int64_t c0, float softcap,
                                    float inv_temp, float* m, float* s, float* t, float* z_label,
                                    bool with_entropy) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  float* base = tile.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* x = base + i * cols;
      if (softcap > 0.f) softcap_row(x, cols, softcap);
      const int64_t y = labels[i] - c0;
      if (y >= 0 && y < cols) z_label[i] = x[y] * inv_temp;
      const logprobs::RowStats part = with_entropy ? fold_row<float, true>(x, cols, inv_temp)
                                                   : fold_row<float, false>(x, cols, inv_temp);
      const logprobs::RowStats cur = logprobs::merge(logprobs::RowStats{m[i], s[i], t[i]}, part);
      m[i] = cur.m;
      s[i] = cur.s;
      t[i] = cur.t;
    }
  });
}

inline void linear_grad_tile_kernel(at::Tensor& tile, const int64_t* labels, int64_t c0, float softcap,
                                    float inv_temp, const float* lse, const float* g_lp, const float* g_ent,
                                    const float* entropy) {
  using logprobs::grad_logit;
  const int64_t rows = tile.size(0), cols = tile.size(1);
  float* base = tile.data_ptr<float>();
  const bool with_entropy = g_ent != nullptr;
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* x = base + i * cols;
      const float g = g_lp[i], ge = with_entropy ? g_ent[i] : 0.f, h = with_entropy ? entropy[i] : 0.f;
      const int64_t y = labels[i] - c0;
      const bool label_here = y >= 0 && y < cols;
      const float raw_y = label_here ? x[y] : 0.f;  // read before the row is overwritten
      const Vec scale(inv_temp), lse_v(lse[i]), g_v(g), ge_v(ge), h_v(h);
      int64_t j = 0;
      if (softcap > 0.f) {
        const Vec c(softcap), inv_c(1.f / softcap), one(1.f);
        for (; j + Vec::size() <= cols; j += Vec::size()) {
          const Vec u = (Vec::loadu(x + j) * inv_c).tanh();
          const Vec dz = grad_logit<VecOps>(c * u * scale, lse_v, g_v, ge_v, h_v, with_entropy);
          (dz * scale * (one - u * u)).store(x + j);
        }
      } else {
        for (; j + Vec::size() <= cols; j += Vec::size()) {
          const Vec dz = grad_logit<VecOps>(Vec::loadu(x + j) * scale, lse_v, g_v, ge_v, h_v, with_entropy);
          (dz * scale).store(x + j);
        }
      }
      // Tail and the label's own +g_lp term: scalar, same formula.
      auto scalar = [&](float raw, bool is_label) {
        const float u = softcap > 0.f ? std::tanh(raw / softcap) : 0.f;
        const float z = (softcap > 0.f ? softcap * u : raw) * inv_temp;
        float dz = grad_logit<logprobs::ScalarOps>(z, lse[i], g, ge, h, with_entropy);
        if (is_label) dz += g;
        return dz * inv_temp * (softcap > 0.f ? 1.f - u * u : 1.f);
      };
      for (; j < cols; ++j) x[j] = scalar(x[j], false);
      if (label_here) x[y] = scalar(raw_y, true);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace rlhf_fast::cpu

RLHF_FAST_REGISTER_CPU_KERNEL(linear_fold_tile, linear_fold_tile_kernel)
RLHF_FAST_REGISTER_CPU_KERNEL(linear_grad_tile, linear_grad_tile_kernel)
