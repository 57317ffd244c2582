// rlhf_fast._C: the native kernels. Importing the module runs the static registrations: the op
// schemas below (namespace rlhf_fast_C) and their CPU / CUDA implementations in csrc/cpu and
// csrc/cuda. The public ops (rlhf_fast::<op>) are defined in Python and call these as backends.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

static PyModuleDef rlhf_fast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "rlhf_fast native kernels (ops under torch.ops.rlhf_fast_C)", -1,
                                         nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rlhf_fast_c_module); }

TORCH_LIBRARY(rlhf_fast_C, m) {
  // logits (N, V) unit stride along V, labels (N,) int64 -> (logprobs (N,), entropy (N,) or (0,), lse (N,))
  m.def("gather_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
        "bool return_entropy) -> (Tensor, Tensor, Tensor)");
  // -> grad_logits (N, V) contiguous, dtype of logits
  m.def("gather_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  // SIMD variant of the CPU kernels picked for this machine: "AVX512", "AVX2" or "DEFAULT"
  m.def("cpu_capability() -> str", [] { return std::string(rlhf_fast::cpu::kernels().capability); });
}
