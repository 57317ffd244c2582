// Included once per CPU capability (kernels.<cap>.cpp): instantiates every kernel of
// csrc/cpu/kernels/ for CPU_CAPABILITY and registers the table with the dispatcher.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "compile through setup.py, which sets CPU_CAPABILITY for each kernels.<cap>.cpp"
#endif

#include "../dispatch.h"
#include "../kernels/gather_logprobs_kernel.h"

#define RLHF_FAST_STR2(x) #x
#define RLHF_FAST_STR(x) RLHF_FAST_STR2(x)

namespace rlhf_fast::cpu {
namespace {

constexpr int capability_rank() {
#if defined(CPU_CAPABILITY_AVX512)
  return 2;
#elif defined(CPU_CAPABILITY_AVX2)
  return 1;
#else
  return 0;
#endif
}

const int registered = register_kernels(KernelTable{
    RLHF_FAST_STR(CPU_CAPABILITY),
    capability_rank(),
    &CPU_CAPABILITY::gather_logprobs_fwd_kernel,
    &CPU_CAPABILITY::gather_logprobs_bwd_kernel,
});

}  // namespace
}  // namespace rlhf_fast::cpu
