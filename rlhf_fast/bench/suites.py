"""The op suites `rlhf-fast bench` runs, and which cases and providers each one has.

Kept apart from run.py so that the runner, the fresh-process memory probe (memory.py) and the
pytest-benchmark suites of bench/ all import the suites without importing one another.
"""

from __future__ import annotations

from rlhf_fast.bench import (
    bench_attention,
    bench_attention_op,
    bench_dpo_loss,
    bench_gae,
    bench_gather_logprobs,
    bench_group_advantages,
    bench_linear,
    bench_linear_logprobs,
    bench_linear_ppo_loss,
    bench_ppo_losses,
    bench_ranking_loss,
)
from rlhf_fast.bench.common import fused_providers

SUITES = {
    "gather_logprobs": bench_gather_logprobs,
    "linear_logprobs": bench_linear_logprobs,
    "linear_ppo_loss": bench_linear_ppo_loss,
    "ppo_losses": bench_ppo_losses,
    "gae": bench_gae,
    "ranking_loss": bench_ranking_loss,
    "attention_op": bench_attention_op,
    "attention": bench_attention,
    "linear": bench_linear,
    "group_advantages": bench_group_advantages,
    "dpo_loss": bench_dpo_loss,
}


def cases(module, device: str, quick: bool, sweep: bool = True) -> list:
    """The cases of a suite: QUICK_CASES with --quick, GPU_CASES on a GPU, else CASES then SWEEP."""
    if quick:
        return list(module.QUICK_CASES)
    if device == "cuda" and hasattr(module, "GPU_CASES"):
        return list(module.GPU_CASES)
    return list(module.CASES) + (list(getattr(module, "SWEEP", [])) if sweep else [])


def providers(module, device: str) -> list[str]:
    """The rlhf_fast providers (the automatic choice, then each backend) and the suite's baselines."""
    fused = getattr(module, "FUSED_PROVIDERS", None) or fused_providers(module.OP, device)
    return list(fused) + list(module.providers(device))
