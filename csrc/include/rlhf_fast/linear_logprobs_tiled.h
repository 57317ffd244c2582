// The tiled host algorithm of linear_logprobs, shared by the CPU and CUDA backends: fp32 GEMMs
// into one reusable fp32 tile buffer, and a device's `Tiles` policy supplies the GEMM engine and
// the two passes over each tile:
//   Tiles::matmul(out, a, b, beta)   out = beta * out + a @ b (oneDNN / BLAS on CPU, cuBLAS on CUDA)
//   Tiles::fold(tile, labels, c0, softcap, inv_temp, m, s, t, z_label, with_entropy)
//   Tiles::grad(tile, labels, c0, softcap, inv_temp, lse, g_lp, g_ent, entropy)
// (pointers into tensors on the tile's device; see csrc/cpu/kernels/linear_logprobs.h).
//
// Only rows whose label is kept (and, in the backward, whose lse is finite) take part: ignored
// rows (prompt tokens) cost nothing. bf16/fp16 inputs are widened to fp32 per tile so every GEMM
// accumulates and outputs in fp32.
#pragma once

#include <ATen/ATen.h>

#include <rlhf_fast/checks.h>

#include <limits>
#include <optional>
#include <tuple>

namespace rlhf_fast::linear {

inline void check_args(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& labels, double temperature, double softcap, int64_t tile_rows,
                       int64_t tile_cols) {
  RLHF_FAST_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden: expected a contiguous (N, H) tensor, got ",
                  hidden.sizes());
  RLHF_FAST_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == hidden.size(1),
                  "weight: expected a contiguous (V, H) tensor with H = ", hidden.size(1), ", got ", weight.sizes());
  const auto dt = hidden.scalar_type();
  RLHF_FAST_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                  "hidden: expected float32, bfloat16 or float16, got ", dt);
  RLHF_FAST_CHECK(weight.scalar_type() == dt, "weight: expected dtype ", dt, ", got ", weight.scalar_type());
  if (bias.has_value() && bias->defined()) {
    check_vector(*bias, "bias", weight.size(0), dt, hidden);
  }
  check_vector(labels, "labels", hidden.size(0), at::kLong, hidden);
  RLHF_FAST_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  RLHF_FAST_CHECK(softcap >= 0, "softcap: expected >= 0 (0 = none), got ", softcap);
  RLHF_FAST_CHECK(tile_rows >= 1 && tile_cols >= 1, "tile: expected >= 1 rows and columns, got ", tile_rows, "x",
                  tile_cols);
}

// Indices of the rows that take part, or an undefined tensor when all of them do.
inline at::Tensor active_rows(const at::Tensor& keep) {
  if (keep.all().item<bool>()) return at::Tensor();
  return keep.nonzero().squeeze(1);
}

inline at::Tensor take_rows(const at::Tensor& t, const at::Tensor& idx) {
  return idx.defined() ? t.index_select(0, idx) : t;
}

// Raw logits of rows `hr` (fp32) and vocabulary rows w_c (fp32, (cols, H)) into `tile`.
template <typename Tiles>
void tile_logits(at::Tensor& tile, const at::Tensor& hr, const at::Tensor& w_c, const at::Tensor& bias_c) {
  if (bias_c.defined()) {
    tile.copy_(bias_c.unsqueeze(0).expand_as(tile));
    Tiles::matmul(tile, hr, w_c.t(), 1.0f);
  } else {
    Tiles::matmul(tile, hr, w_c.t(), 0.0f);
  }
}

// Walks the (row block, vocabulary chunk) tiles; fn(tile, r0, c0, hr, w_c) per tile.
template <typename Tiles, typename Fn>
void for_each_tile(const at::Tensor& h32, const at::Tensor& weight, const at::Tensor& bias32, int64_t tile_rows,
                   int64_t tile_cols, Fn&& fn) {
  const int64_t n = h32.size(0), vocab = weight.size(0), hdim = weight.size(1);
  const int64_t rows = std::min(tile_rows, n), cols = std::min(tile_cols, vocab);
  const auto f32 = h32.options().dtype(at::kFloat);
  at::Tensor buffer = at::empty({rows * cols}, f32);
  const bool widen = weight.scalar_type() != at::kFloat;
  at::Tensor wbuf = widen ? at::empty({cols, hdim}, f32) : at::Tensor();
  for (int64_t c0 = 0; c0 < vocab; c0 += cols) {
    const int64_t vc = std::min(cols, vocab - c0);
    at::Tensor w_c = weight.narrow(0, c0, vc);
    if (widen) w_c = wbuf.narrow(0, 0, vc).copy_(w_c);
    const at::Tensor bias_c = bias32.defined() ? bias32.narrow(0, c0, vc) : at::Tensor();
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t nr = std::min(rows, n - r0);
      const at::Tensor hr = h32.narrow(0, r0, nr);
      at::Tensor tile = buffer.narrow(0, 0, nr * vc).view({nr, vc});
      tile_logits<Tiles>(tile, hr, w_c, bias_c);
      fn(tile, r0, c0, hr, w_c);
    }
  }
}

