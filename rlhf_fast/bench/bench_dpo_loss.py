"""dpo_loss benchmark cases (P preference pairs of sequence log-probs).

Providers:
  rlhf_fast[<backend>]  the op (its torch backend: the loss and d loss / d log-prob in one forward)
  trl                   the loss block of TRL's DPOTrainer._compute_loss as TRL writes it (log-ratios,
                        F.logsigmoid / relu / square, mean) plus the rewards/* statistics it logs (TRL has
                        no function to import)
  compile               torch.compile of the same TRL code
Modes: nograd, fwd, bwd, fwd+bwd (gradients w.r.t. the policy log-probs).

Self-contained: run it alone with `python bench/bench_dpo_loss.py [run.py options]` (it registers itself
with the runner for that run), or add ``"dpo_loss": bench_dpo_loss`` to bench/run.py's SUITES.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rlhf_fast  # noqa: E402
from rlhf_fast.bench.common import Workload, dtype_name, fused_backend, is_fused
from rlhf_fast.reference import dpo_loss_ref  # noqa: E402

OP = "dpo_loss"


@dataclass(frozen=True)
class Case:
    pairs: int
    loss_type: str = "sigmoid"
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return f"P={self.pairs} {self.loss_type} {dtype_name(self.dtype)}"


CASES = [Case(64), Case(64, "ipo"), Case(64, "sigmoid_norm"), Case(1024), Case(1024, "hinge"),
         Case(1024, dtype=torch.bfloat16)]
SWEEP = [Case(p) for p in (8, 256, 8192)]
QUICK_CASES = [Case(64), Case(64, "ipo")]
GPU_CASES = CASES + [Case(65536)]
MODES = ("nograd", "fwd", "bwd", "fwd+bwd")
REPS = 21

_compiled = {}
_LENGTH_TYPES = ("ipo", "sigmoid_norm")


def sweep(case: Case) -> list[tuple[str, str, int]]:
    if (case.loss_type, case.dtype) != ("sigmoid", torch.float32):
        return []
    return [("sigmoid fp32", "P", case.pairs)]


def providers(device: str) -> list[str]:
    return ["trl", "compile"]


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    base = -torch.rand(case.pairs, generator=g) * 300
    logps = [(base + torch.randn(case.pairs, generator=g) * 3).to(device=device, dtype=case.dtype) for _ in range(4)]
    lengths = [torch.randint(1, 500, (case.pairs,), generator=g).to(device) for _ in range(2)]
    return logps, (lengths if case.loss_type in _LENGTH_TYPES else [None, None])


def trl_dpo(pc, pr, rc, rr, len_c, len_r, beta: float, loss_type: str):
    """TRL DPOTrainer's loss and rewards/* metrics (reverse KL, one loss type, no weighting)."""
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per_sequence_loss = torch.relu(1 - beta * delta_score)
    else:  # ipo / sigmoid_norm: per-token log-ratios
        delta = chosen_logratios / len_c.clamp(min=1.0) - rejected_logratios / len_r.clamp(min=1.0)
        per_sequence_loss = (delta - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * delta)
    loss = per_sequence_loss.mean()
    chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    margin = (chosen_rewards - rejected_rewards).mean()
    return loss.float(), chosen_rewards.float(), rejected_rewards.float(), accuracy, margin.float()


def workload(provider: str, case: Case, device: str) -> Workload:
    (pc, pr, rc, rr), (len_c, len_r) = make_inputs(case, device)
    label = None
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, pc, pr, rc, rr)

        def fn(c, r):
            loss, s = rlhf_fast.dpo_loss(c, r, rc, rr, beta=0.1, loss_type=case.loss_type, chosen_lengths=len_c,
                                         rejected_lengths=len_r, backend=backend)
            return loss, s.chosen_rewards, s.rejected_rewards, s.reward_accuracy, s.reward_margin
        label = f"rlhf_fast[{ran}]"
    elif provider == "trl":
        ran, fn = "torch", lambda c, r: trl_dpo(c, r, rc, rr, len_c, len_r, 0.1, case.loss_type)
    elif provider == "compile":
        ran = "inductor"
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(trl_dpo, dynamic=False)
        fn = lambda c, r: _compiled["fn"](c, r, rc, rr, len_c, len_r, 0.1, case.loss_type)
    else:
        raise ValueError(provider)
    return Workload(fn, [pc, pr], ran, lambda out: out[0], label=label)


def reference(case: Case, device: str) -> Workload:
    (pc, pr, rc, rr), (len_c, len_r) = make_inputs(case, device)

    def fn(c, r):
        loss, s = dpo_loss_ref(c, r, rc, rr, beta=0.1, loss_type=case.loss_type, chosen_lengths=len_c,
                               rejected_lengths=len_r)
        return loss, s["chosen_rewards"], s["rejected_rewards"], s["reward_accuracy"], s["reward_margin"]
    return Workload(fn, [pc, pr], "torch", lambda out: out[0])


def derived(case: Case, mode: str, median_ms: float) -> dict:
    """Pairs per second."""
    return {"Mpairs/s": round(case.pairs / median_ms / 1e3, 3)}


if __name__ == "__main__":
    from bench import run

    run.SUITES[OP] = sys.modules[__name__]
    sys.exit(run.main(["--ops", OP, *sys.argv[1:]]))
