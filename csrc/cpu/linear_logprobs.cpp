// CPU entry points of linear_logprobs: the tiled algorithm of rlhf_fast/linear_logprobs_tiled.h with
// the GEMMs of gemm.h (oneDNN, or ATen's BLAS) and the SIMD tile kernels of
// csrc/cpu/kernels/linear_logprobs_kernel.h.
#include <torch/library.h>

#include <rlhf_fast/linear_logprobs_tiled.h>

#include "linear_tiles.h"

namespace rlhf_fast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
    double temperature, double softcap, int64_t ignore_index, bool return_entropy, int64_t tile_rows,
    int64_t tile_cols) {
  check_vector(labels, "labels", hidden.dim() == 2 ? hidden.size(0) : -1, at::kLong, hidden);
  const int64_t vocab = weight.dim() == 2 ? weight.size(0) : 0;
  const at::Tensor bad = (labels != ignore_index).logical_and_((labels < 0).logical_or_(labels >= vocab));
  if (bad.any().item<bool>()) {
    const int64_t pos = bad.nonzero()[0][0].item<int64_t>();
    RLHF_FAST_CHECK(false, "labels: expected values in [0, ", vocab, ") or ignore_index=", ignore_index, ", got ",
                    labels[pos].item<int64_t>(), " at flat position ", pos);
  }
  return linear::forward<CpuTiles>(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy,
                                   tile_rows, tile_cols);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, double softcap, int64_t ignore_index, int64_t tile_rows,
    int64_t tile_cols) {
  return linear::backward<CpuTiles>(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                    temperature, softcap, ignore_index, tile_rows, tile_cols);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // hidden (N, H), weight (V, H), bias (V,)?, labels (N,) int64; softcap 0 = none; tiles of
  // tile_rows x tile_cols fp32 logits -> (logprobs (N,), entropy (N,) or (0,), lse (N,)), fp32
  m.def("linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float temperature, "
        "float softcap, int ignore_index, bool return_entropy, int tile_rows, int tile_cols) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (grad_hidden, grad_weight, grad_bias or (0,)) in the inputs' dtypes
  m.def("linear_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor labels, Tensor lse, Tensor entropy, float temperature, float softcap, "
        "int ignore_index, int tile_rows, int tile_cols) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs_fwd_cpu);
  m.impl("linear_logprobs_bwd", &linear_logprobs_bwd_cpu);
}

}  // namespace rlhf_fast::cpu
