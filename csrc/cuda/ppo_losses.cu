// CUDA kernels of the RL losses: kl_penalty (writing kl and, when a gradient is needed, dk/dx),
// ppo_policy_loss and value_loss (one pass writing the per-token gradient and per-tile partial sums,
// then a finalize kernel). Same schemas and semantics as the CPU entry points
// (csrc/cpu/ppo_losses.cpp); the per-token math is rlhf_fast/ppo_losses_math.h, shared with the CPU
// kernels. There are no backward kernels: the backward of every op is a PyTorch multiply of the
// saved derivative by the upstream gradient (rlhf_fast/ops/_aggregation.py, kl_penalty.py).
//
// Shapes: every input (B, T) (kl_penalty: (R, C)) with its own float dtype (fp32 / bf16 / fp16; the
// mask also bool) and its own strides; outputs contiguous. One kernel serves every dtype
// combination: load_tile reads a thread's kPerThread elements of one input as fp32 behind a single
// switch on its dtype (uniform across the grid: no divergence), instead of 3^3 * 4 template
// instances of each kernel.
//
// Cost model, per token, inputs of b bytes (mask 1): kl forward reads 2b and writes 4 (+ 4 for dk/dx
// when a gradient is needed); a loss forward reads 3b + 1 and writes 4 (the per-token gradient
// m * dl/dx, only when a gradient is needed) plus 32 bytes per tile of 2048 tokens; each backward
// (a PyTorch multiply) reads 4 + 4 and writes b. At RL batch sizes ((64, 2048) = 131k tokens) every
// kernel is a few microseconds, so the design goal is few launches: kl 1, each loss 2 (tiles,
// finalize), each backward 1-2, against ~40 for the eager reference.
//
// Tiles: a block of kThreads threads handles kTileCols columns of one row (kPerThread elements per
// thread, strided by kThreads so that a warp's loads are coalesced; element-sized loads, not 128-bit
// ones, since each input may have its own dtype and strides) and reduces its partial sums with warp
// shuffles, then across warps in shared memory; tiles are enumerated by a 1-D grid-stride loop, so
// neither B nor T is limited by gridDim. The finalize kernel (one block) combines the tiles of each row in order, then the rows,
// in fp64: results are deterministic (no atomics) and counts exact far beyond 2^24 tokens.
// Indexing is int64 throughout.
//
// Build: part of rlhf_fast._C when torch has CUDA and nvcc exists (setup.py). Without a GPU,
// tests/test_cuda_build.py compiles this file for sm_80 and sm_90 with setup.py's flags and checks
// that no kernel spills registers:  pytest tests/test_cuda_build.py -s
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <rlhf_fast/ppo_losses_checks.h>
#include <rlhf_fast/ppo_losses_math.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace rlhf_fast::cuda {
namespace {

using ppo::ScalarOps;

constexpr int kThreads = 256;
constexpr int kPerThread = 8;
constexpr int64_t kTileCols = int64_t(kThreads) * kPerThread;  // 2048 columns per tile
constexpr int kFinalizeThreads = 256;

// Storage dtypes an input may have.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kBool = 3, kF64 = 4, kI32 = 5, kI64 = 6 };

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    case at::kBool: return kBool;
    case at::kDouble: return kF64;
    case at::kInt: return kI32;
    case at::kLong: return kI64;
    default: TORCH_CHECK_VALUE(false, "rlhf_fast: unsupported dtype ", t);
  }
}

__device__ __forceinline__ float load_as_float(const void* p, int dtype) {
  switch (dtype) {
    case kF32: return *static_cast<const float*>(p);
    case kBF16: return float(*static_cast<const at::BFloat16*>(p));
    case kF16: return float(*static_cast<const at::Half*>(p));
    default: return *static_cast<const bool*>(p) ? 1.f : 0.f;  // kBool
  }
}

// num_items: any real or integer dtype, as a double (exact for integer counts up to 2^53).
__device__ __forceinline__ double load_as_double(const void* p, int dtype) {
  switch (dtype) {
    case kF64: return *static_cast<const double*>(p);
    case kI32: return double(*static_cast<const int32_t*>(p));
    case kI64: return double(*static_cast<const int64_t*>(p));
    default: return double(load_as_float(p, dtype));
  }
}

