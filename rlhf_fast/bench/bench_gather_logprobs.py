"""gather_logprobs benchmark cases.

Providers:
  rlhf_fast[<backend>]  the fused op (the automatic choice, and every other backend that runs here)
  eager                 log_softmax(logits.float()).gather(labels): what trainers write
  compile               torch.compile of the same function (inductor)
  liger                 Liger-Kernel's cross entropy with reduction="none" (= -logprob), GPU only
  floor                 logits.sum(): one read of the logits, the forward's memory floor (nograd only)
Sweeps: vocabulary at N = 4096 bf16, tokens at V = 32000 bf16.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.bench.common import Skip, Workload, dtype_name, fused_backend, is_fused
from rlhf_fast.reference import gather_logprobs_ref

OP = "gather_logprobs"


@dataclass(frozen=True)
class Case:
    n: int
    vocab: int
    dtype: torch.dtype
    entropy: bool = False

    @property
    def name(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"({self.n}, {self.vocab}) {dt}" + (" +entropy" if self.entropy else "")


BF16 = torch.bfloat16
CASES = [Case(4096, 32000, torch.float32), Case(4096, 32000, BF16), Case(4096, 32000, BF16, entropy=True),
         Case(512, 128256, BF16)]
SWEEP = [Case(4096, v, BF16) for v in (8192, 65536, 128256)] + [Case(n, 32000, BF16) for n in (1024, 2048, 8192)]
QUICK_CASES = [Case(1024, 32000, torch.float32), Case(1024, 32000, BF16), Case(1024, 8192, BF16)]
GPU_CASES = [Case(8192, 32000, BF16), Case(8192, 128256, BF16), Case(8192, 128256, BF16, entropy=True),
             Case(8192, 65536, BF16), Case(4096, 128256, BF16), Case(16384, 128256, BF16)]
MODES = ("nograd", "fwd", "bwd", "fwd+bwd")


def sweep(case: Case) -> list[tuple[str, str, int]]:
    """(series, swept axis, value) of the plots this case is a point of."""
    if case.entropy:
        return []
    dt = dtype_name(case.dtype)
    return [(f"N={case.n} {dt}", "vocab", case.vocab), (f"V={case.vocab} {dt}", "tokens", case.n)]


def cost(case: Case) -> dict:
    """Shape of the case for the analytic cost model (rlhf_fast.kernels._cost.op_cost)."""
    return dict(n=case.n, vocab=case.vocab, dtype=dtype_name(case.dtype), entropy=case.entropy)


def eager_logprobs(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def eager_logprobs_entropy(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


_compiled = {}
# Every (case, mode) is a new specialisation of the same function (shape, dtype, grad mode): allow
# enough recompiles that the compile provider never silently falls back to eager.
torch._dynamo.config.recompile_limit = 64


def providers(device: str) -> list[str]:
    peers = ["liger"] if device == "cuda" and importlib.util.find_spec("liger_kernel") else []
    return ["eager", "compile"] + peers + ["floor"]


def peers_missing(device: str) -> dict[str, str]:
    """Peers this suite knows but cannot run here, and why (reported by the runner)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return {"liger": "liger_kernel is not installed"}
    return {} if device == "cuda" else {"liger": "Liger-Kernel runs on CUDA only"}


def make_inputs(case: Case, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(case.n, case.vocab, generator=g) * 2).to(device=device, dtype=case.dtype)
    labels = torch.randint(0, case.vocab, (case.n,), generator=g).to(device)
    grad = torch.randn(case.n, generator=g).to(device)
    return logits, labels, grad


def workload(provider: str, case: Case, device: str) -> Workload:
    logits, labels, grad = make_inputs(case, device)

    def loss(out):
        if case.entropy:
            lp, ent = out
            return (lp * grad).sum() + (ent * grad).sum()
        return (out * grad).sum()

    label = None
    if provider == "floor":
        return Workload(lambda x: x.sum(), [logits], "torch", None, check=False)
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, logits)
        fwd = lambda x: rlhf_fast.gather_logprobs(x, labels, return_entropy=case.entropy, backend=backend)
        label = f"rlhf_fast[{ran}]"
    elif provider == "eager":
        ran = "torch"
        base = eager_logprobs_entropy if case.entropy else eager_logprobs
        fwd = lambda x: base(x, labels)
    elif provider == "compile":
        ran = "inductor"
        if case.entropy not in _compiled:
            _compiled[case.entropy] = torch.compile(eager_logprobs_entropy if case.entropy else eager_logprobs)
        fn = _compiled[case.entropy]
        fwd = lambda x: fn(x, labels)
    elif provider == "liger":
        if case.entropy:
            raise Skip("Liger's cross entropy returns no entropy")
        from liger_kernel.transformers.functional import liger_cross_entropy

        ran = "liger"
        fwd = lambda x: -liger_cross_entropy(x, labels, reduction="none")
    else:
        raise ValueError(provider)
    return Workload(fwd, [logits], ran, loss, label=label)


def reference(case: Case, device: str) -> Workload:
    logits, labels, grad = make_inputs(case, device)

    def fwd(x):
        lp, ent, _ = gather_logprobs_ref(x, labels, return_entropy=case.entropy)
        return (lp, ent) if case.entropy else lp

    def loss(out):
        lp, ent = out if case.entropy else (out, None)
        return (lp * grad).sum() + ((ent * grad).sum() if case.entropy else 0)

    return Workload(fwd, [logits], "torch", loss)


def grad_bytes(case: Case, mode: str) -> int:
    """Bytes of the gradient every method returns (subtracted from peak memory)."""
    return 0 if mode in ("nograd", "fwd") else case.n * case.vocab * (torch.finfo(case.dtype).bits // 8)
