// CUDA kernels of ranking_loss (and pairwise_loss, its K = 2 case): the reward model's K-wise loss
// and its gradient w.r.t. the rewards.
//
// Shapes: rewards (P, K) float32 / bfloat16 / float16 contiguous; num_candidates (P,) int64, ranks
// (P, K) int64, margins (P,) fp32, each optional (value ranges checked by the Python layer). Outputs
// loss, accuracy, mean_margin 0-dim fp32 and counts (2,) int64 = (pairs, ranked prompts); the
// backward writes grad_rewards (P, K) in the dtype of rewards. The pair math (orientation by rank,
// the stable softplus and sigmoid, the per-candidate gradient) is rlhf_fast/ranking_math.h, shared
// with the CPU kernels.
//
// Cost model: the eager vectorized loss moves ~10 (P, K, K) fp32 matrices per pass over ~15 launches
// (~20 backward); here the forward reads the P * K rewards once (one launch + a one-block finalize)
// and the backward reads them once more and writes the gradient once (one launch). At InstructGPT
// sizes (P = 1024, K = 9: 37 KB) both are launch-latency bound.
//
// Forward: one warp per prompt (kWarps per block, grid-stride over prompts); lane l takes candidates
// l, l + 32, ... as the first of a pair and loops over the later ones, adding each ranked pair with
// ranking::add_pair; the warp's sums are reduced with a shuffle butterfly, lane 0 adds the prompt's
// mean loss and counts to its warp's running totals; warps are added in a fixed order per block, and
// one block adds the per-block totals in a fixed order (deterministic for a given P).
// Backward: one warp per prompt; lane l computes the gradient of candidates l, l + 32, ... with
// ranking::candidate_grad (O(K) each) and counts its pairs; the count is reduced over the warp to
// scale the prompt by g / (pairs_p * ranked_prompts).
//
// Why a CUDA kernel beside the Triton one (kernels/ranking_loss.py): the Triton kernel keeps a prompt's
// K x K pairs in registers and refuses K > 64 (MAX_K); this one loops over the pairs, so it runs any K,
// and on a CUDA tensor with K > 64 it is the automatic choice (else the eager reference would run).
// It is rlhf_fast's only CUDA backend.
//
// Build: part of rlhf_fast._C when torch has CUDA and nvcc exists. Without a GPU,
// tests/test_cuda_build.py compiles this file alone for sm_80 and sm_90 and checks for spills.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <rlhf_fast/ranking_math.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace rlhf_fast::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = 8;  // prompts (warps) per block
constexpr int kThreads = kWarps * kWarp;
constexpr int kFinalizeThreads = 256;
// Blocks of the forward at most: the finalize adds one row of totals per block.
constexpr int64_t kMaxFwdBlocks = 4096;

// Running totals over prompts (kept by lane 0 of each warp, then per block).
struct Totals {
  float loss;       // sum over ranked prompts of the prompt's mean pair loss
  float diff;       // sum over pairs of r_w - r_l
  int64_t pairs;
  int64_t correct;
  int64_t ranked;   // prompts with >= 1 pair
};

__device__ __forceinline__ ranking::PairSums shfl_xor(const ranking::PairSums& s, int mask) {
  return ranking::PairSums{__shfl_xor_sync(kFullMask, s.loss, mask), __shfl_xor_sync(kFullMask, s.pairs, mask),
                           __shfl_xor_sync(kFullMask, s.correct, mask), __shfl_xor_sync(kFullMask, s.diff, mask)};
}

// One prompt's candidates, as ranking::candidate_grad reads them.
template <typename T>
struct Rewards {
  const T* r;
  RLHF_FAST_HD float operator()(int64_t i) const { return static_cast<float>(r[i]); }
};

struct Keys {
  const int64_t* rank;  // nullptr: the key is the position
  RLHF_FAST_HD int64_t operator()(int64_t i) const { return rank != nullptr ? rank[i] : i; }
};

