// Host-side argument checks shared by the CPU and CUDA entry points. They raise c10::ValueError,
// which reaches Python as ValueError naming the argument, the expected and the actual value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define RLHF_FAST_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace rlhf_fast {

inline void check_rows(const at::Tensor& logits, const char* name) {
  RLHF_FAST_CHECK(logits.dim() == 2, name, ": expected a 2-D (N, V) tensor, got ", logits.dim(), " dims");
  RLHF_FAST_CHECK(logits.size(1) >= 1, name, ": expected V >= 1, got shape ", logits.sizes());
  RLHF_FAST_CHECK(logits.size(0) <= 1 || logits.stride(1) == 1 || logits.size(1) == 1, name,
                  ": expected unit stride along V, got strides ", logits.strides());
  const auto dt = logits.scalar_type();
  RLHF_FAST_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                  ": expected float32, bfloat16 or float16, got ", dt);
}

inline void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype,
                         const at::Tensor& like) {
  RLHF_FAST_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape (", n, "), got ", t.sizes());
  RLHF_FAST_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  RLHF_FAST_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
}

}  // namespace rlhf_fast
