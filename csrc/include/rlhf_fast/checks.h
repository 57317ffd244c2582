// Host-side argument checks shared by the CPU and CUDA entry points. They raise c10::ValueError,
// which reaches Python as ValueError naming the argument, the expected and the actual value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#define RLHF_FAST_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace rlhf_fast {

inline void check_rows(const at::Tensor& logits, const char* name) {
  RLHF_FAST_CHECK(logits.dim() == 2, name, ": expected a 2-D (N, V) tensor, got ", logits.dim(), " dims");
  RLHF_FAST_CHECK(logits.size(1) >= 1, name, ": expected V >= 1, got shape ", logits.sizes());
  RLHF_FAST_CHECK(logits.stride(1) == 1 || logits.size(1) == 1, name,
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

// Arguments of rlhf_fast_C::gather_logprobs_fwd / _bwd, checked the same way on every device.
inline void check_gather_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  check_rows(logits, "logits");
  check_vector(labels, "labels", logits.size(0), at::kLong, logits);
  RLHF_FAST_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
}

// Returns whether an entropy gradient is given (then `entropy` was checked too).
inline bool check_gather_logprobs_bwd(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                      const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                      const at::Tensor& entropy, double temperature) {
  check_gather_logprobs_fwd(logits, labels, temperature);
  const int64_t n = logits.size(0);
  check_vector(lse, "lse", n, at::kFloat, logits);
  check_vector(grad_logprobs, "grad_logprobs", n, at::kFloat, logits);
  if (!(grad_entropy.has_value() && grad_entropy->defined())) return false;
  check_vector(*grad_entropy, "grad_entropy", n, at::kFloat, logits);
  check_vector(entropy, "entropy", n, at::kFloat, logits);
  return true;
}

}  // namespace rlhf_fast