// rewards (P, K); num (P,), ranks (P, K), margins (P,): each nullptr when absent
// totals_f (gridDim.x, 2) fp32 out: per block (sum of prompt mean losses, sum of r_w - r_l)
// totals_i (gridDim.x, 3) int64 out: per block (pairs, pairs with r_w > r_l, ranked prompts)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ranking_loss_fwd_kernel(const T* __restrict__ rewards, const int64_t* __restrict__ num,
                            const int64_t* __restrict__ ranks, const float* __restrict__ margins, float margin,
                            int64_t n_prompts, int64_t k, float* __restrict__ totals_f,
                            int64_t* __restrict__ totals_i) {
  __shared__ Totals warp_totals[kWarps];
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp;
  Totals acc{0.f, 0.f, 0, 0, 0};
  const int64_t warp_step = int64_t(gridDim.x) * kWarps;
  for (int64_t p = int64_t(blockIdx.x) * kWarps + warp; p < n_prompts; p += warp_step) {
    const int64_t n = num != nullptr ? num[p] : k;
    const Rewards<T> reward{rewards + p * k};
    const Keys key{ranks != nullptr ? ranks + p * k : nullptr};
    const float m = margin + (margins != nullptr ? margins[p] : 0.f);
    ranking::PairSums s = ranking::no_pairs();
    for (int64_t i = lane; i < n; i += kWarp) {
      const int64_t ki = key(i);
      const float ri = reward(i);
      for (int64_t j = i + 1; j < n; ++j) {
        const int o = ranking::orient(ki, key(j));
        if (o > 0) ranking::add_pair(s, ri, reward(j), m);
        if (o < 0) ranking::add_pair(s, reward(j), ri, m);
      }
    }
#pragma unroll
    for (int mask = kWarp / 2; mask > 0; mask >>= 1) s = ranking::merge(s, shfl_xor(s, mask));
    if (lane == 0 && s.pairs > 0) {
      acc.loss += s.loss / float(s.pairs);
      acc.diff += s.diff;
      acc.pairs += s.pairs;
      acc.correct += s.correct;
      acc.ranked += 1;
    }
  }
  if (lane == 0) warp_totals[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Totals b{0.f, 0.f, 0, 0, 0};
    for (int w = 0; w < kWarps; ++w) {
      b.loss += warp_totals[w].loss;
      b.diff += warp_totals[w].diff;
      b.pairs += warp_totals[w].pairs;
      b.correct += warp_totals[w].correct;
      b.ranked += warp_totals[w].ranked;
    }
    totals_f[blockIdx.x * 2] = b.loss;
    totals_f[blockIdx.x * 2 + 1] = b.diff;
    totals_i[blockIdx.x * 3] = b.pairs;
    totals_i[blockIdx.x * 3 + 1] = b.correct;
    totals_i[blockIdx.x * 3 + 2] = b.ranked;
  }
}

// One block adds the per-block totals in a fixed order and writes the outputs.
__global__ void __launch_bounds__(kFinalizeThreads)
    ranking_loss_finalize_kernel(const float* __restrict__ totals_f, const int64_t* __restrict__ totals_i,
                                 int64_t n_blocks, float* __restrict__ loss, float* __restrict__ accuracy,
                                 float* __restrict__ mean_margin, int64_t* __restrict__ counts) {
  __shared__ Totals thread_totals[kFinalizeThreads];
  Totals t{0.f, 0.f, 0, 0, 0};
  for (int64_t b = threadIdx.x; b < n_blocks; b += kFinalizeThreads) {
    t.loss += totals_f[b * 2];
    t.diff += totals_f[b * 2 + 1];
    t.pairs += totals_i[b * 3];
    t.correct += totals_i[b * 3 + 1];
    t.ranked += totals_i[b * 3 + 2];
  }
  thread_totals[threadIdx.x] = t;
  __syncthreads();
  for (int half = kFinalizeThreads / 2; half > 0; half >>= 1) {
    if (int(threadIdx.x) < half) {
      Totals& a = thread_totals[threadIdx.x];
      const Totals& o = thread_totals[threadIdx.x + half];
      a.loss += o.loss;
      a.diff += o.diff;
      a.pairs += o.pairs;
      a.correct += o.correct;
      a.ranked += o.ranked;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const Totals& all = thread_totals[0];
    const float pairs = float(all.pairs > 0 ? all.pairs : 1);
    *loss = all.loss / float(all.ranked > 0 ? all.ranked : 1);
    *accuracy = float(all.correct) / pairs;
    *mean_margin = all.diff / pairs;
    counts[0] = all.pairs;
    counts[1] = all.ranked;
  }
}

// grad (P, K) out in T; grad_loss () fp32; counts (2,) int64 from the forward.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ranking_loss_bwd_kernel(const float* __restrict__ grad_loss, const int64_t* __restrict__ counts,
                            const T* __restrict__ rewards, const int64_t* __restrict__ num,
                            const int64_t* __restrict__ ranks, const float* __restrict__ margins, float margin,
                            int64_t n_prompts, int64_t k, T* __restrict__ grad) {
  const int lane = int(threadIdx.x) % kWarp;
  const int64_t ranked = counts[1];
  const float g = ranked > 0 ? *grad_loss / float(ranked) : 0.f;
  const int64_t warp_step = int64_t(gridDim.x) * kWarps;
  for (int64_t p = int64_t(blockIdx.x) * kWarps + int(threadIdx.x) / kWarp; p < n_prompts; p += warp_step) {
    const int64_t n = num != nullptr ? num[p] : k;
    const Rewards<T> reward{rewards + p * k};
    const Keys key{ranks != nullptr ? ranks + p * k : nullptr};
    const float m = margin + (margins != nullptr ? margins[p] : 0.f);
    int64_t pairs = 0;
    for (int64_t i = lane; i < n; i += kWarp) {
      const int64_t ki = key(i);
      for (int64_t j = i + 1; j < n; ++j) pairs += ranking::orient(ki, key(j)) != 0;
    }
#pragma unroll
    for (int mask = kWarp / 2; mask > 0; mask >>= 1) pairs += __shfl_xor_sync(kFullMask, pairs, mask);
    const float scale = pairs > 0 ? g / float(pairs) : 0.f;
    for (int64_t i = lane; i < k; i += kWarp) {
      const float gi = (i < n && scale != 0.f) ? scale * ranking::candidate_grad(i, n, m, key, reward) : 0.f;
      grad[p * k + i] = static_cast<T>(gi);
    }
  }
}