// A (rows, cols) input of any supported dtype and strides.
struct Src {
  const char* data;
  int64_t row_stride, col_stride;  // in elements
  int dtype;
};

Src make_src(const at::Tensor& t) {
  return Src{static_cast<const char*>(t.const_data_ptr()), t.size(0) > 1 ? t.stride(0) : 0,
             t.size(1) > 1 ? t.stride(1) : 1, int(dtype_code(t.scalar_type()))};
}

// This thread's kPerThread elements of a tile: columns c0 + k * kThreads + threadIdx.x (a warp reads
// 32 consecutive elements per k: coalesced), as fp32; 0 past the row's end.
template <typename T>
__device__ __forceinline__ void load_tile_as(const Src& s, int64_t row, int64_t c0, int64_t cols,
                                             float (&out)[kPerThread]) {
  const T* base = reinterpret_cast<const T*>(s.data) + row * s.row_stride;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t col = c0 + k * kThreads + threadIdx.x;
    out[k] = col < cols ? static_cast<float>(base[col * s.col_stride]) : 0.f;
  }
}

// One switch on the (grid-uniform) dtype per input and tile, then kPerThread independent loads.
__device__ __forceinline__ void load_tile(const Src& s, int64_t row, int64_t c0, int64_t cols,
                                          float (&out)[kPerThread]) {
  switch (s.dtype) {
    case kF32: load_tile_as<float>(s, row, c0, cols, out); break;
    case kBF16: load_tile_as<at::BFloat16>(s, row, c0, cols, out); break;
    case kF16: load_tile_as<at::Half>(s, row, c0, cols, out); break;
    default: load_tile_as<bool>(s, row, c0, cols, out); break;  // kBool
  }
}

// Block-wide reductions over kThreads threads: butterfly shuffles within each warp, then the warps'
// results through shared memory (kThreads / 32 values). Every thread receives the result; the
// order of operations is fixed, so results are deterministic.
constexpr int kWarps = kThreads / 32;

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* sh, Op op) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, mask));
  if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = v;
  __syncthreads();
  float r = sh[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, sh[w]);
  __syncthreads();  // sh is reused by the next reduction
  return r;
}

// ---------------------------------------------------------------------------------------------
// kl_penalty

