// CPU kernels of ranking_loss, compiled once per SIMD capability (see csrc/cpu/dispatch.h).
//
// One task per run of prompts (at::parallel_for over prompts). A task first lists its prompts'
// ranked pairs -- orientation by rank (ranking::orient), x = m - (r_w - r_l), and the counts and
// sums that need no transcendental -- into a buffer, then evaluates the pair terms over the whole
// buffer with at::vec (softplus forward, sigmoid backward: the formulas of rlhf_fast/ranking_math.h,
// shared with the CUDA kernels, on Vectorized<float>), then folds them per prompt. The scalar
// softplus was ~15 ns a pair; listed and vectorized it is a few. Each prompt writes its own sums,
// added in prompt order afterwards, so the loss does not depend on the thread count. The backward
// recomputes the pairs from the rewards: nothing but two counts is kept between the passes.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <rlhf_fast/ranking_math.h>

#include "ranking_loss.h"
#include "register_kernel.h"
#include "vec_utils.h"

#include <algorithm>
#include <atomic>
#include <vector>

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

// Prompts per parallel task: about 4K pairs.
inline int64_t ranking_grain(int64_t k) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k * k)); }

inline void lower_to(std::atomic<int64_t>& first, int64_t i) {
  int64_t cur = first.load();
  while (i < cur && !first.compare_exchange_weak(cur, i)) {}
}

// at::vec flavour of ranking::ScalarOps (Sleef exp / log1p where the capability has them).
struct RankingVecOps {
  using F = Vec;
  static Vec exp(const Vec& x) { return x.exp(); }
  static Vec log1p(const Vec& x) { return x.log1p(); }
  static Vec abs(const Vec& x) { return x.abs(); }
  static Vec max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
  static Vec min(const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }
  static Vec splat(float x) { return Vec(x); }
};

// x[i] = f(x[i]) over [0, n): `body` on whole vectors, `tail` (the same formula on scalars) after them.
template <class Body, class Tail>
inline void map_in_place(float* x, int64_t n, const Body& body, const Tail& tail) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) body(Vec::loadu(x + i)).store(x + i);
  for (; i < n; ++i) x[i] = tail(x[i]);
}

// One prompt's view of the inputs.
template <typename T>
struct Prompt {
  const T* r;           // (K,) rewards
  const int64_t* rank;  // (K,) ranks or nullptr (then the key is the position)
  int64_t n;            // candidates in use
  float margin;

  int64_t key(int64_t i) const { return rank != nullptr ? rank[i] : i; }
  float reward(int64_t i) const { return float(r[i]); }

  // Calls pair(w, l) for each ranked pair, w above l.
  template <class Pair>
  void for_each_pair(const Pair& pair) const {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ki = key(i);
      for (int64_t j = i + 1; j < n; ++j) {
        const int o = ranking::orient(ki, key(j));
        if (o > 0) pair(i, j);
        if (o < 0) pair(j, i);
      }
    }
  }
};

template <typename T>
RankingBadInput ranking_loss_fwd_impl(const at::Tensor& rewards, const at::Tensor& num_candidates,
                                      const at::Tensor& ranks, const at::Tensor& margins, float margin,
                                      at::Tensor& loss, at::Tensor& accuracy, at::Tensor& mean_margin,
                                      at::Tensor& counts) {
  const int64_t n_prompts = rewards.size(0), k = rewards.size(1);
  const T* r = rewards.const_data_ptr<T>();
  const int64_t* num = num_candidates.defined() ? num_candidates.const_data_ptr<int64_t>() : nullptr;
  const int64_t* rk = ranks.defined() ? ranks.const_data_ptr<int64_t>() : nullptr;
  const float* mg = margins.defined() ? margins.const_data_ptr<float>() : nullptr;
  std::vector<ranking::PairSums> sums(n_prompts);
  std::atomic<int64_t> bad_num{n_prompts}, bad_rank{n_prompts * k};

  at::parallel_for(0, n_prompts, ranking_grain(k), [&](int64_t begin, int64_t end) {
    std::vector<float> xs;  // x = m - (r_w - r_l) of every ranked pair of the task, prompt by prompt
    xs.reserve(size_t((end - begin) * k * (k - 1) / 2));
    for (int64_t p = begin; p < end; ++p) {
      int64_t n = num != nullptr ? num[p] : k;
      if (n < 0 || n > k) {
        lower_to(bad_num, p);
        n = 0;
      }
      const int64_t* rank = rk != nullptr ? rk + p * k : nullptr;
      for (int64_t i = 0; rank != nullptr && i < n; ++i) {
        if (rank[i] < 0 || rank[i] >= n) lower_to(bad_rank, p * k + i);
      }
      const Prompt<T> prompt{r + p * k, rank, n, margin + (mg != nullptr ? mg[p] : 0.f)};
      ranking::PairSums s = ranking::no_pairs();
      prompt.for_each_pair([&](int64_t w, int64_t l) {
        const float diff = prompt.reward(w) - prompt.reward(l);
        xs.push_back(prompt.margin - diff);
        s.pairs += 1;
        s.correct += diff > 0.f ? 1 : 0;
        s.diff += diff;
      });
      sums[p] = s;
    }
    map_in_place(
        xs.data(), int64_t(xs.size()), [](const Vec& x) { return ranking::pair_loss<RankingVecOps>(x); },
        [](float x) { return ranking::pair_loss<ranking::ScalarOps>(x); });
    const float* loss_of_pair = xs.data();
    for (int64_t p = begin; p < end; ++p) {
      float l = 0.f;
      for (int64_t q = 0; q < sums[p].pairs; ++q) l += loss_of_pair[q];
      sums[p].loss = l;
      loss_of_pair += sums[p].pairs;
    }
  });
  RankingBadInput bad;
  if (bad_num.load() < n_prompts) bad.num_candidates = bad_num.load();
  if (bad_rank.load() < n_prompts * k) bad.ranks = bad_rank.load();
  if (bad.num_candidates >= 0 || bad.ranks >= 0) return bad;

  double loss_sum = 0.0, diff_sum = 0.0;
  int64_t pairs = 0, correct = 0, ranked = 0;
  for (const ranking::PairSums& s : sums) {
    if (s.pairs == 0) continue;
    loss_sum += double(s.loss) / double(s.pairs);
    diff_sum += s.diff;
    pairs += s.pairs;
    correct += s.correct;
    ranked += 1;
  }
  *loss.data_ptr<float>() = ranked > 0 ? float(loss_sum / double(ranked)) : 0.f;
  *accuracy.data_ptr<float>() = pairs > 0 ? float(double(correct) / double(pairs)) : 0.f;
  *mean_margin.data_ptr<float>() = pairs > 0 ? float(diff_sum / double(pairs)) : 0.f;
  int64_t* c = counts.data_ptr<int64_t>();
  c[0] = pairs;
  c[1] = ranked;
  return bad;
}

