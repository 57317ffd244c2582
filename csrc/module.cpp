// rlhf_fast._C: the native kernels. Importing the module runs the static registrations: the op
// schemas (namespace rlhf_fast_C) and their CPU / CUDA implementations in csrc/cpu and csrc/cuda.
// The public ops (rlhf_fast::<op>) are defined in Python and call these as backends.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

static PyModuleDef rlhf_fast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "rlhf_fast native kernels (ops under torch.ops.rlhf_fast_C)", -1,
                                         nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rlhf_fast_c_module); }

// Each op's schemas are defined beside its CPU entry points (csrc/cpu/<op>.cpp) with
// TORCH_LIBRARY_FRAGMENT; this library holds what belongs to no op.
TORCH_LIBRARY(rlhf_fast_C, m) {
  // SIMD build of the CPU kernels used on this machine: "AVX512", "AVX2" or "DEFAULT"
  m.def("cpu_capability() -> str", [] {
    return std::string(rlhf_fast::cpu::capability_name(rlhf_fast::cpu::machine_capability_rank()));
  });
}
