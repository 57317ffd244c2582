// CPU entry point of gae: argument checks (including the values of cu_seqlens) and allocation here,
// the kernel in csrc/cpu/kernels/gae_kernel.h (chosen per CPU capability by csrc/cpu/dispatch.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <rlhf_fast/gae_math.h>

#include "hugepage_alloc.h"
#include "kernels/gae.h"

namespace rlhf_fast::cpu {

// rewards, values (N,) of one float dtype, mask (N,) bool, cu_seqlens (S+1,) int64, all contiguous; checked,
// the offsets' values included -> (advantages (N,), returns (N,)) fp32.
std::tuple<at::Tensor, at::Tensor> gae_fwd_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, const at::Tensor& cu_seqlens, double gamma,
                                               double lam, bool whiten) {
  check_gae_fwd(rewards, values, mask, cu_seqlens, gamma, lam);
  const int64_t total = rewards.size(0), n_seq = cu_seqlens.size(0) - 1;
  const int64_t* cu = cu_seqlens.const_data_ptr<int64_t>();
  RLHF_FAST_CHECK(cu[0] == 0, "cu_seqlens: expected cu_seqlens[0] == 0, got ", cu[0]);
  for (int64_t s = 0; s < n_seq; ++s) {
    RLHF_FAST_CHECK(cu[s + 1] >= cu[s], "cu_seqlens: expected non-decreasing offsets, got cu_seqlens[", s + 1,
                    "] = ", cu[s + 1], " < cu_seqlens[", s, "] = ", cu[s]);
  }
  RLHF_FAST_CHECK(cu[n_seq] == total, "cu_seqlens: expected the last offset to equal the number of tokens ",
                  total, " (rewards.shape[0]), got ", cu[n_seq]);
  // from the buffer cache when it is on (hugepage_alloc.h): fresh 4 KB pages cost more than the scan
  at::Tensor advantages = empty_hugepage({total}, at::kFloat), returns = empty_hugepage({total}, at::kFloat);
  if (total == 0) return {advantages, returns};
  gae_fwd_stub()()(rewards, values, mask, cu_seqlens, float(gamma), float(lam), whiten, advantages, returns);
  return {advantages, returns};
}

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // rewards, values (N,) one float dtype, mask (N,) bool, cu_seqlens (S+1,) int64
  //   -> (advantages (N,), returns (N,)) fp32
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, Tensor cu_seqlens, float gamma, float lam, "
        "bool whiten) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) { m.impl("gae_fwd", &gae_fwd_cpu); }

}  // namespace rlhf_fast::cpu
