// RLHF_FAST_REGISTER_CPU_KERNEL(stub, fn): at load time, put this capability's build of `fn` into
// `stub` (declared with RLHF_FAST_CPU_STUB). Used at the end of each csrc/cpu/kernels/<op>_kernel.h.
#pragma once

#include "../dispatch.h"

#if defined(CPU_CAPABILITY_AVX512)
#define RLHF_FAST_CAPABILITY_RANK 2
#elif defined(CPU_CAPABILITY_AVX2)
#define RLHF_FAST_CAPABILITY_RANK 1
#else
#define RLHF_FAST_CAPABILITY_RANK 0
#endif

#define RLHF_FAST_REGISTER_CPU_KERNEL(stub, fn)                                                  \
  namespace rlhf_fast::cpu {                                                                   \
  namespace {                                                                                  \
  [[maybe_unused]] const bool registered_##stub =                                              \
      stub##_stub().set(RLHF_FAST_CAPABILITY_RANK, &CPU_CAPABILITY::fn);                       \
  }                                                                                            \
  }
