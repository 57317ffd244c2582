"""Benchmark cases of the RL losses: kl_penalty, ppo_policy_loss, value_loss, and the three together.

Providers:
  rlhf_fast[<backend>]  the fused ops on one backend (cpu here; triton/cuda on a GPU)
  eager                 the references of rlhf_fast/reference.py (what a trainer writes, with the same
                        statistics and masking rules)
  compile               torch.compile (inductor) of the same reference functions
Ops (the first word of a case's name):
  all     ppo_policy_loss + value_loss + a k3 KL term, summed into one loss, as one PPO step uses them:
          loss = policy + 0.5 * value + 0.1 * sum(kl * m) / sum(m)  (the KL aggregation is plain
          PyTorch in every provider)
  policy  ppo_policy_loss (clip-higher and dual clip on), loss and its six statistics
  cispo   ppo_policy_loss with objective="cispo" (weight cap 5), loss and statistics
  gspo    ppo_policy_loss with ratio_level="sequence" (GSPO), loss and statistics
  value   value_loss, loss and its two statistics
  kl      kl_penalty (k3), upstream gradient a fixed random (B, T) tensor
Sweep: tokens per row (T) at B = 64 fp32, every op together.

The outputs compared with the reference before timing are the loss and the statistics, and the
gradients of logprobs and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.bench.common import Workload, dtype_name, fused_backend, is_fused
from rlhf_fast.reference import (
    PPO_POLICY_STATS,
    VALUE_STATS,
    kl_penalty_ref,
    ppo_policy_loss_ref,
    value_loss_ref,
)

OP = "ppo_policy_loss"  # the op whose backend choice a provider reports ("value" and "kl" cases: their own)
OPS = ("all", "policy", "value", "kl")
POLICY_VARIANTS = {"policy": dict(clip_eps_high=0.28, dual_clip=3.0),
                   "cispo": dict(clip_eps_high=4.0, objective="cispo"),
                   "gspo": dict(clip_eps_high=0.28, ratio_level="sequence")}
CASE_OP = {"all": "ppo_policy_loss", "policy": "ppo_policy_loss", "cispo": "ppo_policy_loss",
           "gspo": "ppo_policy_loss", "value": "value_loss", "kl": "kl_penalty"}


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    length: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.op} ({self.n}, {self.length}) {str(self.dtype).replace('torch.', '')}"


CASES = [Case(op, 64, 2048, torch.float32) for op in (*OPS, "cispo", "gspo")] + [
    Case("all", 64, 2048, torch.bfloat16),
    Case("all", 256, 4096, torch.bfloat16),
]
SWEEP = [Case("all", 64, t, torch.float32) for t in (512, 1024, 4096)]
QUICK_CASES = [Case("all", 64, 2048, torch.float32), Case("all", 64, 1024, torch.float32),
               Case("policy", 64, 2048, torch.float32)]
GPU_CASES = [Case(op, 256, 4096, torch.bfloat16) for op in OPS] + [Case("all", 256, 4096, torch.float32)]
MODES = ("nograd", "fwd", "bwd", "fwd+bwd")
# Sub-millisecond cases on a shared 2-core machine: more repetitions than the runner's default 11.
REPS = 101

# Every (case, mode) is a new specialisation of the compiled functions (shape, dtype, grad mode).
torch._dynamo.config.recompile_limit = 64


def sweep(case: Case) -> list[tuple[str, str, int]]:
    if case.op != "all" or case.n != 64:
        return []
    return [(f"all B={case.n} {dtype_name(case.dtype)}", "T", case.length)]


def cost(case: Case) -> list[tuple[str, dict]]:
    """(op, shape) pairs of the analytic cost model, summed by the runner."""
    shape = dict(tokens=case.n * case.length, dtype=dtype_name(case.dtype))
    ops = {"all": ("ppo_policy_loss", "value_loss", "kl_penalty"), "value": ("value_loss",),
           "kl": ("kl_penalty",)}.get(case.op, ("ppo_policy_loss",))
    return [(op, shape) for op in ops]


def providers(device: str) -> list[str]:
    return ["eager", "compile"]


def make_inputs(case: Case, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (case.n, case.length)
    rand = lambda scale=1.0, shift=0.0: torch.randn(shape, generator=g) * scale + shift
    lp = rand(0.5, -1.5)
    t = dict(logprobs=lp, old_logprobs=lp + rand(0.2), ref_logprobs=lp + rand(0.2), advantages=rand(),
             values=rand(), old_values=None, returns=None, grad_kl=rand())
    t["old_values"] = t["values"] + rand(0.2)
    t["returns"] = t["values"] + rand()
    out = {k: v.to(device=device, dtype=case.dtype if k != "grad_kl" else torch.float32) for k, v in t.items()}
    lengths = torch.randint(case.length // 4, case.length + 1, (case.n,), generator=g)
    out["mask"] = (torch.arange(case.length) < lengths[:, None]).to(device)  # right-padded responses
    return out


def _impls(provider: str, backend: str | None = None):
    """(kl_penalty, ppo_policy_loss, value_loss) of a provider, with the public functions' signatures."""
    if is_fused(provider):
        return (lambda *a, **k: rlhf_fast.kl_penalty(*a, **k, backend=backend),
                lambda *a, **k: rlhf_fast.ppo_policy_loss(*a, **k, backend=backend),
                lambda *a, **k: rlhf_fast.value_loss(*a, **k, backend=backend))
    return kl_penalty_ref, ppo_policy_loss_ref, value_loss_ref


