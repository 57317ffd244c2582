// CPU entry points of gae callable from C++ (csrc/eager_calls.cpp calls them directly).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace rlhf_fast::cpu {

// The packed form: rewards, values (N,) of one float dtype, mask (N,) bool, cu_seqlens (S+1,) int64, all
// contiguous; checked, the offsets' values included -> (advantages (N,), returns (N,)) fp32.
std::tuple<at::Tensor, at::Tensor> gae_fwd_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, const at::Tensor& cu_seqlens, double gamma,
                                               double lam, bool whiten);

// The padded form: rewards, values (B, T) of one float dtype, mask (B, T) bool, all contiguous
// (checked) -> (advantages (B, T), returns (B, T)) fp32.
std::tuple<at::Tensor, at::Tensor> gae_padded_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                                  const at::Tensor& mask, double gamma, double lam, bool whiten);

}  // namespace rlhf_fast::cpu
