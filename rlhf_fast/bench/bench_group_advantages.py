"""group_advantages benchmark cases (GRPO / RLOO advantages of P prompts x K answers).

Providers:
  rlhf_fast[<backend>]  the op (torch backend on a CPU, triton on a GPU)
  trl                   the formula of TRL's GRPOTrainer / RLOOTrainer (view(-1, K), nanmean, nanstd with
                        NaN for dropped answers, repeat_interleave, nan_to_num), as TRL writes it inline
                        (TRL has no function to import)
  verl_loop             verl's compute_grpo_outcome_advantage / compute_rloo_outcome_advantage: a Python
                        loop over the answers grouped by index (eps 1e-6 as verl)
  compile               torch.compile of the TRL formula
No backward (advantages are constants): mode nograd only.

Self-contained: run it alone with `python bench/bench_group_advantages.py [run.py options]` (it registers
itself with the runner for that run), or add ``"group_advantages": bench_group_advantages`` to
bench/run.py's SUITES.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

import torch

import rlhf_fast  # noqa: E402
from rlhf_fast.bench.common import Skip, Workload, dtype_name, fused_backend, is_fused
from rlhf_fast.reference import group_advantages_ref  # noqa: E402

OP = "group_advantages"


@dataclass(frozen=True)
class Case:
    prompts: int
    k: int
    mode: str = "grpo"
    scale: str = "group"
    dtype: torch.dtype = torch.float32
    drop: float = 0.0  # fraction of answers masked out (dropped)

    @property
    def name(self) -> str:
        drop = f" drop={self.drop:g}" if self.drop else ""
        return f"P={self.prompts} K={self.k} {self.mode}/{self.scale} {dtype_name(self.dtype)}{drop}"


CASES = [Case(1024, 8), Case(1024, 8, drop=0.1), Case(1024, 8, "grpo", "batch"), Case(1024, 8, "rloo", "none"),
         Case(4096, 16), Case(256, 64, dtype=torch.bfloat16)]
SWEEP = [Case(p, 8) for p in (64, 256, 4096)]
QUICK_CASES = [Case(128, 8), Case(128, 8, "rloo", "none", drop=0.1)]
GPU_CASES = [Case(1024, 8), Case(1024, 8, drop=0.1), Case(1024, 8, "grpo", "batch"), Case(1024, 8, "rloo", "none"),
             Case(16384, 16), Case(65536, 8, "grpo", "batch")]
MODES = ("nograd",)
REPS = 5              # the verl loop takes ~1 s at 8K answers
VERL_MAX_ANSWERS = 40_000  # beyond this the per-answer loop takes minutes per measurement

_compiled = {}


def sweep(case: Case) -> list[tuple[str, str, int]]:
    if (case.k, case.mode, case.drop, case.dtype) != (8, "grpo", 0.0, torch.float32):
        return []
    return [("K=8 grpo/group fp32", "P", case.prompts)]


def cost(case: Case) -> dict:
    """The shape rlhf_fast.kernels._cost.op_cost takes (compulsory bytes of the Triton kernels)."""
    return dict(prompts=case.prompts, k=case.k, dtype=dtype_name(case.dtype), batch=case.scale == "batch")


def providers(device: str) -> list[str]:
    return ["trl", "verl_loop", "compile"]


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(case.prompts, case.k, generator=g).to(device=device, dtype=case.dtype)
    mask = None
    if case.drop:
        mask = (torch.rand(case.prompts, case.k, generator=g) >= case.drop)
        mask[:, :2] = True  # every group keeps two answers: where peers are defined (TRL gives NaN for one)
        mask = mask.to(device)
    return scores, mask


def trl_formula(scores, mask, k: int, mode: str, scale: str):
    """TRL's GRPOTrainer (scale_rewards) / RLOOTrainer (normalize_advantages) advantage code."""
    from trl.trainer.utils import nanstd

    rewards = scores.float().reshape(-1)
    if mask is not None:
        rewards = torch.where(mask.reshape(-1), rewards, float("nan"))
    if mode == "grpo":
        mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
        if scale in ("group", "none"):
            std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
        else:
            std = nanstd(rewards).expand_as(rewards)
        adv = rewards - mean
        if scale != "none":
            adv = adv / (std + 1e-4)
    else:
        grouped = rewards.view(-1, k)
        counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        adv = rewards - ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
        if scale == "batch":
            adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0).view(scores.shape)


def verl_loop(scores, mask, k: int, mode: str, scale: str):
    """verl's per-answer loop over groups (index = prompt id); dropped answers are left out of the batch."""
    flat = scores.float().reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1)
    index = (torch.arange(flat.numel(), device=flat.device) // k)[keep].tolist()
    s = flat[keep].clone()
    id2score = defaultdict(list)
    for i in range(s.shape[0]):
        id2score[index[i]].append(s[i])
    id2mean, id2std = {}, {}
    for idx, group in id2score.items():
        stacked = torch.stack(group)
        id2mean[idx], id2std[idx] = stacked.mean(), stacked.std()
    for i in range(s.shape[0]):
        n = len(id2score[index[i]])
        if mode == "grpo":
            s[i] = (s[i] - id2mean[index[i]]) / (id2std[index[i]] + 1e-6)
        else:
            s[i] = s[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
    out = torch.zeros_like(flat)
    out[keep] = s
    return out.view(scores.shape)


def workload(provider: str, case: Case, device: str) -> Workload:
    scores, mask = make_inputs(case, device)
    args = (case.k, case.mode, case.scale)
    label = None
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, scores)
        fn = lambda s: rlhf_fast.group_advantages(s, mode=case.mode, scale=case.scale, mask=mask, backend=backend)
        label = f"rlhf_fast[{ran}]"
    elif provider == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            raise Skip("trl is not installed") from None
        ran, fn = "torch", lambda s: trl_formula(s, mask, *args)
    elif provider == "verl_loop":
        if case.scale not in ("group", "none") or case.mode == "grpo" and case.scale != "group":
            raise Skip("verl has no batch scaling for grpo/rloo")
        if case.prompts * case.k > VERL_MAX_ANSWERS:
            raise Skip(f"the per-answer loop is skipped above {VERL_MAX_ANSWERS} answers")
        ran, fn = "torch", lambda s: verl_loop(s, mask, *args)
    elif provider == "compile":
        try:
            import trl  # noqa: F401
        except ImportError:
            raise Skip("trl is not installed (the compiled formula uses its nanstd)") from None
        ran = "inductor"
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(trl_formula, dynamic=False)
        fn = lambda s: _compiled["fn"](s, mask, *args)
    else:
        raise ValueError(provider)
    return Workload(fn, [scores], ran, label=label)


def reference(case: Case, device: str) -> Workload:
    scores, mask = make_inputs(case, device)
    return Workload(lambda s: group_advantages_ref(s, mode=case.mode, scale=case.scale, mask=mask), [scores], "torch")


def derived(case: Case, mode: str, median_ms: float) -> dict:
    """Answers scored per second."""
    return {"Manswers/s": round(case.prompts * case.k / median_ms / 1e3, 3)}


if __name__ == "__main__":
    from bench import run

    run.SUITES[OP] = sys.modules[__name__]
    sys.exit(run.main(["--ops", OP, *sys.argv[1:]]))
