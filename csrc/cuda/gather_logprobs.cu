// CUDA kernels of gather_logprobs: per-token log-probs (and optionally the entropy) of a label
// under softmax(logits / T), and the gradient w.r.t. the logits.
//
// Shapes: logits (N, V) float32 / bfloat16 / float16, unit stride along V, any row stride;
// labels (N,) int64; outputs logprobs, entropy, lse (N,) fp32; grad_logits (N, V) contiguous in
// the logits' dtype. The row math (online softmax statistics, the gradient formula, the values at
// -inf and ignored rows) is rlhf_fast/gather_logprobs_math.h, shared with the CPU kernels.
//
// Cost model, bytes moved per logit for bf16 logits. The unfused PyTorch path in fp32
// (logits.float() -> log_softmax -> gather; entropy = -(logp.exp() * logp).sum(-1)) moves about
// 6 + 8 + 8 + 12 + 4 = 38 bytes and keeps fp32 (N, V) tensors alive for autograd. Here:
//   forward   reads the logits once: 2 bytes (plus 12 bytes written per row);
//   backward  reads the logits once and writes the gradient once: 4 bytes; p = exp(z - lse) is
//             recomputed from the saved lse, nothing of size (N, V) is kept between the passes.
// Both are memory bound: about one exp and ten fp32 instructions per element.
//
// Forward: one row per group of threads -- a whole block of kBigThreads threads when V is large,
// one warp per row (kSmallRows rows per block) when V <= kSmallVocab. Threads stride over the row
// in 16-byte slots (4 fp32 or 8 bf16/fp16 elements) read with one 128-bit load; kLoads slots are
// loaded before any is folded, to keep several loads in flight per thread. Each thread folds its
// elements with logprobs::push into a RowStats (running max, sum exp, sum exp * shifted logit);
// the statistics are combined with logprobs::merge, first across the warp with shuffles, then
// across warps through shared memory. Thread 0 of the row writes lse, logprob, entropy.
//
// Backward: a 1-D grid-stride loop over tiles (row, chunk of the row); a tile is handled by a
// group of 32..256 threads (several tiles per block when V is small), each thread computing
// kLoads slots: load, logprobs::grad_logit (plus g_lp at the label), times 1/T, store.
//
// Alignment. A row starts wherever row * row_stride puts it, so 16-byte alignment is decided per
// row: with `a` = the row's misalignment in elements, slot k covers row positions
// [k*kVec - a, (k+1)*kVec - a) and is 16-byte aligned. Slots that straddle the row's start or end
// are read element by element with bounds checks; all others use one 128-bit access. The backward
// uses 128-bit accesses only when the logits row and the gradient row have the same misalignment
// (always true for contiguous logits); otherwise it falls back to element-wise accesses.
//
// Indexing: every offset (row * row_stride, positions, slot and tile numbers) is int64; grids
// are 1-D grid-stride loops capped at 2^31 - 1 blocks, so neither N, V nor N * V is limited by
// gridDim or 32-bit arithmetic.
//
// Build: part of rlhf_fast._C when torch has CUDA and nvcc exists (setup.py: CUDAExtension with
// nvcc -O3 -std=c++20 --use_fast_math -lineinfo, plus torch's -D__CUDA_NO_HALF_OPERATORS__ etc.).
// Without a GPU, tests/test_cuda_build.py compiles this file alone for sm_80 and sm_90 with the
// same flags and `-Xptxas -v`, and checks that no kernel spills:
//   pytest tests/test_cuda_build.py -s     (prints the nvcc command and registers per kernel)
// With a CPU-only torch it adds -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE: those wheels ship the c10/cuda
// headers but not the generated c10/cuda/impl/cuda_cmake_macros.h (which only matters on Windows).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <rlhf_fast/checks.h>
#include <rlhf_fast/cuda_row_stats.cuh>
#include <rlhf_fast/gather_logprobs_math.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace rlhf_fast::cuda {
namespace {

using logprobs::RowStats;

// Forward launch shapes: one block of kBigThreads threads per row, or one warp per row with
// kSmallRows rows per block when V <= kSmallVocab (a block per row would leave most threads idle).
constexpr int kBigThreads = 512;
constexpr int kSmallRows = 8;
constexpr int64_t kSmallVocab = 4096;
// Backward: 256 threads per block, split into groups of 32..256 threads, one tile per group.
constexpr int kBwdThreads = 256;
// 16-byte slots each thread loads before using any of them (memory-level parallelism).
constexpr int kLoads = 4;

// Elements per 16-byte slot.
template <typename T>
constexpr int vec_of() {
  return 16 / int(sizeof(T));
}

// One 16-byte slot, moved with a single 128-bit load or store.
template <typename T>
struct alignas(16) Pack {
  static_assert(16 % sizeof(T) == 0, "element size must divide 16 bytes");
  T v[vec_of<T>()];
};

// Misalignment of p in elements within its 16-byte slot (meaningful when p is element-aligned).
template <typename T>
__device__ __forceinline__ int misalignment(const T* p) {
  return int((reinterpret_cast<uintptr_t>(p) / sizeof(T)) & uintptr_t(vec_of<T>() - 1));
}

// Loads the slot starting at row position p0: one 128-bit load when the slot lies inside the row
// and is aligned (`vec_ok`), element-wise otherwise; positions outside [0, vocab) get `fill`.
// Slots stay in the storage dtype until used, so a bf16 slot costs 4 registers, not 8.
template <typename T>
__device__ __forceinline__ Pack<T> load_slot(const T* __restrict__ row, int64_t p0, int64_t vocab, bool vec_ok,
                                             T fill) {
  constexpr int kVec = vec_of<T>();
  if (vec_ok && p0 >= 0 && p0 + kVec <= vocab) return *reinterpret_cast<const Pack<T>*>(row + p0);
  Pack<T> pk;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const int64_t p = p0 + e;
    pk.v[e] = (p >= 0 && p < vocab) ? row[p] : fill;
  }
  return pk;
}