def _step(op: str, impls, t: dict, x: torch.Tensor, v: torch.Tensor):
    """(scalar loss, vector of the loss and statistics) of one case's computation."""
    kl_fn, policy_fn, value_fn = impls
    parts, loss = [], 0.0
    if op in ("all", *POLICY_VARIANTS):
        options = POLICY_VARIANTS.get(op, POLICY_VARIANTS["policy"])
        pl, ps = policy_fn(x, t["old_logprobs"], t["advantages"], t["mask"], **options)
        loss = loss + pl
        parts += [pl.detach().reshape(1), torch.stack([ps[k] for k in PPO_POLICY_STATS])]
    if op in ("all", "value"):
        vl, vs = value_fn(v, t["old_values"], t["returns"], t["mask"])
        loss = loss + 0.5 * vl
        parts += [vl.detach().reshape(1), torch.stack([vs[k] for k in VALUE_STATS])]
    if op == "all":
        kl = kl_fn(x, t["ref_logprobs"], estimator="k3")
        m = t["mask"]
        loss = loss + 0.1 * (kl * m).sum() / m.sum()
    elif op == "kl":
        loss = (kl_fn(x, t["ref_logprobs"], estimator="k3") * t["grad_kl"]).sum()
    parts.append(loss.detach().reshape(1))
    return loss, torch.cat(parts)


_compiled = {}


def _function(provider: str, op: str, backend: str | None = None):
    impls = _impls(provider, backend)
    fn = lambda t, x, v: _step(op, impls, t, x, v)
    if provider == "compile":
        if op not in _compiled:
            _compiled[op] = torch.compile(fn)
        return _compiled[op]
    return fn


def workload(provider: str, case: Case, device: str) -> Workload:
    t = make_inputs(case, device)
    backend, label = None, None
    if is_fused(provider):
        backend, ran = fused_backend(provider, CASE_OP[case.op], t["logprobs"])
        label = f"rlhf_fast[{ran}]"
    elif provider in ("eager", "compile"):
        ran = "torch" if provider == "eager" else "inductor"
    else:
        raise ValueError(provider)
    fn = _function(provider, case.op, backend)
    return Workload(lambda x, v: fn(t, x, v), [t["logprobs"], t["values"]], ran, lambda out: out[0], label=label)


def reference(case: Case, device: str) -> Workload:
    t = make_inputs(case, device)
    return Workload(lambda x, v: _step(case.op, _impls("eager"), t, x, v), [t["logprobs"], t["values"]], "torch",
                    lambda out: out[0])


def grad_bytes(case: Case, mode: str) -> int:
    """Bytes of the gradients every provider returns (rlhf_fast/bench/memory.py subtracts them)."""
    if mode in ("nograd", "fwd"):
        return 0
    n_grads = 2 if case.op == "all" else 1
    return n_grads * case.n * case.length * (torch.finfo(case.dtype).bits // 8)
