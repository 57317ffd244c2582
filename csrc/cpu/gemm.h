// fp32 GEMMs of the CPU tiled ops (linear_logprobs, linear_ppo_loss) and of linear.
//
// out = beta * out + a @ b, with a and b 2-D fp32 tensors that are contiguous or transposed views
// of contiguous tensors (the layouts the tiled algorithms produce) and out contiguous. The engine
// is oneDNN's matmul where ATen is built with it: on CPUs where ATen's BLAS does not take its
// AVX-512 path (AMD Zen 4/5 with MKL) oneDNN runs these fp32 GEMMs up to ~1.9x faster, with the
// same fp32 accumulation. Products under ~1 MFLOP or of fewer than 8 rows stay on BLAS, whose
// per-call cost is lower. RLHF_FAST_CPU_GEMM=blas selects ATen's at::addmm (MKL/OpenBLAS) instead;
// `torch.ops.rlhf_fast_C.cpu_gemm_engine()` says which is in use.
#pragma once

#include <ATen/ATen.h>

namespace rlhf_fast::cpu {

void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta);

// A 2-D operand as matmul_into's fast path takes it: `t` itself when contiguous or the transpose of a
// contiguous matrix, else a contiguous copy.
at::Tensor gemm_operand(const at::Tensor& t);

// "onednn" or "blas"
const char* gemm_engine();

}  // namespace rlhf_fast::cpu
