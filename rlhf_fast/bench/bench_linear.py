"""linear benchmark cases: the projections of a Llama's layers (x (M, K) @ weight (N, K).T).

Providers:
  rlhf_fast[<backend>]  rlhf_fast.linear (cpu: oneDNN's fp32 GEMM; on a GPU the op runs torch's cuBLAS)
  eager                 torch.nn.functional.linear (ATen's GEMM: MKL's sgemm in x86 torch wheels)
  compile               torch.compile of F.linear
Sweep: K = N (square projections) at M = 2048 fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast.bench.common import Workload, dtype_name, fused_backend, is_fused

OP = "linear"


@dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return f"({self.m}, {self.k}) @ ({self.k}, {self.n}) {dtype_name(self.dtype)}"


# the tiny Llama of the pipeline's benchmarks (hidden 256, MLP 768), a ~1B model's attention and MLP
# projections, and bf16
CASES = [Case(2048, 256, 768), Case(2048, 768, 256), Case(2048, 2048, 2048), Case(2048, 2048, 5632),
         Case(2048, 2048, 2048, torch.bfloat16)]
SWEEP = [Case(2048, k, k) for k in (512, 1024, 4096)]
QUICK_CASES = [Case(256, 256, 768), Case(16, 256, 768), Case(256, 128, 128, torch.bfloat16)]
GPU_CASES = [Case(8192, 4096, 4096, torch.bfloat16), Case(8192, 4096, 14336, torch.bfloat16)]
MODES = ("nograd", "fwd", "bwd", "fwd+bwd")
REPS = 11


def sweep(case: Case) -> list[tuple[str, str, int]]:
    if case.m != 2048 or case.k != case.n or case.dtype != torch.float32:
        return []
    return [(f"M={case.m} {dtype_name(case.dtype)}", "K = N", case.k)]


def cost(case: Case) -> dict:
    return dict(m=case.m, k=case.k, n=case.n, dtype=dtype_name(case.dtype))


_compiled = {}


def providers(device: str) -> list[str]:
    return ["eager", "compile"]


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.m, case.k, generator=g).to(device=device, dtype=case.dtype)
    w = (torch.randn(case.n, case.k, generator=g) / case.k ** 0.5).to(device=device, dtype=case.dtype)
    return x, w


def workload(provider: str, case: Case, device: str) -> Workload:
    x, w = make_inputs(case, device)
    label = None
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, x, w)
        fn = lambda a, b: rlhf_fast.linear(a, b, backend=backend)
        label = f"rlhf_fast[{ran}]"
    elif provider == "eager":
        ran = "torch"
        fn = torch.nn.functional.linear
    elif provider == "compile":
        ran = "inductor"
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(torch.nn.functional.linear)
        fn = _compiled["fn"]
    else:
        raise ValueError(provider)
    return Workload(fn, [x, w], ran, lambda out: out.float().sum(), label=label)


def reference(case: Case, device: str) -> Workload:
    x, w = make_inputs(case, device)
    return Workload(torch.nn.functional.linear, [x, w], "torch", lambda out: out.float().sum())
