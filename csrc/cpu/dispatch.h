// Run-time choice among the SIMD builds of the CPU kernels.
//
// Every kernel is compiled once per CPU capability: csrc/cpu/capability/kernels.<cap>.cpp are built
// by setup.py with that capability's -m flags and CPU_CAPABILITY defines, and include every
// csrc/cpu/kernels/<op>_kernel.h, whose last lines register the capability's functions in the op's
// stubs. A stub returns the best registered function not above what ATen itself uses on this machine
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
//
// Adding a CPU kernel for op `foo`:
//   csrc/cpu/kernels/foo.h         RLHF_FAST_CPU_STUB(foo_fwd, <function type>)   (declarations)
//   csrc/cpu/kernels/foo_kernel.h  the kernel in namespace rlhf_fast::cpu::CPU_CAPABILITY, ending with
//                                  RLHF_FAST_REGISTER_CPU_KERNEL(foo_fwd, foo_fwd_kernel)
//   csrc/cpu/capability/register.h one #include of foo_kernel.h
//   csrc/cpu/foo.cpp               host entry points: checks, allocation, foo_fwd_stub()(...)
#pragma once

#include <c10/util/Exception.h>

#include <array>

namespace rlhf_fast::cpu {

// Rank of a capability: DEFAULT 0 < AVX2 1 < AVX512 2.
constexpr int kNumCapabilities = 3;
const char* capability_name(int rank);
// Best rank allowed on this machine (as ATen decides for its own kernels).
int machine_capability_rank();

template <typename Fn>
struct KernelStub {
  std::array<Fn, kNumCapabilities> fns{};

  bool set(int rank, Fn fn) {
    fns[rank] = fn;
    return true;
  }
  // The function of the best registered capability <= the machine's, and that rank.
  std::pair<Fn, int> choose() const {
    for (int r = machine_capability_rank(); r >= 0; --r) {
      if (fns[r] != nullptr) return {fns[r], r};
    }
    TORCH_CHECK(false, "rlhf_fast._C: no CPU kernel registered for this op (build error)");
  }
  Fn operator()() const {
    static const Fn fn = choose().first;
    return fn;
  }
};


}  // namespace rlhf_fast::cpu

// Declares the stub `name##_stub()` of function type FnType (in namespace rlhf_fast::cpu).
#define RLHF_FAST_CPU_STUB(name, FnType)                        \
  namespace rlhf_fast::cpu {                                    \
  inline KernelStub<FnType>& name##_stub() {                    \
    static KernelStub<FnType> stub;                             \
    return stub;                                                \
  }                                                             \
  }
