"""linear_ppo_loss (the fused RL head) benchmark cases.

Providers:
  rlhf_fast[<backend>]  linear_ppo_loss: loss and gradients in 3 GEMMs per token
  composed              rlhf_fast.linear_logprobs (fwd + bwd, 4 GEMMs) followed by the separate fused
                        losses (ppo_policy_loss + kl_penalty + the entropy bonus), same backend
  eager                 hidden @ weight.T -> log_softmax -> gather -> the reference losses, autograd
Mode: fwd+bwd (loss and the gradients of hidden and weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
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
        return f"B={self.b} T={self.t} H={self.hdim} V={self.vocab} float32"


CASES = [Case(4, 512, 512, 32768)]
QUICK_CASES = [Case(2, 128, 256, 8192)]
MODES = ("fwd+bwd",)
REPS = 5


def providers(device: str) -> list[str]:
    return (["rlhf_fast[cpu]"] if device == "cpu" else ["rlhf_fast[cuda]"]) + ["composed", "eager"]


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(case.b, case.t, case.hdim, generator=g).to(device)
    weight = (torch.randn(case.vocab, case.hdim, generator=g) / case.hdim ** 0.5).to(device)
    labels = torch.randint(0, case.vocab, (case.b, case.t), generator=g).to(device)
    old = (torch.randn(case.b, case.t, generator=g) * 0.1 - 10).to(device)
    adv = torch.randn(case.b, case.t, generator=g).to(device)
    ref = old + 0.05 * torch.randn(case.b, case.t, generator=g).to(device)
    mask = torch.ones(case.b, case.t, device=device)
    return hidden, weight, labels, old, adv, ref, mask


def _composed_loss(h, w, labels, old, adv, ref, mask, backend):
    lp, ent = rlhf_fast.linear_logprobs(h, w, labels, return_entropy=True, backend=backend)
    loss, _ = rlhf_fast.ppo_policy_loss(lp, old, adv, mask, backend=backend)
    kl = rlhf_fast.kl_penalty(lp, ref, estimator="k3", backend=backend)
    return loss + KW["kl_coef"] * aggregate(kl, mask, "token-mean") - KW["entropy_coef"] * aggregate(
        ent, mask, "token-mean")


def _eager_loss(h, w, labels, old, adv, ref, mask):
    logp = torch.log_softmax(h @ w.t(), dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    tok = ppo_policy_loss_terms_ref(lp, old, adv, mask)["loss"] + KW["kl_coef"] * kl_penalty_ref(
        lp, ref, estimator="k3") - KW["entropy_coef"] * ent
    return aggregate(tok, mask, "token-mean")


def setup(provider: str, case: Case, mode: str, device: str):
    hidden, weight, labels, old, adv, ref, mask = make_inputs(case, device)
    if provider.startswith("rlhf_fast["):
        backend = provider[len("rlhf_fast["):-1]
        try:
            ran = rlhf_fast.select_backend(OP, hidden.flatten(0, 1), weight, backend=backend)
        except ValueError:
            return None
        loss_fn = lambda h, w: rlhf_fast.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref,
                                                         backend=backend, **KW)[0]
    elif provider == "composed":
        ran = rlhf_fast.select_backend("linear_logprobs", hidden.flatten(0, 1), weight)
        loss_fn = lambda h, w: _composed_loss(h, w, labels, old, adv, ref, mask, ran)
    elif provider == "eager":
        ran = "torch"
        loss_fn = lambda h, w: _eager_loss(h, w, labels, old, adv, ref, mask)
    else:
        raise ValueError(provider)

    def run():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        loss_fn(h, w).backward()
        return h.grad, w.grad

    def outputs():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        loss = loss_fn(h, w)
        loss.backward()
        return loss.detach().reshape(1), None, torch.cat([h.grad.flatten(), w.grad.flatten()])

    return run, ran, outputs


def reference(case: Case, mode: str, device: str):
    hidden, weight, labels, old, adv, ref, mask = make_inputs(case, device)
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    loss = _eager_loss(h, w, labels, old, adv, ref, mask)
    loss.backward()
    return loss.detach().reshape(1), None, torch.cat([h.grad.flatten(), w.grad.flatten()])


def grad_bytes(case: Case, mode: str) -> int:
    return (case.b * case.t + case.vocab) * case.hdim * 4


def derived(case: Case, mode: str, median_ms: float) -> dict:
    flops = 2 * case.b * case.t * case.hdim * case.vocab * 3
    return {"useful_GFLOP/s": round(flops / median_ms / 1e6, 1)}