// Stores the slot starting at row position p0, skipping positions outside [0, vocab).
template <typename T>
__device__ __forceinline__ void store_slot(T* __restrict__ row, int64_t p0, int64_t vocab, bool vec_ok,
                                           const Pack<T>& pk) {
  constexpr int kVec = vec_of<T>();
  if (vec_ok && p0 >= 0 && p0 + kVec <= vocab) {
    *reinterpret_cast<Pack<T>*>(row + p0) = pk;
    return;
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const int64_t p = p0 + e;
    if (p >= 0 && p < vocab) row[p] = pk.v[e];
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

// logits      (N, V) at row stride row_stride, unit stride along V
// labels      (N,) int64
// logprobs    (N,) fp32 out: log softmax(z)[y], 0 where y == ignore_index (or y outside [0, V))
// entropy     (N,) fp32 out, or nullptr: H(softmax(z)), 0 where the logprob is 0 by the rule above
// lse         (N,) fp32 out: logsumexp(z), -inf for an all -inf row
// z = logits * inv_temp. kThreadsPerRow is kWarp (warp per row) or the block size (block per row).
template <typename T, int kThreadsPerRow, int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    gather_logprobs_fwd_kernel(const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ labels,
                               int64_t n_rows, int64_t vocab, float inv_temp, int64_t ignore_index,
                               bool vec_ok, float* __restrict__ logprobs_out, float* __restrict__ entropy_out,
                               float* __restrict__ lse_out) {
  static_assert(kThreadsPerRow == kWarp || kThreadsPerRow == kBlockThreads, "warp or block per row");
  static_assert(kBlockThreads % kThreadsPerRow == 0 && kBlockThreads / kWarp <= kWarp, "launch shape");
  constexpr int kVec = vec_of<T>();
  constexpr int kRowsPerBlock = kBlockThreads / kThreadsPerRow;
  constexpr int kWarps = kBlockThreads / kWarp;
  __shared__ RowStats warp_stats[kThreadsPerRow > kWarp ? kWarps : 1];

  const int lane = int(threadIdx.x) % kThreadsPerRow;  // thread within its row group
  const int64_t first_row = int64_t(blockIdx.x) * kRowsPerBlock + int(threadIdx.x) / kThreadsPerRow;
  const int64_t row_step = int64_t(gridDim.x) * kRowsPerBlock;
  // Trip counts are uniform across each row group (and across the block when a block owns a row),
  // so the __syncthreads below are reached by every thread of the block.
  for (int64_t row = first_row; row < n_rows; row += row_step) {
    const T* x = logits + row * row_stride;
    const int a = misalignment(x);
    const int64_t n_slots = (vocab + a + kVec - 1) / kVec;

    RowStats st = logprobs::empty_stats();
    constexpr int64_t kSlotStep = int64_t(kThreadsPerRow) * kVec;  // positions between a thread's slots
    for (int64_t k0 = lane; k0 < n_slots; k0 += int64_t(kLoads) * kThreadsPerRow) {
      const int64_t p0 = k0 * kVec - a;  // row position of this thread's first slot
      Pack<T> v[kLoads];
      if (vec_ok && p0 >= 0 && p0 + (kLoads - 1) * kSlotStep + kVec <= vocab) {  // the row's interior
#pragma unroll
        for (int u = 0; u < kLoads; ++u) v[u] = *reinterpret_cast<const Pack<T>*>(x + p0 + u * kSlotStep);
      } else {  // first and last slots of the row; slots past its end read nothing
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          v[u] = load_slot(x, p0 + u * kSlotStep, vocab, vec_ok, static_cast<T>(-INFINITY));
        }
      }
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          logprobs::push(st, static_cast<float>(v[u].v[e]) * inv_temp);  // the -inf fill is a no-op
        }
      }
    }

    st = warp_merge(st);
    if constexpr (kThreadsPerRow > kWarp) {
      const int warp = int(threadIdx.x) / kWarp, wlane = int(threadIdx.x) % kWarp;
      if (wlane == 0) warp_stats[warp] = st;
      __syncthreads();
      if (warp == 0) st = warp_merge(wlane < kWarps ? warp_stats[wlane] : logprobs::empty_stats());
      __syncthreads();  // warp_stats is rewritten by the next row
    }

    if (lane == 0) {
      const float row_lse = logprobs::row_lse(st);
      lse_out[row] = row_lse;
      const int64_t y = labels[row];
      // Label range is validated by the Python layer for CUDA; the guard only keeps the read in bounds.
      const bool valid = y != ignore_index && y >= 0 && y < vocab;
      logprobs_out[row] = valid ? logprobs::label_logprob(static_cast<float>(x[y]) * inv_temp, row_lse) : 0.f;
      if (entropy_out != nullptr) entropy_out[row] = valid ? logprobs::row_entropy(st) : 0.f;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// grad_logprobs, lse (N,) fp32; grad_entropy, entropy (N,) fp32, read only when kEntropy.
// grad (N, V) contiguous out, dtype of logits:
//   (g_lp * ([j == y] - p_j) - g_H * p_j * (log p_j + H)) / T, a zero row where !row_has_grad.
// A tile is kLoads * threads_per_tile slots of one row; tiles_per_row tiles cover a row.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kBwdThreads)
    gather_logprobs_bwd_kernel(const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ labels,
                               const float* __restrict__ lse, const float* __restrict__ grad_logprobs,
                               const float* __restrict__ grad_entropy, const float* __restrict__ entropy,
                               T* __restrict__ grad, int64_t n_rows, int64_t vocab, float inv_temp,
                               int64_t ignore_index, bool elem_aligned, int tile_shift, int64_t tiles_per_row) {
  constexpr int kVec = vec_of<T>();
  const int threads_per_tile = 1 << tile_shift;
  const int groups = kBwdThreads >> tile_shift;
  const int lane = int(threadIdx.x) & (threads_per_tile - 1);
  const int64_t n_tiles = n_rows * tiles_per_row;
  const int64_t tile_step = int64_t(gridDim.x) * groups;
  for (int64_t tile = int64_t(blockIdx.x) * groups + (int(threadIdx.x) >> tile_shift); tile < n_tiles;
       tile += tile_step) {
    const int64_t row = tile / tiles_per_row;
    const int64_t chunk = tile - row * tiles_per_row;
    const T* x = logits + row * row_stride;
    T* out = grad + row * vocab;
    // 128-bit accesses need the same misalignment in both rows; otherwise go element-wise (a = 0).
    const int a_x = misalignment(x), a_out = misalignment(out);
    const bool vec_ok = elem_aligned && a_x == a_out;
    const int a = vec_ok ? a_out : 0;

    const int64_t label = labels[row];
    const float row_lse = lse[row];
    const bool has_grad = logprobs::row_has_grad(label, ignore_index, row_lse);  // uniform per tile
    const float g = grad_logprobs[row];
    const float ge = kEntropy ? grad_entropy[row] : 0.f;
    const float h = kEntropy ? entropy[row] : 0.f;

    const int64_t slot_step = int64_t(threads_per_tile) * kVec;  // positions between a thread's slots
    const int64_t p0 = (chunk * kLoads * threads_per_tile + lane) * kVec - a;  // this thread's first slot
    const bool interior = vec_ok && p0 >= 0 && p0 + (kLoads - 1) * slot_step + kVec <= vocab;
    Pack<T> v[kLoads];
    if (has_grad) {
      if (interior) {
#pragma unroll
        for (int u = 0; u < kLoads; ++u) v[u] = *reinterpret_cast<const Pack<T>*>(x + p0 + u * slot_step);
      } else {
#pragma unroll
        for (int u = 0; u < kLoads; ++u) v[u] = load_slot(x, p0 + u * slot_step, vocab, vec_ok, static_cast<T>(0.f));
      }
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int64_t label_at = label - (p0 + u * slot_step);  // the label's element in this slot, if in [0, kVec)
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float gz = 0.f;
        if (has_grad) {
          const float z = static_cast<float>(v[u].v[e]) * inv_temp;
          gz = logprobs::grad_logit<logprobs::ScalarOps>(z, row_lse, g, ge, h, kEntropy);
          if (e == label_at) gz += g;  // the label's own term; never true for an out-of-range label
        }
        v[u].v[e] = static_cast<T>(gz * inv_temp);
      }
      if (interior) {
        *reinterpret_cast<Pack<T>*>(out + p0 + u * slot_step) = v[u];
      } else {
        store_slot(out, p0 + u * slot_step, vocab, vec_ok, v[u]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

#define RLHF_FAST_CUDA_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// 128-bit accesses assume element-aligned data pointers (always true for tensors from the
// allocator; not for a view built at an odd byte offset into an untyped buffer).
template <typename T>
bool element_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(T) == 0;
}

inline unsigned grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return unsigned(std::min<int64_t>(std::max<int64_t>(blocks, 1), INT_MAX));
}

template <typename T>
void launch_fwd(const at::Tensor& logits, const at::Tensor& labels, float inv_temp, int64_t ignore_index,
                at::Tensor& logprobs, float* entropy, at::Tensor& lse, cudaStream_t stream) {
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const int64_t row_stride = n > 1 ? logits.stride(0) : 0;
  const T* x = logits.const_data_ptr<T>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const bool vec_ok = element_aligned<T>(x);
  if (vocab <= kSmallVocab) {
    constexpr int kThreads = kWarp * kSmallRows;
    gather_logprobs_fwd_kernel<T, kWarp, kThreads><<<grid_for(n, kSmallRows), kThreads, 0, stream>>>(
        x, row_stride, y, n, vocab, inv_temp, ignore_index, vec_ok, logprobs.data_ptr<float>(), entropy,
        lse.data_ptr<float>());
  } else {
    gather_logprobs_fwd_kernel<T, kBigThreads, kBigThreads><<<grid_for(n, 1), kBigThreads, 0, stream>>>(
        x, row_stride, y, n, vocab, inv_temp, ignore_index, vec_ok, logprobs.data_ptr<float>(), entropy,
        lse.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_bwd(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& logits,
                const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy, float inv_temp,
                int64_t ignore_index, at::Tensor& grad_logits, cudaStream_t stream) {
  constexpr int kVec = vec_of<T>();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const int64_t row_stride = n > 1 ? logits.stride(0) : 0;
  // Slots a row can span (one more than V / kVec when misaligned), then the smallest power-of-two
  // group in [32, 256] that covers a row in one tile, so small vocabularies share blocks.
  const int64_t row_slots = (vocab + 2 * kVec - 2) / kVec;
  int tile_shift = 5;  // log2 of the threads per tile: 32 .. kBwdThreads
  while ((1 << tile_shift) < kBwdThreads && (int64_t(1) << tile_shift) * kLoads < row_slots) ++tile_shift;
  const int64_t tile_slots = (int64_t(1) << tile_shift) * kLoads;
  const int64_t tiles_per_row = (row_slots + tile_slots - 1) / tile_slots;
  const unsigned blocks = grid_for(n * tiles_per_row, kBwdThreads >> tile_shift);
  const float* g_lp = grad_logprobs.const_data_ptr<float>();
  const float* l = lse.const_data_ptr<float>();
  const T* x = logits.const_data_ptr<T>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  T* out = grad_logits.data_ptr<T>();
  const bool aligned = element_aligned<T>(x) && element_aligned<T>(out);
  if (grad_entropy.defined()) {
    gather_logprobs_bwd_kernel<T, true><<<blocks, kBwdThreads, 0, stream>>>(
        x, row_stride, y, l, g_lp, grad_entropy.const_data_ptr<float>(), entropy.const_data_ptr<float>(), out, n,
        vocab, inv_temp, ignore_index, aligned, tile_shift, tiles_per_row);
  } else {
    gather_logprobs_bwd_kernel<T, false><<<blocks, kBwdThreads, 0, stream>>>(
        x, row_stride, y, l, g_lp, nullptr, nullptr, out, n, vocab, inv_temp, ignore_index, aligned, tile_shift,
        tiles_per_row);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points (same signatures as gather_logprobs_fwd_cpu / gather_logprobs_bwd_cpu).

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_fwd_cuda(const at::Tensor& logits_in,
                                                                       const at::Tensor& labels,
                                                                       double temperature, int64_t ignore_index,
                                                                       bool return_entropy) {
  check_gather_logprobs_fwd(logits_in, labels, temperature);
  const int64_t n = logits_in.size(0);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto opts = logits_in.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor entropy = at::empty({return_entropy ? n : 0}, opts);
  if (n == 0) return {logprobs, entropy, lse};
  const at::Tensor& logits = logits_in;  // check_rows: unit stride along V
  const at::Tensor y = labels.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* ent = return_entropy ? entropy.data_ptr<float>() : nullptr;
  RLHF_FAST_CUDA_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "gather_logprobs_fwd_cuda", [&] {
    launch_fwd<scalar_t>(logits, y, float(1.0 / temperature), ignore_index, logprobs, ent, lse, stream);
  });
  return {logprobs, entropy, lse};
}

at::Tensor gather_logprobs_bwd_cuda(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                    const at::Tensor& logits_in, const at::Tensor& labels, const at::Tensor& lse,
                                    const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  const int64_t n = logits_in.size(0);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor g_ent, ent;
  if (check_gather_logprobs_bwd(grad_logprobs, grad_entropy, logits_in, labels, lse, entropy, temperature)) {
    g_ent = grad_entropy->contiguous();
    ent = entropy.contiguous();
  }
  at::Tensor grad_logits =
      at::empty(logits_in.sizes(), logits_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return grad_logits;
  const at::Tensor& logits = logits_in;  // check_rows: unit stride along V
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RLHF_FAST_CUDA_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "gather_logprobs_bwd_cuda", [&] {
    launch_bwd<scalar_t>(grad_logprobs.contiguous(), g_ent, logits, labels.contiguous(), lse.contiguous(), ent,
                         float(1.0 / temperature), ignore_index, grad_logits, stream);
  });
  return grad_logits;
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) {
  m.impl("gather_logprobs_fwd", &gather_logprobs_fwd_cuda);
  m.impl("gather_logprobs_bwd", &gather_logprobs_bwd_cuda);
}

}  // namespace rlhf_fast::cuda
