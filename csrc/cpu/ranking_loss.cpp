// CPU entry points of ranking_loss (and pairwise_loss, its K = 2 case): argument checks and
// allocation here, the kernels in csrc/cpu/kernels/ranking_loss_kernel.h (chosen per CPU capability
// by csrc/cpu/dispatch.h). Value ranges of num_candidates and ranks are checked inside the forward's
// single pass and reported here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <rlhf_fast/ranking_math.h>

#include "kernels/ranking_loss.h"

namespace rlhf_fast::cpu {

namespace {
at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ranking_loss_fwd_cpu(
    const at::Tensor& rewards, const std::optional<at::Tensor>& num_candidates, const std::optional<at::Tensor>& ranks,
    const std::optional<at::Tensor>& margins, double margin) {
  check_ranking_loss(rewards, num_candidates, ranks, margins);
  const auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({}, opts), accuracy = at::zeros({}, opts), mean_margin = at::zeros({}, opts);
  at::Tensor counts = at::zeros({2}, rewards.options().dtype(at::kLong));
  const at::Tensor num = or_undefined(num_candidates), rk = or_undefined(ranks);
  if (rewards.size(0) == 0) return {loss, accuracy, mean_margin, counts};
  const RankingBadInput bad = ranking_loss_fwd_stub()()(rewards, num, rk, or_undefined(margins), float(margin), loss,
                                                        accuracy, mean_margin, counts);
  const int64_t k = rewards.size(1);
  if (bad.num_candidates >= 0) {
    RLHF_FAST_CHECK(false, "num_candidates: expected values in [0, ", k, "] (K = rewards.shape[1]), got ",
                    num.const_data_ptr<int64_t>()[bad.num_candidates], " at position ", bad.num_candidates);
  }
  if (bad.ranks >= 0) {
    const int64_t p = bad.ranks / k, i = bad.ranks % k;
    const int64_t n = num.defined() ? num.const_data_ptr<int64_t>()[p] : k;
    RLHF_FAST_CHECK(false, "ranks: expected values in [0, ", n, ") for the ", n, " candidates of prompt ", p,
                    ", got ", rk.const_data_ptr<int64_t>()[bad.ranks], " at (", p, ", ", i, ")");
  }
  return {loss, accuracy, mean_margin, counts};
}

at::Tensor ranking_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& rewards,
                                const std::optional<at::Tensor>& num_candidates, const std::optional<at::Tensor>& ranks,
                                const std::optional<at::Tensor>& margins, double margin, const at::Tensor& counts) {
  check_ranking_loss(rewards, num_candidates, ranks, margins);
  RLHF_FAST_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat,
                  "grad_loss: expected one float32 value, got shape ", grad_loss.sizes(), " and dtype ",
                  grad_loss.scalar_type());
  check_vector(counts, "counts", 2, at::kLong, rewards);
  at::Tensor grad = at::empty(rewards.sizes(), rewards.options());
  if (rewards.numel() == 0) return grad;
  const int64_t ranked = counts.const_data_ptr<int64_t>()[1];
  ranking_loss_bwd_stub()()(grad_loss.item<float>(), rewards, or_undefined(num_candidates), or_undefined(ranks),
                            or_undefined(margins), float(margin), ranked, grad);
  return grad;
}

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // rewards (P, K), num_candidates (P,) int64?, ranks (P, K) int64?, margins (P,) fp32?
  //   -> (loss (), accuracy (), mean_margin () fp32, counts (2,) int64 = (pairs, ranked prompts))
  m.def("ranking_loss_fwd(Tensor rewards, Tensor? num_candidates, Tensor? ranks, Tensor? margins, float margin) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // grad_loss () fp32, counts from the forward -> grad_rewards (P, K) in the dtype of rewards
  m.def("ranking_loss_bwd(Tensor grad_loss, Tensor rewards, Tensor? num_candidates, Tensor? ranks, "
        "Tensor? margins, float margin, Tensor counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("ranking_loss_fwd", &ranking_loss_fwd_cpu);
  m.impl("ranking_loss_bwd", &ranking_loss_bwd_cpu);
}

}  // namespace rlhf_fast::cpu