// kl (rows, cols) fp32 contiguous out, and dkl = dk/dx (rows, cols) fp32 contiguous out unless null.
// The grid-stride loop runs over tiles of kTileCols columns.
template <int kEstimator>
__global__ void __launch_bounds__(kThreads)
    kl_penalty_fwd_kernel(Src lp, Src ref, float* __restrict__ kl, float* __restrict__ dkl, int64_t rows,
                          int64_t cols, int64_t per_row, float clamp) {
  for (int64_t tile = blockIdx.x; tile < rows * per_row; tile += gridDim.x) {
    const int64_t row = tile / per_row, c0 = (tile - row * per_row) * kTileCols;
    float a[kPerThread], b[kPerThread];
    load_tile(lp, row, c0, cols, a);
    load_tile(ref, row, c0, cols, b);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t col = c0 + k * kThreads + threadIdx.x;
      float v, dv;
      ppo::kl_token<ScalarOps, kEstimator>(a[k] - b[k], clamp, v, dv);
      if (col < cols) {
        kl[row * cols + col] = v;
        if (dkl != nullptr) dkl[row * cols + col] = dv;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ppo_policy_loss and value_loss: per-tile partials (ppo::PolicyPartial / ppo::ValuePartial order)

// partials (rows * per_row, kPolicyPartials) fp32 out; token_grad (rows, cols) fp32 out or nullptr.
__global__ void __launch_bounds__(kThreads)
    ppo_policy_partials_kernel(Src lp, Src old, Src adv, Src mask, float* __restrict__ partials,
                               float* __restrict__ token_grad, int64_t rows, int64_t cols, int64_t per_row,
                               float ratio_low, float ratio_high, float dual_clip) {
  __shared__ float sh[kWarps];
  for (int64_t tile = blockIdx.x; tile < rows * per_row; tile += gridDim.x) {
    const int64_t row = tile / per_row, c0 = (tile - row * per_row) * kTileCols;
    float m[kPerThread], x_lp[kPerThread], x_old[kPerThread], x_adv[kPerThread];
    load_tile(mask, row, c0, cols, m);  // 0 past the row's end: those lanes count as masked
    load_tile(lp, row, c0, cols, x_lp);
    load_tile(old, row, c0, cols, x_old);
    load_tile(adv, row, c0, cols, x_adv);
    float s_loss = 0.f, s_count = 0.f, s_clipped = 0.f, s_dual = 0.f, s_k3 = 0.f, s_ratio = 0.f;
    float r_min = INFINITY, r_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const bool valid = m[k] != 0.f;
      // masked positions become zeros: whatever they hold cannot reach a sum or the gradient
      const auto t = ppo::policy_token<ScalarOps>(valid ? x_lp[k] : 0.f, valid ? x_old[k] : 0.f,
                                                  valid ? x_adv[k] : 0.f, ratio_low, ratio_high, dual_clip);
      s_loss += m[k] * t.loss;
      s_count += m[k];
      s_clipped += m[k] * t.clipped;
      s_dual += m[k] * t.dual;
      s_k3 += m[k] * t.k3;
      s_ratio += m[k] * t.ratio;
      r_min = valid ? fminf(r_min, t.ratio) : r_min;
      r_max = valid ? fmaxf(r_max, t.ratio) : r_max;
      const int64_t col = c0 + k * kThreads + threadIdx.x;
      if (token_grad != nullptr && col < cols) token_grad[row * cols + col] = m[k] * t.grad;
    }
    const float sums[6] = {s_loss, s_count, s_clipped, s_dual, s_k3, s_ratio};
    float totals[6];
#pragma unroll
    for (int i = 0; i < 6; ++i) totals[i] = block_reduce(sums[i], sh, SumOp{});
    r_min = block_reduce(r_min, sh, MinOp{});
    r_max = block_reduce(r_max, sh, MaxOp{});
    if (threadIdx.x == 0) {
      float* out = partials + tile * ppo::kPolicyPartials;
#pragma unroll
      for (int i = 0; i < 6; ++i) out[i] = totals[i];
      out[ppo::kPolRatioMin] = r_min;
      out[ppo::kPolRatioMax] = r_max;
    }
  }
}

// Moments of R and R - v per tile, two passes over the registers: the tile's weighted means (block
// sums), then the weighted squared deviations from them. No E[x^2] - E[x]^2 cancellation; tiles
// are merged by the finalize kernel with Chan's formula.
__global__ void __launch_bounds__(kThreads)
    value_partials_kernel(Src val, Src old, Src ret, Src mask, float* __restrict__ partials,
                          float* __restrict__ token_grad, int64_t rows, int64_t cols, int64_t per_row,
                          float clip_eps) {
  __shared__ float sh[kWarps];
  for (int64_t tile = blockIdx.x; tile < rows * per_row; tile += gridDim.x) {
    const int64_t row = tile / per_row, c0 = (tile - row * per_row) * kTileCols;
    float m[kPerThread], v[kPerThread], v_old[kPerThread], r[kPerThread];
    load_tile(mask, row, c0, cols, m);
    load_tile(val, row, c0, cols, v);
    load_tile(old, row, c0, cols, v_old);
    load_tile(ret, row, c0, cols, r);
    float s_loss = 0.f, s_clipped = 0.f, s_count = 0.f, s_ret = 0.f, s_err = 0.f;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const bool valid = m[k] != 0.f;
      v[k] = valid ? v[k] : 0.f;
      r[k] = valid ? r[k] : 0.f;
      const auto t = ppo::value_token<ScalarOps>(v[k], valid ? v_old[k] : 0.f, r[k], clip_eps);
      s_loss += m[k] * t.loss;
      s_clipped += m[k] * t.clipped;
      s_count += m[k];
      s_ret += m[k] * r[k];
      s_err += m[k] * (r[k] - v[k]);
      const int64_t col = c0 + k * kThreads + threadIdx.x;
      if (token_grad != nullptr && col < cols) token_grad[row * cols + col] = m[k] * t.grad;
    }
    s_loss = block_reduce(s_loss, sh, SumOp{});
    s_clipped = block_reduce(s_clipped, sh, SumOp{});
    s_count = block_reduce(s_count, sh, SumOp{});
    const float inv = s_count != 0.f ? 1.f / s_count : 0.f;
    const float mean_ret = block_reduce(s_ret, sh, SumOp{}) * inv;
    const float mean_err = block_reduce(s_err, sh, SumOp{}) * inv;
    float m2_ret = 0.f, m2_err = 0.f;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const float dr = m[k] != 0.f ? r[k] - mean_ret : 0.f;
      const float de = m[k] != 0.f ? r[k] - v[k] - mean_err : 0.f;
      m2_ret += m[k] * dr * dr;
      m2_err += m[k] * de * de;
    }
    m2_ret = block_reduce(m2_ret, sh, SumOp{});
    m2_err = block_reduce(m2_err, sh, SumOp{});
    if (threadIdx.x == 0) {
      float* out = partials + tile * ppo::kValuePartials;
      out[ppo::kValLoss] = s_loss;
      out[ppo::kValCount] = s_count;
      out[ppo::kValClipped] = s_clipped;
      out[ppo::kValRetMean] = mean_ret;
      out[ppo::kValRetM2] = m2_ret;
      out[ppo::kValErrMean] = mean_err;
      out[ppo::kValErrM2] = m2_err;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Finalize: tiles -> rows -> loss, w_b, statistics (one block; fp64 accumulation, fixed order)

struct PolicyTotals {
  double count, clipped, dual, k3, ratio, r_min, r_max;
};

__device__ __forceinline__ PolicyTotals combine(const PolicyTotals& a, const PolicyTotals& b) {
  return PolicyTotals{a.count + b.count, a.clipped + b.clipped, a.dual + b.dual, a.k3 + b.k3, a.ratio + b.ratio,
                      fmin(a.r_min, b.r_min), fmax(a.r_max, b.r_max)};
}

struct ValueTotals {
  double clipped;
  ppo::Moments ret, err;
};

__device__ __forceinline__ ValueTotals combine(const ValueTotals& a, const ValueTotals& b) {
  return ValueTotals{a.clipped + b.clipped, ppo::merge_moments(a.ret, b.ret), ppo::merge_moments(a.err, b.err)};
}

struct Pair {
  double a, b;
};

__device__ __forceinline__ Pair combine(const Pair& x, const Pair& y) { return Pair{x.a + y.a, x.b + y.b}; }

// Tree reduction over the kFinalizeThreads threads of the block; every thread gets the result. The
// loop stays rolled: unrolled, ptxas keeps every stage's `threadIdx.x < s` predicate live across
// the barriers and spills predicate registers on sm_80.
template <typename T>
__device__ __forceinline__ T block_combine(T v, T* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
#pragma unroll 1
  for (int s = kFinalizeThreads / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) sh[threadIdx.x] = combine(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const T r = sh[0];
  __syncthreads();
  return r;
}

// partials (rows * per_row, kPartials) -> loss (), stats, row_scale (rows,). num_items: a device
// scalar of dtype num_items_dtype when num_items_ptr is set, else num_items_value (< 0: not given).
template <bool kIsValue>
__global__ void __launch_bounds__(kFinalizeThreads)
    ppo_loss_finalize_kernel(const float* __restrict__ partials, int64_t rows, int64_t per_row, int aggregation,
                             const void* num_items_ptr, int num_items_dtype, double num_items_value,
                             double norm_length, float* __restrict__ loss_out, float* __restrict__ stats_out,
                             float* __restrict__ row_scale) {
  constexpr int kPartials = kIsValue ? int(ppo::kValuePartials) : int(ppo::kPolicyPartials);
  constexpr int kCount = kIsValue ? int(ppo::kValCount) : int(ppo::kPolCount);
  __shared__ union {
    Pair pair[kFinalizeThreads];
    PolicyTotals policy[kFinalizeThreads];
    ValueTotals value[kFinalizeThreads];
  } sh;
  __shared__ float divisor_sh;

  // 1. tokens per row -> total tokens, rows with tokens
  Pair tok{0, 0};
  for (int64_t b = threadIdx.x; b < rows; b += kFinalizeThreads) {
    double n = 0;
    for (int64_t j = 0; j < per_row; ++j) n += partials[(b * per_row + j) * kPartials + kCount];
    tok.a += n;
    tok.b += n > 0 ? 1 : 0;
  }
  tok = block_combine(tok, sh.pair);
  if (threadIdx.x == 0) {
    const double items = num_items_ptr != nullptr ? load_as_double(num_items_ptr, num_items_dtype)
                                                  : num_items_value;
    divisor_sh = float(ppo::agg_divisor(aggregation, tok.a, tok.b, double(rows), items, norm_length));
  }
  __syncthreads();
  const float divisor = divisor_sh;

  // 2. w_b and the loss
  double loss = 0;
  for (int64_t b = threadIdx.x; b < rows; b += kFinalizeThreads) {
    double row_loss = 0, n = 0;
    for (int64_t j = 0; j < per_row; ++j) {
      const float* p = partials + (b * per_row + j) * kPartials;
      row_loss += p[0];  // kPolLoss == kValLoss == 0
      n += p[kCount];
    }
    const float w = ppo::row_weight(aggregation, divisor, float(n));
    row_scale[b] = w;
    loss += double(w) * row_loss;
  }
  const Pair total_loss = block_combine(Pair{loss, 0}, sh.pair);
  if (threadIdx.x == 0) *loss_out = float(total_loss.a);

  // 3. statistics over all tiles
  const int64_t n_tiles = rows * per_row;
  if constexpr (kIsValue) {
    ValueTotals acc{0, {0, 0, 0}, {0, 0, 0}};
    for (int64_t t = threadIdx.x; t < n_tiles; t += kFinalizeThreads) {
      const float* p = partials + t * kPartials;
      const ValueTotals v{p[ppo::kValClipped], ppo::Moments{p[ppo::kValCount], p[ppo::kValRetMean], p[ppo::kValRetM2]},
                          ppo::Moments{p[ppo::kValCount], p[ppo::kValErrMean], p[ppo::kValErrM2]}};
      acc = combine(acc, v);
    }
    acc = block_combine(acc, sh.value);
    if (threadIdx.x == 0) ppo::value_stats(acc.clipped, acc.ret, acc.err, stats_out);
  } else {
    PolicyTotals acc{0, 0, 0, 0, 0, INFINITY, -INFINITY};
    for (int64_t t = threadIdx.x; t < n_tiles; t += kFinalizeThreads) {
      const float* p = partials + t * kPartials;
      acc = combine(acc, PolicyTotals{p[ppo::kPolCount], p[ppo::kPolClipped], p[ppo::kPolDual], p[ppo::kPolK3],
                                      p[ppo::kPolRatio], p[ppo::kPolRatioMin], p[ppo::kPolRatioMax]});
    }
    acc = block_combine(acc, sh.policy);
    if (threadIdx.x == 0) {
      ppo::policy_stats(acc.count, acc.clipped, acc.dual, acc.k3, acc.ratio, acc.r_min, acc.r_max, stats_out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

unsigned grid_for(int64_t tiles) {
  return unsigned(std::min<int64_t>(std::max<int64_t>(tiles, 1), INT_MAX));
}

int64_t tiles_per_row(int64_t cols) { return cols > 0 ? (cols + kTileCols - 1) / kTileCols : 0; }

template <typename Fn>
void dispatch_estimator(int64_t estimator, const Fn& fn) {
  switch (estimator) {
    case ppo::kK1: fn(std::integral_constant<int, ppo::kK1>{}); break;
    case ppo::kAbs: fn(std::integral_constant<int, ppo::kAbs>{}); break;
    case ppo::kK2: fn(std::integral_constant<int, ppo::kK2>{}); break;
    default: fn(std::integral_constant<int, ppo::kK3>{}); break;
  }
}

struct LossOutputs {
  at::Tensor loss, stats, token_grad, row_scale, partials;
};

LossOutputs allocate(const at::Tensor& like, int64_t n_stats, int64_t n_partials, bool need_grad) {
  const auto opts = like.options().dtype(at::kFloat);
  const int64_t rows = like.size(0), cols = like.size(1);
  return LossOutputs{at::empty({}, opts), at::empty({n_stats}, opts),
                     need_grad ? at::empty({rows, cols}, opts) : at::empty({0}, opts), at::empty({rows}, opts),
                     at::empty({rows * tiles_per_row(cols) * n_partials}, opts)};
}

template <bool kIsValue>
void launch_finalize(LossOutputs& out, int64_t rows, int64_t cols, int64_t aggregation,
                     const std::optional<at::Tensor>& num_items, int64_t num_items_int, int64_t norm_length,
                     cudaStream_t stream) {
  const void* items_ptr = num_items.has_value() ? num_items->const_data_ptr() : nullptr;
  const int items_dtype = num_items.has_value() ? int(dtype_code(num_items->scalar_type())) : 0;
  ppo_loss_finalize_kernel<kIsValue><<<1, kFinalizeThreads, 0, stream>>>(
      out.partials.const_data_ptr<float>(), rows, tiles_per_row(cols), int(aggregation), items_ptr, items_dtype,
      num_items_int >= 0 ? double(num_items_int) : -1.0, norm_length > 0 ? double(norm_length) : double(cols),
      out.loss.data_ptr<float>(), out.stats.data_ptr<float>(), out.row_scale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points (same signatures as the *_cpu ones in csrc/cpu/ppo_losses.cpp)

std::tuple<at::Tensor, at::Tensor> kl_penalty_fwd_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                       int64_t estimator, std::optional<double> clamp,
                                                       bool need_grad) {
  check_kl_penalty(logprobs, ref_logprobs, estimator, clamp);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const auto opts = logprobs.options().dtype(at::kFloat);
  at::Tensor kl = at::empty(logprobs.sizes(), opts);
  at::Tensor dkl = need_grad ? at::empty(logprobs.sizes(), opts) : at::empty({0}, opts);
  const int64_t rows = logprobs.size(0), cols = logprobs.size(1), per_row = tiles_per_row(cols);
  if (kl.numel() == 0) return {kl, dkl};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float c = clamp.has_value() ? float(*clamp) : 0.f;
  dispatch_estimator(estimator, [&](auto est) {
    kl_penalty_fwd_kernel<decltype(est)::value><<<grid_for(rows * per_row), kThreads, 0, stream>>>(
        make_src(logprobs), make_src(ref_logprobs), kl.data_ptr<float>(), need_grad ? dkl.data_ptr<float>() : nullptr,
        rows, cols, per_row, c);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kl, dkl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    double clip_eps_low, double clip_eps_high, std::optional<double> dual_clip, int64_t aggregation,
    const std::optional<at::Tensor>& num_items, int64_t num_items_int, int64_t norm_length, bool need_grad) {
  check_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps_low, clip_eps_high, dual_clip, aggregation,
                    num_items, norm_length);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const int64_t rows = logprobs.size(0), cols = logprobs.size(1), per_row = tiles_per_row(cols);
  LossOutputs out = allocate(logprobs, ppo::kPolicyStats, ppo::kPolicyPartials, need_grad);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (rows * per_row > 0) {
    ppo_policy_partials_kernel<<<grid_for(rows * per_row), kThreads, 0, stream>>>(
        make_src(logprobs), make_src(old_logprobs), make_src(advantages), make_src(mask),
        out.partials.data_ptr<float>(), need_grad ? out.token_grad.data_ptr<float>() : nullptr, rows, cols, per_row,
        float(1.0 - clip_eps_low), float(1.0 + clip_eps_high), dual_clip.has_value() ? float(*dual_clip) : 0.f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_finalize<false>(out, rows, cols, aggregation, num_items, num_items_int, norm_length, stream);
  return {out.loss, out.stats, out.token_grad, out.row_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_fwd_cuda(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    double clip_eps, int64_t aggregation, const std::optional<at::Tensor>& num_items, int64_t num_items_int,
    int64_t norm_length, bool need_grad) {
  check_value_loss(values, old_values, returns, mask, clip_eps, aggregation, num_items, norm_length);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = values.size(0), cols = values.size(1), per_row = tiles_per_row(cols);
  LossOutputs out = allocate(values, ppo::kValueStats, ppo::kValuePartials, need_grad);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (rows * per_row > 0) {
    value_partials_kernel<<<grid_for(rows * per_row), kThreads, 0, stream>>>(
        make_src(values), make_src(old_values), make_src(returns), make_src(mask), out.partials.data_ptr<float>(),
        need_grad ? out.token_grad.data_ptr<float>() : nullptr, rows, cols, per_row, float(clip_eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_finalize<true>(out, rows, cols, aggregation, num_items, num_items_int, norm_length, stream);
  return {out.loss, out.stats, out.token_grad, out.row_scale};
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) {
  m.impl("kl_penalty_fwd", &kl_penalty_fwd_cuda);
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd_cuda);
  m.impl("value_loss_fwd", &value_loss_fwd_cuda);
}

}  // namespace rlhf_fast::cuda
