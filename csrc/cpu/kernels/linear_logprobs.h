// Stubs of the linear_logprobs CPU tile kernels (one build per SIMD capability, see ../dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../dispatch.h"

namespace rlhf_fast::cpu {
// tile (rows, cols) fp32 contiguous raw logits of vocabulary columns [c0, c0 + cols) for `rows` rows.
// Caps them in place (softcap > 0), then folds each row into the running online-softmax statistics
// m/s/t (one float per row each) and stores the label's scaled logit in z_label when the label
// falls in this chunk.
using LinearFoldTileFn = void (*)(at::Tensor& tile, const int64_t* labels, int64_t c0, float softcap, float inv_temp,
                                  float* m, float* s, float* t, float* z_label, bool with_entropy);
// Turns a tile of raw logits into dL/dlogits in place (the softcap and temperature chain rule
// included), for rows that all have a gradient. g_ent/entropy null without an entropy gradient.
using LinearGradTileFn = void (*)(at::Tensor& tile, const int64_t* labels, int64_t c0, float softcap, float inv_temp,
                                  const float* lse, const float* g_lp, const float* g_ent, const float* entropy);
}  // namespace rlhf_fast::cpu

RLHF_FAST_CPU_STUB(linear_fold_tile, LinearFoldTileFn)
RLHF_FAST_CPU_STUB(linear_grad_tile, LinearGradTileFn)
