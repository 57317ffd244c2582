"""ranking_loss benchmark cases (the reward model's K-wise loss; K = 2 is pairwise_loss's shape).

Providers:
  rlhf_fast[<backend>]  the fused op (cpu here; triton/cuda on a GPU)
  loop                  reference.ranking_loss_loop_ref: one pair at a time in Python (how the
                        InstructGPT loss reads, and how per-pair implementations run it)
  eager                 reference.ranking_loss_ref: vectorized over (P, K, K) pair matrices
  compile               torch.compile of ranking_loss_ref
Sweep: K at P = 1024 (ordered candidates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.bench.common import Workload, dtype_name, fused_backend, is_fused
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
SWEEP = [Case(1024, k, ranked=False) for k in (2, 4, 16)]
QUICK_CASES = [Case(256, 9), Case(256, 9, ranked=False), Case(256, 4, ranked=False)]
GPU_CASES = [Case(1024, 9), Case(8192, 9), Case(8192, 2, ranked=False), Case(1024, 64, ranked=False)]
MODES = ("nograd", "fwd", "bwd", "fwd+bwd")
REPS = 5  # the per-pair loop takes seconds at P = 1024


def sweep(case: Case) -> list[tuple[str, str, int]]:
    if case.ranked:
        return []
    return [(f"P={case.prompts} {dtype_name(case.dtype)} ordered", "K", case.k)]


def cost(case: Case) -> dict:
    return dict(prompts=case.prompts, k=case.k, dtype=dtype_name(case.dtype), ranked=case.ranked)

_compiled = {}
torch._dynamo.config.recompile_limit = 64


def providers(device: str) -> list[str]:
    return ["loop", "eager", "compile"]


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    rewards = (torch.randn(case.prompts, case.k, generator=g) * 2).to(device=device, dtype=case.dtype)
    kwargs = {}
    if case.ranked:
        n = torch.randint(min(4, case.k), case.k + 1, (case.prompts,), generator=g)
        ranks = (torch.rand(case.prompts, case.k, generator=g) * n.unsqueeze(1)).long()
        kwargs = dict(num_candidates=n.to(device), ranks=ranks.to(device))
    return rewards, kwargs


def workload(provider: str, case: Case, device: str) -> Workload:
    rewards, kwargs = make_inputs(case, device)
    label = None
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, rewards)
        loss_fn = lambda r: rlhf_fast.ranking_loss(r, backend=backend, **kwargs)[0]
        label = f"rlhf_fast[{ran}]"
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
    return Workload(lambda r: loss_fn(r).reshape(1), [rewards], ran, lambda loss: loss.sum(), label=label)


def reference(case: Case, device: str) -> Workload:
    rewards, kwargs = make_inputs(case, device)
    return Workload(lambda r: ranking_loss_ref(r, **kwargs)[0].reshape(1), [rewards], "torch", lambda loss: loss.sum())


def derived(case: Case, mode: str, median_ms: float) -> dict:
    """Candidate pairs scored per second (all K(K-1)/2 position pairs of every prompt)."""
    pairs = case.prompts * case.k * (case.k - 1) // 2
    return {"Mpairs/s": round(pairs / median_ms / 1e3, 2)}
