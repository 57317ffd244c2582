"""linear_logprobs benchmark cases.

Providers:
  rlhf_fast[<backend>]  the fused op (the automatic choice, and every other backend that runs here)
  eager                 hidden @ weight.T -> log_softmax -> gather: what trainers write
  compile               torch.compile of the same function
  trl                   trl.kernels.ChunkedLogProbFunction (TRL's chunked log-probs; torch fallback on CPU),
                        when trl is installed
  liger                 Liger-Kernel's fused linear cross entropy, reduction="none" (= -logprob), GPU only
Sweep: vocabulary at N = 2048, H = 512.
Memory (--memory): peak RSS of a fresh process above its inputs and the gradient buffers every method
must fill (grad_hidden, grad_weight).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.bench.common import Workload, dtype_name, fused_backend, is_fused
from rlhf_fast.reference import linear_logprobs_ref

OP = "linear_logprobs"


@dataclass(frozen=True)
class Case:
    n: int
    hdim: int
    vocab: int
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return f"N={self.n} H={self.hdim} V={self.vocab} {str(self.dtype).replace('torch.', '')}"


CASES = [Case(2048, 512, 32768), Case(2048, 512, 131072)]
SWEEP = [Case(2048, 512, 8192), Case(2048, 512, 65536)]
REPS = 5  # seconds per call for eager at V=131072
QUICK_CASES = [Case(512, 256, 8192), Case(512, 256, 16384)]
GPU_CASES = [Case(8192, 4096, v, torch.bfloat16) for v in (32000, 65536, 128256)]
MODES = ("nograd", "fwd", "bwd", "fwd+bwd")
TRL_CHUNK = 4096


def sweep(case: Case) -> list[tuple[str, str, int]]:
    return [(f"N={case.n} H={case.hdim} {dtype_name(case.dtype)}", "vocab", case.vocab)]


def cost(case: Case) -> dict:
    return dict(n=case.n, hidden=case.hdim, vocab=case.vocab, dtype=dtype_name(case.dtype))


def providers(device: str) -> list[str]:
    extra = ["trl"] if importlib.util.find_spec("trl") is not None else []
    if device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        extra.append("liger")
    return ["eager", "compile"] + extra


def peers_missing(device: str) -> dict[str, str]:
    missing = {}
    if importlib.util.find_spec("trl") is None:
        missing["trl"] = "trl is not installed"
    if importlib.util.find_spec("liger_kernel") is None:
        missing["liger"] = "liger_kernel is not installed"
    elif device != "cuda":
        missing["liger"] = "Liger-Kernel runs on CUDA only"
    return missing


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(case.n, case.hdim, generator=g).to(device=device, dtype=case.dtype)
    weight = (torch.randn(case.vocab, case.hdim, generator=g) / case.hdim ** 0.5).to(device=device, dtype=case.dtype)
    labels = torch.randint(0, case.vocab, (case.n,), generator=g).to(device)
    grad = torch.randn(case.n, generator=g).to(device)
    return hidden, weight, labels, grad


def eager_logprobs(hidden, weight, labels):
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


_compiled = {}
torch._dynamo.config.recompile_limit = 64


def workload(provider: str, case: Case, device: str) -> Workload:
    hidden, weight, labels, grad = make_inputs(case, device)
    label = None
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, hidden, weight)
        fwd = lambda h, w: rlhf_fast.linear_logprobs(h, w, labels, backend=backend)
        label = f"rlhf_fast[{ran}]"
    elif provider == "eager":
        ran = "torch"
        fwd = lambda h, w: eager_logprobs(h, w, labels)
    elif provider == "compile":
        ran = "inductor"
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(eager_logprobs)
        fwd = lambda h, w: _compiled["fn"](h, w, labels)
    elif provider == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        ran = "trl-chunked"
        fwd = lambda h, w: ChunkedLogProbFunction.apply(h, w, None, labels, 1.0, TRL_CHUNK, None, 1.0, ())[0]
    elif provider == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        ran = "liger"
        fwd = lambda h, w: -liger_fused_linear_cross_entropy(h, w, labels, reduction="none")
    else:
        raise ValueError(provider)
    return Workload(fwd, [hidden, weight], ran, lambda lp: (lp * grad).sum(), label=label)


def reference(case: Case, device: str) -> Workload:
    hidden, weight, labels, grad = make_inputs(case, device)
    return Workload(lambda h, w: linear_logprobs_ref(h, w, labels)[0], [hidden, weight], "torch",
                    lambda lp: (lp * grad).sum())


def grad_bytes(case: Case, mode: str) -> int:
    """Bytes of the gradients every method must return (subtracted from peak memory)."""
    if mode in ("nograd", "fwd"):
        return 0
    elem = torch.finfo(case.dtype).bits // 8
    return (case.n + case.vocab) * case.hdim * elem
