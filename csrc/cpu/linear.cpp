// CPU entry points of linear: y = x @ weight^T (+ bias) and its backward, the projections of a
// transformer's layers. fp32 GEMMs go through matmul_into (gemm.h: oneDNN's matmul where ATen has
// it, ~2x ATen's MKL sgemm on AMD Zen 4/5, where MKL does not take its AVX-512 path); bfloat16 and
// float16 go to ATen, whose CPU path for them is oneDNN already. Outputs of >= 2 MB come from the
// huge-page buffer cache (hugepage_alloc.h), so a training step reuses faulted-in activations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <rlhf_fast/checks.h>

#include "gemm.h"
#include "hugepage_alloc.h"

namespace rlhf_fast::cpu {

namespace {

void check_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  RLHF_FAST_CHECK(x.dim() == 2, "input: expected a 2-D (M, K) tensor, got shape ", x.sizes());
  RLHF_FAST_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight: expected shape (N, ", x.size(1),
                  "), got ", weight.sizes());
  RLHF_FAST_CHECK(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ", x.scalar_type(),
                  " (the input's), got ", weight.scalar_type());
  RLHF_FAST_CHECK(weight.device() == x.device(), "weight: expected device ", x.device(), ", got ", weight.device());
  if (bias.has_value() && bias->defined()) check_vector(*bias, "bias", weight.size(0), x.scalar_type(), x);
}

}  // namespace

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.scalar_type() != at::kFloat) return at::linear(x, weight, has_bias ? *bias : at::Tensor());
  at::Tensor out = empty_hugepage({x.size(0), weight.size(0)}, at::kFloat);
  if (has_bias) out.copy_(bias->unsqueeze(0).expand_as(out));
  matmul_into(out, gemm_operand(x), gemm_operand(weight).t(), has_bias ? 1.0f : 0.0f);
  return out;
}

// grad (M, N) -> (grad_input (M, K), grad_weight (N, K), grad_bias (N,)); the ones not asked for are
// empty (0,) tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& weight, bool need_input,
                                                              bool need_weight, bool need_bias) {
  check_linear(x, weight, std::nullopt);
  RLHF_FAST_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
                  "grad: expected shape (", x.size(0), ", ", weight.size(0), "), got ", grad.sizes());
  RLHF_FAST_CHECK(grad.scalar_type() == x.scalar_type(), "grad: expected dtype ", x.scalar_type(), ", got ",
                  grad.scalar_type());
  const at::Tensor g = gemm_operand(grad);
  const bool fp32 = x.scalar_type() == at::kFloat;
  // three distinct empty tensors: the outputs of an op may not alias each other
  at::Tensor gx = at::empty({0}, x.options()), gw = at::empty({0}, x.options()), gb = at::empty({0}, x.options());
  if (need_input) {
    if (fp32) {
      gx = empty_hugepage(x.sizes(), at::kFloat);
      matmul_into(gx, g, gemm_operand(weight), 0.0f);
    } else {
      gx = at::mm(g, weight);
    }
  }
  if (need_weight) {
    if (fp32) {
      gw = at::empty(weight.sizes(), x.options());
      matmul_into(gw, g.t(), gemm_operand(x), 0.0f);
    } else {
      gw = at::mm(g.t(), x);
    }
  }
  if (need_bias) gb = g.sum(0);
  return {gx, gw, gb};
}

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // input (M, K), weight (N, K), bias (N,)?, one float dtype -> (M, N) in that dtype
  m.def("linear_fwd(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // grad (M, N) -> (grad_input (M, K), grad_weight (N, K), grad_bias (N,)), (0,) where not asked for
  m.def("linear_bwd(Tensor grad, Tensor input, Tensor weight, bool need_input, bool need_weight, bool need_bias) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("linear_fwd", &linear_fwd_cpu);
  m.impl("linear_bwd", &linear_bwd_cpu);
}

}  // namespace rlhf_fast::cpu
