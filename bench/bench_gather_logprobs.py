"""gather_logprobs benchmark cases.

Providers:
  rlhf_fast[<backend>]  the fused op on one backend (cpu here; triton/cuda on a GPU)
  eager                 log_softmax(logits.float()).gather(labels): what trainers write
  compile               torch.compile of the same function (inductor)
  floor                 logits.sum(): one read of the logits, the forward's memory floor
Modes: fwd (no grad), fwd+bwd (upstream gradient on the log-probs, grad of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
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


CASES = [Case(4096, 32000, torch.float32), Case(4096, 32000, torch.bfloat16),
         Case(4096, 32000, torch.bfloat16, entropy=True), Case(512, 128256, torch.bfloat16)]
QUICK_CASES = [Case(1024, 32000, torch.float32), Case(1024, 32000, torch.bfloat16)]
MODES = ("fwd", "fwd+bwd")


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
    fused = [f"rlhf_fast[{b}]" for b in ("cpu",) if device == "cpu"] or \
            [f"rlhf_fast[{b}]" for b in ("triton", "cuda")]
    return fused + ["eager", "compile", "floor"]


def make_inputs(case: Case, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(case.n, case.vocab, generator=g) * 2).to(device=device, dtype=case.dtype)
    labels = torch.randint(0, case.vocab, (case.n,), generator=g).to(device)
    grad = torch.randn(case.n, generator=g).to(device)
    return logits, labels, grad


def setup(provider: str, case: Case, mode: str, device: str):
    """Returns (fn, backend_name, outputs_fn) or None when the provider does not apply.

    outputs_fn() runs once and returns (logprobs, entropy or None, grad or None) for the
    equality check against the reference that precedes every timing.
    """
    logits, labels, grad = make_inputs(case, device)
    if provider == "floor":
        return (lambda: logits.sum(), "torch", None) if mode == "fwd" else None
    if provider.startswith("rlhf_fast["):
        backend = provider[len("rlhf_fast["):-1]
        try:
            ran = rlhf_fast.select_backend(OP, logits, backend=backend)
        except ValueError:
            return None
        fwd = lambda x: rlhf_fast.gather_logprobs(x, labels, return_entropy=case.entropy, backend=backend)
    elif provider == "eager":
        ran = "torch"
        base = eager_logprobs_entropy if case.entropy else eager_logprobs
        fwd = lambda x: base(x, labels)
    elif provider == "compile":
        ran = "inductor"
        key = case.entropy
        if key not in _compiled:
            _compiled[key] = torch.compile(eager_logprobs_entropy if case.entropy else eager_logprobs)
        fn = _compiled[key]
        fwd = lambda x: fn(x, labels)
    else:
        raise ValueError(provider)

    def loss_of(out):
        if case.entropy:
            lp, ent = out
            return (lp * grad).sum() + (ent * grad).sum()
        return (out * grad).sum()

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd(logits)
    else:
        def run():
            x = logits.detach().requires_grad_(True)
            loss_of(fwd(x)).backward()
            return x.grad

    def outputs():
        x = logits.detach().requires_grad_(mode != "fwd")
        out = fwd(x)
        lp, ent = out if case.entropy else (out, None)
        if mode != "fwd":
            loss_of(out).backward()
        return lp.detach(), None if ent is None else ent.detach(), x.grad

    return run, ran, outputs


def reference(case: Case, mode: str, device: str):
    logits, labels, grad = make_inputs(case, device)
    x = logits.detach().requires_grad_(mode != "fwd")
    lp, ent, _ = gather_logprobs_ref(x, labels, return_entropy=case.entropy)
    if mode != "fwd":
        loss = (lp * grad).sum() + ((ent * grad).sum() if case.entropy else 0)
        loss.backward()
    return lp.detach(), None if ent is None else ent.detach(), x.grad


def derived(case: Case, mode: str, median_ms: float) -> dict:
    """Bytes the fused kernels must move at least (logits read once forward; read + grad write
    backward) and the implied GB/s."""
    elem = torch.finfo(case.dtype).bits // 8
    nbytes = case.n * case.vocab * elem * (1 if mode == "fwd" else 3)
    return {"min_bytes": nbytes, "GB/s": round(nbytes / median_ms / 1e6, 1)}
