"""gae benchmark cases.

Providers:
  rlhf_fast[<backend>]  the fused op (cpu here; triton/cuda on a GPU)
  loop                  reference.gae_loop_ref: the Python loop over time steps (vectorized over the
                        batch) that RL libraries run, extended to masks with holes
  eager                 reference.gae_ref: the vectorized torch version (two doubling scans, log2(T)
                        steps), the torch backend
  compile               torch.compile of gae_ref
Modes: fwd only (GAE is computed from detached rewards and values; there is no backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
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
QUICK_CASES = [Case(64, 512), Case(64, 512, whiten=True, packed=True)]
MODES = ("fwd",)

_compiled = {}
torch._dynamo.config.recompile_limit = 64


def providers(device: str) -> list[str]:
    fused = ["rlhf_fast[cpu]"] if device == "cpu" else ["rlhf_fast[triton]", "rlhf_fast[cuda]"]
    return fused + ["loop", "eager", "compile"]


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


def setup(provider: str, case: Case, mode: str, device: str):
    """Returns (fn, backend_name, outputs_fn) or None when the provider does not apply.
    outputs_fn() -> (advantages, returns, None) for the check against the reference."""
    if mode != "fwd":
        return None
    rewards, values, mask, cu = make_inputs(case, device)
    kw = dict(gamma=GAMMA, lam=LAM, whiten=case.whiten, cu_seqlens=cu)
    if provider.startswith("rlhf_fast["):
        backend = provider[len("rlhf_fast["):-1]
        try:
            ran = rlhf_fast.select_backend(OP, rewards.reshape(-1), values.reshape(-1), backend=backend)
        except ValueError:
            return None
        fn = lambda: rlhf_fast.gae(rewards, values, mask, backend=backend, **kw)
    elif provider == "loop":
        ran = "torch"
        fn = lambda: gae_loop_ref(rewards, values, mask, **kw)
    elif provider == "eager":
        ran = "torch"
        fn = lambda: gae_ref(rewards, values, mask, **kw)
    elif provider == "compile":
        ran = "inductor"
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(gae_ref)
        fn = lambda: _compiled["fn"](rewards, values, mask, **kw)
    else:
        raise ValueError(provider)

    def outputs():
        adv, ret = fn()
        return adv, ret, None

    return fn, ran, outputs


def reference(case: Case, mode: str, device: str):
    rewards, values, mask, cu = make_inputs(case, device)
    adv, ret = gae_loop_ref(rewards, values, mask, gamma=GAMMA, lam=LAM, whiten=case.whiten, cu_seqlens=cu)
    return adv, ret, None


def derived(case: Case, mode: str, median_ms: float) -> dict:
    """Bytes the kernel must move at least (rewards, values, mask read once; advantages and returns
    written once) and the implied GB/s, and tokens per second."""
    tokens = make_inputs(case, "cpu")[0].numel()
    elem = torch.finfo(case.dtype).bits // 8
    nbytes = tokens * (2 * elem + 1 + 8)
    return {"min_bytes": nbytes, "GB/s": round(nbytes / median_ms / 1e6, 2),
            "Mtok/s": round(tokens / median_ms / 1e3, 1)}