template <typename T>
void ranking_loss_bwd_impl(float grad_loss, const at::Tensor& rewards, const at::Tensor& num_candidates,
                           const at::Tensor& ranks, const at::Tensor& margins, float margin, int64_t ranked_prompts,
                           at::Tensor& grad_rewards) {
  const int64_t n_prompts = rewards.size(0), k = rewards.size(1);
  const T* r = rewards.const_data_ptr<T>();
  const int64_t* num = num_candidates.defined() ? num_candidates.const_data_ptr<int64_t>() : nullptr;
  const int64_t* rk = ranks.defined() ? ranks.const_data_ptr<int64_t>() : nullptr;
  const float* mg = margins.defined() ? margins.const_data_ptr<float>() : nullptr;
  T* out = grad_rewards.data_ptr<T>();
  const float g = ranked_prompts > 0 ? grad_loss / float(ranked_prompts) : 0.f;

  at::parallel_for(0, n_prompts, ranking_grain(k), [&](int64_t begin, int64_t end) {
    const size_t cap = size_t((end - begin) * k * (k - 1) / 2);
    std::vector<float> xs;                 // x of every ranked pair of the task, then d loss / d r_w
    std::vector<int32_t> winner, loser;    // candidate indices of each pair
    std::vector<int64_t> pairs(end - begin);
    xs.reserve(cap);
    winner.reserve(cap);
    loser.reserve(cap);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = num != nullptr ? std::clamp<int64_t>(num[p], 0, k) : k;
      const Prompt<T> prompt{r + p * k, rk != nullptr ? rk + p * k : nullptr, n,
                             margin + (mg != nullptr ? mg[p] : 0.f)};
      const size_t before = xs.size();
      prompt.for_each_pair([&](int64_t w, int64_t l) {
        xs.push_back(prompt.margin - (prompt.reward(w) - prompt.reward(l)));
        winner.push_back(int32_t(w));
        loser.push_back(int32_t(l));
      });
      pairs[p - begin] = int64_t(xs.size() - before);
    }
    map_in_place(
        xs.data(), int64_t(xs.size()), [](const Vec& x) { return ranking::pair_winner_grad<RankingVecOps>(x); },
        [](float x) { return ranking::pair_winner_grad<ranking::ScalarOps>(x); });
    std::vector<float> acc(k);
    size_t q = 0;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t np = pairs[p - begin];
      const float scale = np > 0 ? g / float(np) : 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t e = 0; e < np; ++e, ++q) {
        const float gw = scale * xs[q];
        acc[winner[q]] += gw;
        acc[loser[q]] -= gw;
      }
      T* o = out + p * k;
      for (int64_t i = 0; i < k; ++i) o[i] = static_cast<T>(acc[i]);  // candidates past n_p stay 0
    }
  });
}

inline RankingBadInput ranking_loss_fwd_kernel(const at::Tensor& rewards, const at::Tensor& num_candidates,
                                               const at::Tensor& ranks, const at::Tensor& margins, float margin,
                                               at::Tensor& loss, at::Tensor& accuracy, at::Tensor& mean_margin,
                                               at::Tensor& counts) {
  RankingBadInput bad;
  RLHF_FAST_DISPATCH_FLOAT_TYPES(rewards.scalar_type(), "ranking_loss_fwd", [&] {
    bad = ranking_loss_fwd_impl<scalar_t>(rewards, num_candidates, ranks, margins, margin, loss, accuracy,
                                          mean_margin, counts);
  });
  return bad;
}

inline void ranking_loss_bwd_kernel(float grad_loss, const at::Tensor& rewards, const at::Tensor& num_candidates,
                                    const at::Tensor& ranks, const at::Tensor& margins, float margin,
                                    int64_t ranked_prompts, at::Tensor& grad_rewards) {
  RLHF_FAST_DISPATCH_FLOAT_TYPES(rewards.scalar_type(), "ranking_loss_bwd", [&] {
    ranking_loss_bwd_impl<scalar_t>(grad_loss, rewards, num_candidates, ranks, margins, margin, ranked_prompts,
                                    grad_rewards);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace rlhf_fast::cpu

RLHF_FAST_REGISTER_CPU_KERNEL(ranking_loss_fwd, ranking_loss_fwd_kernel)
RLHF_FAST_REGISTER_CPU_KERNEL(ranking_loss_bwd, ranking_loss_bwd_kernel)
