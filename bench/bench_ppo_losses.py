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
  value   value_loss, loss and its two statistics
  kl      kl_penalty (k3), upstream gradient a fixed random (B, T) tensor
Modes: fwd (no grad), fwd+bwd (gradients w.r.t. logprobs and values).

The outputs compared with the reference before timing are (loss and statistics as one vector, None,
the gradients concatenated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.reference import (
    PPO_POLICY_STATS,
    VALUE_STATS,
    kl_penalty_ref,
    ppo_policy_loss_ref,
    value_loss_ref,
)

OP = "ppo_policy_loss"  # the op whose backend choice a provider reports
OPS = ("all", "policy", "value", "kl")


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    length: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.op} ({self.n}, {self.length}) {str(self.dtype).replace('torch.', '')}"


CASES = [Case(op, 64, 2048, torch.float32) for op in OPS] + [
    Case("all", 64, 2048, torch.bfloat16),
    Case("all", 256, 4096, torch.bfloat16),
]
QUICK_CASES = [Case("all", 64, 2048, torch.float32), Case("policy", 64, 2048, torch.float32)]
MODES = ("fwd", "fwd+bwd")
# Sub-millisecond cases on a shared 2-core machine: more repetitions than the runner's default 11.
REPS = 101

# Every (case, mode) is a new specialisation of the compiled functions (shape, dtype, grad mode).
torch._dynamo.config.recompile_limit = 64


def providers(device: str) -> list[str]:
    fused = [f"rlhf_fast[{b}]" for b in ("cpu",) if device == "cpu"] or \
            [f"rlhf_fast[{b}]" for b in ("triton", "cuda")]
    return fused + ["eager", "compile"]


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


def _impls(provider: str):
    """(kl_penalty, ppo_policy_loss, value_loss) of a provider, with the public functions' signatures."""
    if provider.startswith("rlhf_fast["):
        backend = provider[len("rlhf_fast["):-1]
        return (lambda *a, **k: rlhf_fast.kl_penalty(*a, **k, backend=backend),
                lambda *a, **k: rlhf_fast.ppo_policy_loss(*a, **k, backend=backend),
                lambda *a, **k: rlhf_fast.value_loss(*a, **k, backend=backend))
    return kl_penalty_ref, ppo_policy_loss_ref, value_loss_ref


def _step(op: str, impls, t: dict, x: torch.Tensor, v: torch.Tensor):
    """(scalar loss, vector of the loss and statistics) of one case's computation."""
    kl_fn, policy_fn, value_fn = impls
    parts, loss = [], 0.0
    if op in ("all", "policy"):
        pl, ps = policy_fn(x, t["old_logprobs"], t["advantages"], t["mask"], clip_eps_high=0.28, dual_clip=3.0)
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


def _function(provider: str, op: str):
    impls = _impls(provider)
    fn = lambda t, x, v: _step(op, impls, t, x, v)
    if provider == "compile":
        if op not in _compiled:
            _compiled[op] = torch.compile(fn)
        return _compiled[op]
    return fn


def setup(provider: str, case: Case, mode: str, device: str):
    """Returns (fn, backend_name, outputs_fn) or None when the provider does not apply."""
    t = make_inputs(case, device)
    if provider.startswith("rlhf_fast["):
        backend = provider[len("rlhf_fast["):-1]
        try:
            ran = rlhf_fast.select_backend(OP, t["logprobs"], backend=backend)
        except ValueError:
            return None
    elif provider in ("eager", "compile"):
        ran = "torch" if provider == "eager" else "inductor"
    else:
        raise ValueError(provider)
    fn = _function(provider, case.op)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(t, t["logprobs"], t["values"])
    else:
        def run():
            x = t["logprobs"].detach().requires_grad_(True)
            v = t["values"].detach().requires_grad_(True)
            loss, _ = fn(t, x, v)
            loss.backward()
            return x.grad, v.grad

    def outputs():
        return _outputs(fn, t, mode)

    return run, ran, outputs


def _outputs(fn, t, mode):
    grad = mode != "fwd"
    x = t["logprobs"].detach().requires_grad_(grad)
    v = t["values"].detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        loss, values = fn(t, x, v)
    if not grad:
        return values, None, None
    loss.backward()
    grads = [g.reshape(-1) for g in (x.grad, v.grad) if g is not None]
    return values, None, torch.cat(grads)


def reference(case: Case, mode: str, device: str):
    return _outputs(lambda t, x, v: _step(case.op, _impls("eager"), t, x, v), make_inputs(case, device), mode)


def derived(case: Case, mode: str, median_ms: float) -> dict:
    """Bytes the fused ops must move at least: every input read once (and each gradient written once
    in fwd+bwd), and the implied GB/s."""
    elem = torch.finfo(case.dtype).bits // 8
    tokens = case.n * case.length
    reads = {"all": 7 * elem + 1, "policy": 3 * elem + 1, "value": 3 * elem + 1, "kl": 2 * elem}[case.op]
    grads = {"all": 2, "policy": 1, "value": 1, "kl": 1}[case.op] if mode != "fwd" else 0
    nbytes = tokens * (reads + grads * elem + (4 if case.op == "kl" and mode != "fwd" else 0))
    return {"min_bytes": nbytes, "GB/s": round(nbytes / median_ms / 1e6, 1)}


def grad_bytes(case: Case, mode: str) -> int:
    """Bytes of the gradients every provider returns (bench/memory.py subtracts them)."""
    if mode == "fwd":
        return 0
    n_grads = 2 if case.op == "all" else 1
    return n_grads * case.n * case.length * (torch.finfo(case.dtype).bits // 8)
