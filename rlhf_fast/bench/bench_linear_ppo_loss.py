"""linear_ppo_loss (the fused RL head) benchmark cases.

Providers:
  rlhf_fast[<backend>]  linear_ppo_loss: loss and gradients in 3 GEMMs per token
  composed              rlhf_fast.linear_logprobs (fwd + bwd, 4 GEMMs) followed by the separate fused
                        losses (ppo_policy_loss + kl_penalty + the entropy bonus), automatic backends
  eager                 hidden @ weight.T -> log_softmax -> gather -> the reference losses, autograd
Modes: nograd (the loss alone) and fwd+bwd (loss and the gradients of hidden and weight): the fused op
forms its gradient in the forward pass, so a separate fwd / bwd split says nothing about it.
Sweep: vocabulary at B x T = 4 x 512, H = 512.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.bench.common import Workload, dtype_name, fused_backend, is_fused
from rlhf_fast.ops._aggregation import aggregate
from rlhf_fast.reference import kl_penalty_ref, ppo_policy_loss_terms_ref

OP = "linear_ppo_loss"
KW = dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)


@dataclass(frozen=True)
class Case:
    b: int
    t: int
    hdim: int
    vocab: int
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return f"B={self.b} T={self.t} H={self.hdim} V={self.vocab} {str(self.dtype).replace('torch.', '')}"


CASES = [Case(4, 512, 512, 32768)]
SWEEP = [Case(4, 512, 512, 8192), Case(4, 512, 512, 65536)]
QUICK_CASES = [Case(2, 128, 256, 8192)]
GPU_CASES = [Case(8, 1024, 4096, 128256, torch.bfloat16), Case(8, 1024, 4096, 32000, torch.bfloat16)]
MODES = ("nograd", "fwd+bwd")
REPS = 5


def sweep(case: Case) -> list[tuple[str, str, int]]:
    return [(f"B={case.b} T={case.t} H={case.hdim} {dtype_name(case.dtype)}", "vocab", case.vocab)]


def cost(case: Case) -> dict:
    return dict(n=case.b * case.t, hidden=case.hdim, vocab=case.vocab, dtype=dtype_name(case.dtype))


def providers(device: str) -> list[str]:
    return ["composed", "eager"]


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(case.b, case.t, case.hdim, generator=g).to(device=device, dtype=case.dtype)
    weight = (torch.randn(case.vocab, case.hdim, generator=g) / case.hdim ** 0.5).to(device=device, dtype=case.dtype)
    labels = torch.randint(0, case.vocab, (case.b, case.t), generator=g).to(device)
    old = (torch.randn(case.b, case.t, generator=g) * 0.1 - 10).to(device)
    adv = torch.randn(case.b, case.t, generator=g).to(device)
    ref = old + 0.05 * torch.randn(case.b, case.t, generator=g).to(device)
    mask = torch.ones(case.b, case.t, device=device)
    return hidden, weight, labels, old, adv, ref, mask


def _composed_loss(h, w, labels, old, adv, ref, mask):
    lp, ent = rlhf_fast.linear_logprobs(h, w, labels, return_entropy=True)
    loss, _ = rlhf_fast.ppo_policy_loss(lp, old, adv, mask)
    kl = rlhf_fast.kl_penalty(lp, ref, estimator="k3")
    return loss + KW["kl_coef"] * aggregate(kl, mask, "token-mean") - KW["entropy_coef"] * aggregate(
        ent, mask, "token-mean")


def _eager_loss(h, w, labels, old, adv, ref, mask):
    logp = torch.log_softmax((h @ w.t()).float(), dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    tok = ppo_policy_loss_terms_ref(lp, old, adv, mask)["loss"] + KW["kl_coef"] * kl_penalty_ref(
        lp, ref, estimator="k3") - KW["entropy_coef"] * ent
    return aggregate(tok, mask, "token-mean")


def workload(provider: str, case: Case, device: str) -> Workload:
    hidden, weight, labels, old, adv, ref, mask = make_inputs(case, device)
    label = None
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, hidden.flatten(0, 1), weight)
        fwd = lambda h, w: rlhf_fast.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref, backend=backend,
                                                     **KW)[0]
        label = f"rlhf_fast[{ran}]"
    elif provider == "composed":
        ran = "composed:" + rlhf_fast.select_backend("linear_logprobs", hidden.flatten(0, 1), weight)
        fwd = lambda h, w: _composed_loss(h, w, labels, old, adv, ref, mask)
    elif provider == "eager":
        ran = "torch"
        fwd = lambda h, w: _eager_loss(h, w, labels, old, adv, ref, mask)
    else:
        raise ValueError(provider)
    return Workload(lambda h, w: fwd(h, w).reshape(1), [hidden, weight], ran, lambda loss: loss.sum(), label=label)


def reference(case: Case, device: str) -> Workload:
    hidden, weight, labels, old, adv, ref, mask = make_inputs(case, device)
    return Workload(lambda h, w: _eager_loss(h, w, labels, old, adv, ref, mask).reshape(1), [hidden, weight],
                    "torch", lambda loss: loss.sum())


def grad_bytes(case: Case, mode: str) -> int:
    return 0 if mode == "nograd" else (case.b * case.t + case.vocab) * case.hdim * torch.finfo(case.dtype).bits // 8
