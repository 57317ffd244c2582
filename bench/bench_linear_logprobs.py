"""linear_logprobs benchmark cases.

Providers:
  rlhf_fast[<backend>]  the fused op (cpu here; triton/cuda on a GPU)
  eager                 hidden @ weight.T -> log_softmax -> gather: what trainers write
  compile               torch.compile of the same function
  trl                   trl.kernels.ChunkedLogProbFunction (TRL's chunked log-probs; torch fallback on CPU),
                        when trl is installed
Modes: fwd (no grad: reference / old-policy log-probs), fwd+bwd (gradients of hidden and weight).
Memory (bench/run.py --memory): peak RSS of a fresh process above its inputs and the gradient
buffers every method must fill (grad_hidden, grad_weight).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

import rlhf_fast
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
REPS = 5  # seconds per call for eager at V=131072
QUICK_CASES = [Case(512, 256, 8192)]
MODES = ("fwd", "fwd+bwd")
TRL_CHUNK = 4096


def providers(device: str) -> list[str]:
    fused = ["rlhf_fast[cpu]"] if device == "cpu" else ["rlhf_fast[triton]", "rlhf_fast[cuda]"]
    extra = ["trl"] if importlib.util.find_spec("trl") is not None else []
    return fused + ["eager", "compile"] + extra


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


def setup(provider: str, case: Case, mode: str, device: str):
    hidden, weight, labels, grad = make_inputs(case, device)
    if provider.startswith("rlhf_fast["):
        backend = provider[len("rlhf_fast["):-1]
        try:
            ran = rlhf_fast.select_backend(OP, hidden, weight, backend=backend)
        except ValueError:
            return None
        fwd = lambda h, w: rlhf_fast.linear_logprobs(h, w, labels, backend=backend)
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
    else:
        raise ValueError(provider)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd(hidden, weight)
    else:
        def run():
            h = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            (fwd(h, w) * grad).sum().backward()
            return h.grad, w.grad

    def outputs():
        h = hidden.detach().requires_grad_(mode != "fwd")
        w = weight.detach().requires_grad_(mode != "fwd")
        lp = fwd(h, w)
        if mode != "fwd":
            (lp * grad).sum().backward()
            return lp.detach(), None, torch.cat([h.grad.flatten(), w.grad.flatten()])
        return lp.detach(), None, None

    return run, ran, outputs


def reference(case: Case, mode: str, device: str):
    hidden, weight, labels, grad = make_inputs(case, device)
    h = hidden.detach().requires_grad_(mode != "fwd")
    w = weight.detach().requires_grad_(mode != "fwd")
    lp, _, _ = linear_logprobs_ref(h, w, labels)
    if mode != "fwd":
        (lp * grad).sum().backward()
        return lp.detach(), None, torch.cat([h.grad.flatten(), w.grad.flatten()])
    return lp.detach(), None, None


def grad_bytes(case: Case, mode: str) -> int:
    """Bytes of the gradients every method must return (subtracted from peak memory)."""
    if mode == "fwd":
        return 0
    elem = torch.finfo(case.dtype).bits // 8
    return (case.n + case.vocab) * case.hdim * elem


def derived(case: Case, mode: str, median_ms: float) -> dict:
    gemms = 1 if mode == "fwd" else 3  # the useful GEMMs (the fused backward recomputes one more)
    flops = 2 * case.n * case.hdim * case.vocab * gemms
    return {"useful_GFLOP/s": round(flops / median_ms / 1e6, 1)}
