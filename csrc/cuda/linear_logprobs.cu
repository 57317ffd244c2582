// CUDA backend of linear_logprobs: per-token log-probs (and the entropy) of softmax(z) with
// z = softcap(hidden @ weight.T + bias) / T, and the gradients of hidden, weight and bias, without
// an (N, V) tensor.
//
// The algorithm is the tiled host loop shared with the CPU backend (rlhf_fast/linear_logprobs_tiled.h):
// cuBLAS GEMMs (through ATen) write one reusable fp32 (rows x cols) logits tile at a time -- at most
// 4M elements, 16 MB -- and this file supplies the CUDA `Tiles` policy, two passes over each tile
// while it is hot in L2:
//   fold   caps each raw logit (softcap, in registers: the forward does not need the capped tile
//          afterwards, so it is not written back), folds the row into the running online-softmax
//          statistics m / s / t with logprobs::push and logprobs::merge, and picks the label's z;
//   grad   turns the raw logits into dL/dlogits in place: logprobs::grad_logit (+ g_lp at the
//          label), times the chain rule of the temperature and the softcap, (1 - tanh^2) / T.
// The row math is rlhf_fast/gather_logprobs_math.h, the header the CPU kernels use.
//
// Shapes: hidden (N, H), weight (V, H), bias (V,) float32 / bfloat16 / float16, contiguous;
// labels (N,) int64 in [0, V) or ignore_index (the Python layer range-checks labels for CUDA; here
// an out-of-range label is never picked, so it reads nothing out of bounds). The tile is fp32
// (rows, cols) contiguous; per-row arrays (labels, m, s, t, z_label, lse, g_lp, g_ent, entropy) are
// device pointers offset to the tile's first row; only rows that take part are in a tile.
//
// Cost model, N = 8192, H = 4096, V = 128256 bf16 on an H100 (989 TFLOP/s bf16, 67 TFLOP/s fp32
// SIMT, 3.35 TB/s):
//   fold      one fp32 read of the tile (4 B/logit) and one exp per logit: 4.2 GB, ~1.3 ms in all;
//   grad      one fp32 read and write of the tile (8 B/logit): 8.4 GB, ~2.5 ms in all;
//   GEMMs     1 (forward) + 3 (backward) x 2 N V H = 8.6 TFLOP each. The shared host algorithm widens
//             bf16/fp16 to fp32 and calls fp32 at::mm / addmm_, i.e. cuBLAS SGEMM (TF32 only if the
//             user set torch.backends.cuda.matmul.allow_tf32): ~130-150 ms per GEMM at SGEMM rates.
//             The GEMMs, not these kernels, set this backend's speed; aten::mm.dtype (bf16 inputs,
//             fp32 output on tensor cores) would bring them to ~9-12 ms each.
//
// Build and compile-only checks: as csrc/cuda/gather_logprobs.cu (tests/test_cuda_build.py compiles
// this file alone for sm_80 and sm_90 with `-Xptxas -v` and requires zero spills). ATen/ATen.h
// (included by the tiled header) compiles under nvcc with the CPU-only torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <rlhf_fast/checks.h>
#include <rlhf_fast/cuda_linear_tiles.cuh>
#include <rlhf_fast/gather_logprobs_math.h>
#include <rlhf_fast/linear_logprobs_tiled.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace rlhf_fast::cuda {

// ---------------------------------------------------------------------------------------------
// Entry points (schemas in csrc/cpu/linear_logprobs.cpp; same signatures as the CPU ones).

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
    double temperature, double softcap, int64_t ignore_index, bool return_entropy, int64_t tile_rows,
    int64_t tile_cols) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear::forward<CudaTiles>(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy,
                                    tile_rows, tile_cols);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cuda(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, double softcap, int64_t ignore_index, int64_t tile_rows,
    int64_t tile_cols) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear::backward<CudaTiles>(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                     temperature, softcap, ignore_index, tile_rows, tile_cols);
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs_fwd_cuda);
  m.impl("linear_logprobs_bwd", &linear_logprobs_bwd_cuda);
}

}  // namespace rlhf_fast::cuda
