"""ranking_loss benchmark cases (the reward model's K-wise loss; K = 2 is pairwise_loss's shape).

Providers:
  rlhf_fast[<backend>]  the fused op (cpu here; triton/cuda on a GPU)
  loop                  reference.ranking_loss_loop_ref: one pair at a time in Python (how the
                        InstructGPT loss reads, and how per-pair implementations run it)
  eager                 reference.ranking_loss_ref: vectorized over (P, K, K) pair matrices
  compile               torch.compile of ranking_loss_ref
Modes: fwd (no grad), fwd+bwd (gradient of the rewards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.reference import ranking_loss_loop_ref, ranking_loss_ref

OP = "ranking_loss"


@dataclass(frozen=True)
class Case:
    prompts: int
    k: int
    dtype: torch.dtype = torch.float32
    ranked: bool = True  # ranks with ties and 4..K candidates per prompt; else K ordered candidates

    @property
    def name(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"P={self.prompts} K={self.k} {dt}" + (" ranked" if self.ranked else " ordered")


CASES = [Case(1024, 9), Case(1024, 9, ranked=False), Case(1024, 9, torch.bfloat16), Case(8192, 2, ranked=False)]
QUICK_CASES = [Case(256, 9), Case(256, 9, ranked=False)]
MODES = ("fwd", "fwd+bwd")
REPS = 5  # the per-pair loop takes seconds at P = 1024

_compiled = {}
torch._dynamo.config.recompile_limit = 64


def providers(device: str) -> list[str]:
    fused = ["rlhf_fast[cpu]"] if device == "cpu" else ["rlhf_fast[triton]", "rlhf_fast[cuda]"]
    return fused + ["loop", "eager", "compile"]


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    rewards = (torch.randn(case.prompts, case.k, generator=g) * 2).to(device=device, dtype=case.dtype)
    kwargs = {}
    if case.ranked:
        n = torch.randint(min(4, case.k), case.k + 1, (case.prompts,), generator=g)
        ranks = (torch.rand(case.prompts, case.k, generator=g) * n.unsqueeze(1)).long()
        kwargs = dict(num_candidates=n.to(device), ranks=ranks.to(device))
    return rewards, kwargs


def setup(provider: str, case: Case, mode: str, device: str):
    """Returns (fn, backend_name, outputs_fn) or None when the provider does not apply.
    outputs_fn() -> (loss, None, grad or None) for the check against the reference."""
    rewards, kwargs = make_inputs(case, device)
    if provider.startswith("rlhf_fast["):
        backend = provider[len("rlhf_fast["):-1]
        try:
            ran = rlhf_fast.select_backend(OP, rewards, backend=backend)
        except ValueError:
            return None
        loss_fn = lambda r: rlhf_fast.ranking_loss(r, backend=backend, **kwargs)[0]
    elif provider == "loop":
        ran = "torch"
        loss_fn = lambda r: ranking_loss_loop_ref(r, **kwargs)[0]
    elif provider == "eager":
        ran = "torch"
        loss_fn = lambda r: ranking_loss_ref(r, **kwargs)[0]
    elif provider == "compile":
        ran = "inductor"
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(ranking_loss_ref)
        loss_fn = lambda r: _compiled["fn"](r, **kwargs)[0]
    else:
        raise ValueError(provider)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return loss_fn(rewards)
    else:
        def run():
            r = rewards.detach().requires_grad_(True)
            loss_fn(r).backward()
            return r.grad

    def outputs():
        r = rewards.detach().requires_grad_(mode != "fwd")
        loss = loss_fn(r)
        if mode != "fwd":
            loss.backward()
        return loss.detach(), None, r.grad

    return run, ran, outputs


def reference(case: Case, mode: str, device: str):
    rewards, kwargs = make_inputs(case, device)
    r = rewards.detach().requires_grad_(mode != "fwd")
    loss = ranking_loss_ref(r, **kwargs)[0]
    if mode != "fwd":
        loss.backward()
    return loss.detach(), None, r.grad


def derived(case: Case, mode: str, median_ms: float) -> dict:
    """Candidate pairs scored per second (all K(K-1)/2 position pairs of every prompt)."""
    pairs = case.prompts * case.k * (case.k - 1) // 2
    return {"Mpairs/s": round(pairs / median_ms / 1e3, 2)}
