"""gae benchmark cases.

Providers:
  rlhf_fast[<backend>]  the fused op (cpu here; triton/cuda on a GPU)
  loop                  reference.gae_loop_ref: the Python loop over time steps (vectorized over the
                        batch) that RL libraries run, extended to masks with holes
  eager                 reference.gae_ref: the vectorized torch version (two doubling scans, log2(T)
                        steps), the torch backend
  compile               torch.compile of gae_ref
Mode: nograd only (GAE is computed from detached rewards and values; there is no backward).
Sweep: sequence length at B = 256 fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.bench.common import Workload, dtype_name, fused_backend, is_fused
from rlhf_fast.reference import gae_loop_ref, gae_ref

OP = "gae"
GAMMA, LAM = 1.0, 0.95


@dataclass(frozen=True)
class Case:
    batch: int
    steps: int
    dtype: torch.dtype = torch.float32
    whiten: bool = False
    packed: bool = False  # the same tokens as one packed batch with cu_seqlens

    @property
    def name(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"({self.batch}, {self.steps}) {dt}" + (" +whiten" if self.whiten else "")
                + (" packed" if self.packed else ""))


CASES = [Case(256, 2048), Case(256, 2048, whiten=True), Case(256, 2048, torch.bfloat16),
         Case(256, 2048, whiten=True, packed=True)]
SWEEP = [Case(256, t) for t in (256, 512, 1024, 4096)]
QUICK_CASES = [Case(64, 512), Case(64, 256), Case(64, 512, whiten=True, packed=True)]
GPU_CASES = [Case(256, 2048), Case(256, 2048, whiten=True), Case(256, 2048, torch.bfloat16),
             Case(256, 2048, whiten=True, packed=True), Case(1024, 4096)]
MODES = ("nograd",)
REPS = 21


def sweep(case: Case) -> list[tuple[str, str, int]]:
    if case.whiten or case.packed:
        return []
    return [(f"B={case.batch} {dtype_name(case.dtype)}", "seq length", case.steps)]


def cost(case: Case) -> dict:
    """Shape for the cost model: the tokens the kernel scans (a packed case holds only the valid spans)."""
    tokens = make_inputs(case, "cpu")[0].numel()
    return dict(tokens=tokens, sequences=case.batch, dtype=dtype_name(case.dtype), whiten=case.whiten)

_compiled = {}
torch._dynamo.config.recompile_limit = 64


def providers(device: str) -> list[str]:
    return ["loop", "eager", "compile"]


def make_inputs(case: Case, device: str):
    """Rewards (the score on each row's last response token plus a small per-token KL term), values,
    and a mask with prompt padding, tool-output holes in the response and right padding; packed:
    each row's span from its first to its last valid token, with cu_seqlens."""
    g = torch.Generator().manual_seed(0)
    b, t = case.batch, case.steps
    rewards = torch.randn(b, t, generator=g) * 0.01
    values = torch.randn(b, t, generator=g)
    pos = torch.arange(t)
    start = torch.randint(0, t // 4, (b, 1), generator=g)
    end = torch.randint(t // 2, t + 1, (b, 1), generator=g)
    mask = (pos >= start) & (pos < end) & (torch.rand(b, t, generator=g) > 0.05)
    rewards[torch.arange(b), (end.squeeze(1) - 1)] += torch.randn(b, generator=g)
    cu = None
    if case.packed:
        spans = [(i, int(start[i]), int(end[i])) for i in range(b)]
        cat = lambda x: torch.cat([x[i, s:e] for i, s, e in spans])
        rewards, values, mask = cat(rewards), cat(values), cat(mask)
        cu = torch.tensor([0] + [e - s for _, s, e in spans]).cumsum(0).to(device)
    return rewards.to(device=device, dtype=case.dtype), values.to(device=device, dtype=case.dtype), mask.to(device), cu


def workload(provider: str, case: Case, device: str) -> Workload:
    rewards, values, mask, cu = make_inputs(case, device)
    kw = dict(gamma=GAMMA, lam=LAM, whiten=case.whiten, cu_seqlens=cu)
    label = None
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, rewards.reshape(-1), values.reshape(-1))
        fn = lambda r, v: rlhf_fast.gae(r, v, mask, backend=backend, **kw)
        label = f"rlhf_fast[{ran}]"
    elif provider == "loop":
        ran = "torch"
        fn = lambda r, v: gae_loop_ref(r, v, mask, **kw)
    elif provider == "eager":
        ran = "torch"
        fn = lambda r, v: gae_ref(r, v, mask, **kw)
    elif provider == "compile":
        ran = "inductor"
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(gae_ref)
        fn = lambda r, v: _compiled["fn"](r, v, mask, **kw)
    else:
        raise ValueError(provider)
    return Workload(fn, [rewards, values], ran, None, label=label)


def reference(case: Case, device: str) -> Workload:
    rewards, values, mask, cu = make_inputs(case, device)
    return Workload(lambda r, v: gae_loop_ref(r, v, mask, gamma=GAMMA, lam=LAM, whiten=case.whiten, cu_seqlens=cu),
                    [rewards, values], "torch", None)


def derived(case: Case, mode: str, median_ms: float) -> dict:
    """Tokens scanned per second."""
    return {"Mtok/s": round(cost(case)["tokens"] / median_ms / 1e3, 1)}
