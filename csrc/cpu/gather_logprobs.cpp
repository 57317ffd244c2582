// CPU entry points of gather_logprobs: argument checks and allocation here, the SIMD kernels in
// csrc/cpu/kernels/gather_logprobs_kernel.h (chosen per CPU capability by csrc/cpu/dispatch.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <rlhf_fast/checks.h>

#include "kernels/gather_logprobs.h"
#include "hugepage_alloc.h"

namespace rlhf_fast::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_fwd_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& labels,
                                                                      double temperature, int64_t ignore_index,
                                                                      bool return_entropy) {
  check_gather_logprobs_fwd(logits, labels, temperature);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor entropy = at::empty({return_entropy ? n : 0}, opts);
  if (n == 0) return {logprobs, entropy, lse};
  const at::Tensor y = labels.contiguous();
  const int64_t bad = gather_logprobs_fwd_stub()()(logits, y, float(1.0 / temperature), ignore_index, logprobs,
                                                    return_entropy ? &entropy : nullptr, lse);
  RLHF_FAST_CHECK(bad < 0, "labels: expected values in [0, ", vocab, ") or ignore_index=", ignore_index,
                  ", got ", bad < 0 ? 0 : y[bad].item<int64_t>(), " at flat position ", bad);
  return {logprobs, entropy, lse};
}

at::Tensor gather_logprobs_bwd_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                   const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  const int64_t n = logits.size(0);
  at::Tensor g_ent;
  if (check_gather_logprobs_bwd(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature)) {
    g_ent = grad_entropy->contiguous();
  }
  at::Tensor grad_logits = empty_hugepage(logits.sizes(), logits.scalar_type());
  if (n == 0) return grad_logits;
  gather_logprobs_bwd_stub()()(grad_logprobs.contiguous(), g_ent, logits, labels.contiguous(), lse.contiguous(),
                                entropy.contiguous(), float(1.0 / temperature), ignore_index, grad_logits);
  return grad_logits;
}

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // logits (N, V) unit stride along V, labels (N,) int64 -> (logprobs (N,), entropy (N,) or (0,), lse (N,))
  m.def("gather_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
        "bool return_entropy) -> (Tensor, Tensor, Tensor)");
  // -> grad_logits (N, V) contiguous, dtype of logits
  m.def("gather_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("gather_logprobs_fwd", &gather_logprobs_fwd_cpu);
  m.impl("gather_logprobs_bwd", &gather_logprobs_bwd_cpu);
}

}  // namespace rlhf_fast::cpu