#define RLHF_FAST_CUDA_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

inline unsigned grid_for(int64_t work_items, int64_t items_per_block, int64_t max_blocks = INT_MAX) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return unsigned(std::min<int64_t>(std::max<int64_t>(blocks, 1), max_blocks));
}

template <typename P>
const P* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<P>() : nullptr;
}

}  // namespace

// Entry points (same signatures as ranking_loss_fwd_cpu / ranking_loss_bwd_cpu).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ranking_loss_fwd_cuda(
    const at::Tensor& rewards, const std::optional<at::Tensor>& num_candidates, const std::optional<at::Tensor>& ranks,
    const std::optional<at::Tensor>& margins, double margin) {
  check_ranking_loss(rewards, num_candidates, ranks, margins);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({}, opts), accuracy = at::zeros({}, opts), mean_margin = at::zeros({}, opts);
  at::Tensor counts = at::zeros({2}, rewards.options().dtype(at::kLong));
  const int64_t n_prompts = rewards.size(0), k = rewards.size(1);
  if (n_prompts == 0) return {loss, accuracy, mean_margin, counts};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = grid_for(n_prompts, kWarps, kMaxFwdBlocks);
  at::Tensor totals_f = at::empty({int64_t(blocks), 2}, opts);
  at::Tensor totals_i = at::empty({int64_t(blocks), 3}, rewards.options().dtype(at::kLong));
  RLHF_FAST_CUDA_DISPATCH_FLOAT_TYPES(rewards.scalar_type(), "ranking_loss_fwd_cuda", [&] {
    ranking_loss_fwd_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        rewards.const_data_ptr<scalar_t>(), data_or_null<int64_t>(num_candidates), data_or_null<int64_t>(ranks),
        data_or_null<float>(margins), float(margin), n_prompts, k, totals_f.data_ptr<float>(),
        totals_i.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ranking_loss_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(
      totals_f.const_data_ptr<float>(), totals_i.const_data_ptr<int64_t>(), int64_t(blocks), loss.data_ptr<float>(),
      accuracy.data_ptr<float>(), mean_margin.data_ptr<float>(), counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, accuracy, mean_margin, counts};
}

at::Tensor ranking_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& rewards,
                                 const std::optional<at::Tensor>& num_candidates,
                                 const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& margins,
                                 double margin, const at::Tensor& counts) {
  check_ranking_loss(rewards, num_candidates, ranks, margins);
  RLHF_FAST_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat,
                  "grad_loss: expected one float32 value, got shape ", grad_loss.sizes(), " and dtype ",
                  grad_loss.scalar_type());
  check_vector(counts, "counts", 2, at::kLong, rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor grad = at::empty(rewards.sizes(), rewards.options());
  const int64_t n_prompts = rewards.size(0), k = rewards.size(1);
  if (rewards.numel() == 0) return grad;
  const at::Tensor g = grad_loss.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RLHF_FAST_CUDA_DISPATCH_FLOAT_TYPES(rewards.scalar_type(), "ranking_loss_bwd_cuda", [&] {
    ranking_loss_bwd_kernel<scalar_t><<<grid_for(n_prompts, kWarps), kThreads, 0, stream>>>(
        g.const_data_ptr<float>(), counts.const_data_ptr<int64_t>(), rewards.const_data_ptr<scalar_t>(),
        data_or_null<int64_t>(num_candidates), data_or_null<int64_t>(ranks), data_or_null<float>(margins),
        float(margin), n_prompts, k, grad.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) {
  m.impl("ranking_loss_fwd", &ranking_loss_fwd_cuda);
  m.impl("ranking_loss_bwd", &ranking_loss_bwd_cuda);
}

}  // namespace rlhf_fast::cuda