template <typename Tiles>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                                       double temperature, double softcap, int64_t ignore_index,
                                                       bool return_entropy, int64_t tile_rows, int64_t tile_cols) {
  check_args(hidden, weight, bias, labels, temperature, softcap, tile_rows, tile_cols);
  const int64_t n = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  at::Tensor logprobs = at::zeros({n}, f32), lse = at::full({n}, -kInf, f32);
  at::Tensor entropy = at::zeros({return_entropy ? n : 0}, f32);
  if (n == 0) return {logprobs, entropy, lse};

  const at::Tensor idx = active_rows(labels != ignore_index);
  const at::Tensor y = take_rows(labels, idx).contiguous();
  const int64_t na = y.size(0);
  if (na == 0) return {logprobs, entropy, lse};
  const at::Tensor h32 = take_rows(hidden, idx).to(at::kFloat).contiguous();
  const at::Tensor bias32 = bias.has_value() && bias->defined() ? bias->to(at::kFloat) : at::Tensor();

  at::Tensor m = at::full({na}, -kInf, f32), s = at::zeros({na}, f32), t = at::zeros({na}, f32);
  at::Tensor z_label = at::zeros({na}, f32);
  const float inv_temp = float(1.0 / temperature);
  for_each_tile<Tiles>(h32, weight, bias32, tile_rows, tile_cols,
                [&](at::Tensor& tile, int64_t r0, int64_t c0, const at::Tensor&, const at::Tensor&) {
                  Tiles::fold(tile, y.const_data_ptr<int64_t>() + r0, c0, float(softcap), inv_temp,
                              m.data_ptr<float>() + r0, s.data_ptr<float>() + r0, t.data_ptr<float>() + r0,
                              z_label.data_ptr<float>() + r0, return_entropy);
                });
  // Row statistics -> outputs (rlhf_fast/gather_logprobs_math.h: row_lse, label_logprob, row_entropy).
  const at::Tensor mass = s > 0;
  const at::Tensor safe_s = at::where(mass, s, at::ones_like(s));
  const at::Tensor lse_a = at::where(mass, m + safe_s.log(), at::full_like(s, -kInf));
  const at::Tensor lp_a = at::where(mass, z_label - lse_a, at::full_like(s, -kInf));
  auto put = [&](at::Tensor& out, const at::Tensor& v) {
    if (idx.defined()) out.index_copy_(0, idx, v); else out.copy_(v);
  };
  put(lse, lse_a);
  put(logprobs, lp_a);
  if (return_entropy) {
    put(entropy, at::where(mass, (safe_s.log() - t / safe_s).clamp_min(0), at::zeros_like(s)));
  }
  return {logprobs, entropy, lse};
}

template <typename Tiles>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, double softcap, int64_t ignore_index, int64_t tile_rows,
    int64_t tile_cols) {
  check_args(hidden, weight, bias, labels, temperature, softcap, tile_rows, tile_cols);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  check_vector(lse, "lse", n, at::kFloat, hidden);
  check_vector(grad_logprobs, "grad_logprobs", n, at::kFloat, hidden);
  const bool with_entropy = grad_entropy.has_value() && grad_entropy->defined();
  if (with_entropy) {
    check_vector(*grad_entropy, "grad_entropy", n, at::kFloat, hidden);
    check_vector(entropy, "entropy", n, at::kFloat, hidden);
  }
  const bool has_bias = bias.has_value() && bias->defined();
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor grad_hidden = at::zeros_like(hidden);
  // fp32 weight: accumulate straight into the output; otherwise into an fp32 buffer, cast once.
  at::Tensor gw32 = at::zeros({vocab, weight.size(1)}, f32);
  at::Tensor gb32 = has_bias ? at::zeros({vocab}, f32) : at::Tensor();
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    return {grad_hidden, gw32.to(weight.scalar_type()),
            has_bias ? gb32.to(bias->scalar_type()) : at::empty({0}, hidden.options())};
  };
  if (n == 0) return finish();

  const at::Tensor idx = active_rows((labels != ignore_index).logical_and_(lse.isfinite()));
  const at::Tensor y = take_rows(labels, idx).contiguous();
  const int64_t na = y.size(0);
  if (na == 0) return finish();
  const at::Tensor h32 = take_rows(hidden, idx).to(at::kFloat).contiguous();
  const at::Tensor bias32 = has_bias ? bias->to(at::kFloat) : at::Tensor();
  const at::Tensor lse_a = take_rows(lse, idx).contiguous(), g_a = take_rows(grad_logprobs, idx).contiguous();
  const at::Tensor ge_a = with_entropy ? take_rows(*grad_entropy, idx).contiguous() : at::Tensor();
  const at::Tensor ent_a = with_entropy ? take_rows(entropy, idx).contiguous() : at::Tensor();
  at::Tensor gh32 = at::zeros({na, hidden.size(1)}, f32);
  const float inv_temp = float(1.0 / temperature);
  for_each_tile<Tiles>(h32, weight, bias32, tile_rows, tile_cols,
                [&](at::Tensor& tile, int64_t r0, int64_t c0, const at::Tensor& hr, const at::Tensor& w_c) {
                  Tiles::grad(tile, y.const_data_ptr<int64_t>() + r0, c0, float(softcap), inv_temp,
                              lse_a.const_data_ptr<float>() + r0, g_a.const_data_ptr<float>() + r0,
                              with_entropy ? ge_a.const_data_ptr<float>() + r0 : nullptr,
                              with_entropy ? ent_a.const_data_ptr<float>() + r0 : nullptr);
                  const int64_t nr = tile.size(0), vc = tile.size(1);
                  Tiles::matmul(gh32.narrow(0, r0, nr), tile, w_c, 1.0f);      // (nr, vc) @ (vc, H)
                  Tiles::matmul(gw32.narrow(0, c0, vc), tile.t(), hr, 1.0f);   // (vc, nr) @ (nr, H)
                  if (has_bias) gb32.narrow(0, c0, vc).add_(tile.sum(0));
                });
  if (idx.defined()) {
    grad_hidden.index_copy_(0, idx, gh32.to(hidden.scalar_type()));
  } else {
    grad_hidden.copy_(gh32);
  }
  return finish();
}

}  // namespace rlhf_fast::linear
