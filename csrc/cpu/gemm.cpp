#include "gemm.h"

#include <ATen/Config.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include <rlhf_fast/checks.h>

#if AT_MKLDNN_ENABLED()
namespace at::native {
// Exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h, not among the installed headers):
// result = beta * result + alpha * (mat1 @ mat2) through oneDNN's matmul primitive.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native
#endif

namespace rlhf_fast::cpu {
namespace {

bool use_onednn() {
  static const bool value = [] {
#if AT_MKLDNN_ENABLED()
    const char* env = std::getenv("RLHF_FAST_CPU_GEMM");
    if (env != nullptr && *env != '\0') {
      RLHF_FAST_CHECK(std::strcmp(env, "onednn") == 0 || std::strcmp(env, "blas") == 0,
                      "RLHF_FAST_CPU_GEMM: expected 'onednn' or 'blas', got '", env, "'");
      return std::strcmp(env, "onednn") == 0;
    }
    return at::globalContext().userEnabledMkldnn();
#else
    return false;
#endif
  }();
  return value;
}

// Contiguous, or the transpose of a contiguous matrix: the layouts oneDNN takes without a copy.
bool plain_or_transposed(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  return t.dim() == 2 && t.stride(0) == 1 && t.stride(1) == t.size(0);
}

// oneDNN's per-call cost is ~12 us above MKL's: measured on Zen 5, a 1-row (1, 256) @ (256, 768)
// product takes 24 us through oneDNN and 12 us through MKL, while from 16 rows of (256, 256) on
// oneDNN is ahead (37 vs 64 us at (16, 256) @ (256, 768)). Decoding's one-token GEMMs stay on BLAS.
bool big_enough(const at::Tensor& a, const at::Tensor& b) {
  return a.size(0) >= 8 && a.size(0) * a.size(1) * b.size(1) >= (int64_t(1) << 20);
}

}  // namespace

const char* gemm_engine() { return use_onednn() ? "onednn" : "blas"; }

at::Tensor gemm_operand(const at::Tensor& t) { return plain_or_transposed(t) ? t : t.contiguous(); }

void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta) {
#if AT_MKLDNN_ENABLED()
  if (use_onednn() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      out.scalar_type() == at::kFloat && out.is_contiguous() && plain_or_transposed(a) && plain_or_transposed(b) &&
      a.numel() > 0 && b.numel() > 0 && big_enough(a, b)) {
    // oneDNN's matmul refuses CPUs without AVX-512 BW/VL/DQ (or AVX-NE-CONVERT) in some torch builds, fp32
    // inputs included (e.g. AMD Zen 3): the first refusal sends every later call to BLAS.
    static std::atomic<bool> refused{false};
    if (!refused.load(std::memory_order_relaxed)) {
      try {
        at::native::mkldnn_matmul(a, b, out, beta, 1.0f);
        return;
      } catch (const c10::Error&) {
        refused.store(true, std::memory_order_relaxed);
      }
    }
  }
#endif
  if (beta == 0.0f) {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
  } else {
    const_cast<at::Tensor&>(out).addmm_(a, b, beta, 1.0);
  }
}

}  // namespace rlhf_fast::cpu

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // engine of the CPU tiled ops' fp32 GEMMs: "onednn" or "blas" (RLHF_FAST_CPU_GEMM)
  m.def("cpu_gemm_engine() -> str", [] { return std::string(rlhf_fast::cpu::gemm_engine()); });
}
