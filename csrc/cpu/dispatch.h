// Run-time choice among the SIMD builds of the CPU kernels.
//
// Every kernel is compiled once per CPU capability (csrc/cpu/capability/kernels.<cap>.cpp, built
// with that capability's -m flags and CPU_CAPABILITY defines by setup.py). Each build registers a
// KernelTable; kernels() returns the best one not above what ATen itself uses on this machine
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
#pragma once

#include <ATen/core/Tensor.h>
#include <cstdint>

namespace rlhf_fast::cpu {

struct KernelTable {
  const char* capability;
  int rank;  // DEFAULT 0 < AVX2 1 < AVX512 2
  // logits (N, V), labels (N,) int64; writes logprobs, entropy (if defined), lse (all (N,) fp32).
  // Returns the first row whose label is out of range (not ignore_index), or -1.
  int64_t (*gather_logprobs_fwd)(const at::Tensor& logits, const at::Tensor& labels, float inv_temp,
                                 int64_t ignore_index, at::Tensor& logprobs, at::Tensor* entropy,
                                 at::Tensor& lse);
  // grad_entropy may be undefined; writes grad_logits (N, V) contiguous.
  void (*gather_logprobs_bwd)(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const at::Tensor& entropy, float inv_temp, int64_t ignore_index,
                              at::Tensor& grad_logits);
};

// Called from each capability's translation unit at static-initialisation time.
int register_kernels(const KernelTable& table);

const KernelTable& kernels();

}  // namespace rlhf_fast::cpu
