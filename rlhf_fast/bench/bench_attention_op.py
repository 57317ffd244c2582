"""attention kernel benchmark: rlhf_fast.attention alone (dense batch, causal, GQA), no model around it.

Providers:
  rlhf_fast[<backend>]  the fused op (triton flash-attention-2 on a GPU; PyTorch's fused SDPA kernel on CPU)
  eager                 the reference: q k^T, mask, softmax, @ v with (T, S) tensors in memory
  compile               torch.compile of the reference
  sdpa                  torch.nn.functional.scaled_dot_product_attention (is_causal, enable_gqa)
  flash_attn            flash_attn.flash_attn_func (flash-attention 2), GPU only, when installed
Sweep: sequence length at B = 2, H = 8, D = 64 (CPU) / B = 8, H = 32, D = 128 bf16 (GPU).
TFLOP/s follow flash-attention-2's count (rlhf_fast.kernels._cost.op_cost: backward 2.5x the forward).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rlhf_fast
from rlhf_fast.bench.common import Workload, dtype_name, fused_backend, is_fused
from rlhf_fast.reference import attention_ref

OP = "attention"


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    kv_heads: int | None = None
    causal: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        heads = f"{self.heads}/{self.kv_heads}" if self.kv_heads else str(self.heads)
        return (f"{'causal' if self.causal else 'full'} B={self.batch} H={heads} T={self.seqlen} D={self.head_dim} "
                f"{str(self.dtype).replace('torch.', '')}")


CASES = [Case(2, 8, 1024, 64), Case(2, 8, 1024, 64, kv_heads=2)]
SWEEP = [Case(2, 8, t, 64) for t in (256, 512, 2048)]
QUICK_CASES = [Case(1, 4, 256, 64), Case(1, 4, 512, 64), Case(1, 4, 256, 64, kv_heads=2)]
GPU_CASES = ([Case(8, 32, t, 128, dtype=torch.bfloat16) for t in (512, 1024, 2048, 4096)]
             + [Case(8, 32, 2048, 64, dtype=torch.bfloat16), Case(8, 32, 2048, 128, kv_heads=8, dtype=torch.bfloat16),
                Case(8, 32, 2048, 128, causal=False, dtype=torch.bfloat16)])
MODES = ("nograd", "fwd", "bwd", "fwd+bwd")
REPS = 5
TOLERANCE = {torch.float32: (2e-3, 2e-4)}  # the reference's fp32 softmax vs a fused kernel's online one


def sweep(case: Case) -> list[tuple[str, str, int]]:
    if case.kv_heads or not case.causal:
        return []
    return [(f"causal B={case.batch} H={case.heads} D={case.head_dim} {dtype_name(case.dtype)}", "seq length",
             case.seqlen)]


def cost(case: Case) -> dict:
    from rlhf_fast.kernels._cost import attention_shape

    return attention_shape("dense", batch=case.batch, heads=case.heads, kv_heads=case.kv_heads, seqlen=case.seqlen,
                           head_dim=case.head_dim, causal=case.causal,
                           dtype=dtype_name(case.dtype) if case.dtype != torch.float32 else "fp32")


def providers(device: str) -> list[str]:
    peers = ["flash_attn"] if device == "cuda" and importlib.util.find_spec("flash_attn") else []
    return ["eager", "compile", "sdpa"] + peers


def peers_missing(device: str) -> dict[str, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return {"flash_attn": "flash_attn is not installed"}
    return {} if device == "cuda" else {"flash_attn": "flash-attention runs on CUDA only"}


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    kv = case.kv_heads or case.heads
    q = torch.randn(case.batch, case.heads, case.seqlen, case.head_dim, generator=g)
    k = torch.randn(case.batch, kv, case.seqlen, case.head_dim, generator=g)
    v = torch.randn(case.batch, kv, case.seqlen, case.head_dim, generator=g)
    grad = torch.randn(case.batch, case.heads, case.seqlen, case.head_dim, generator=g)
    return [x.to(device=device, dtype=case.dtype) for x in (q, k, v)] + [grad.to(device=device, dtype=case.dtype)]


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _flash(q, k, v, causal):
    from flash_attn import flash_attn_func

    # flash-attn takes (B, T, H, D); GQA by the head counts
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


_compiled = {}
torch._dynamo.config.recompile_limit = 64


def workload(provider: str, case: Case, device: str) -> Workload:
    q, k, v, grad = make_inputs(case, device)
    label = None
    if is_fused(provider):
        backend, ran = fused_backend(provider, OP, q, k, v)
        fwd = lambda q, k, v: rlhf_fast.attention(q, k, v, causal=case.causal, backend=backend)
        label = f"rlhf_fast[{ran}]"
    elif provider == "eager":
        ran, fwd = "torch", lambda q, k, v: attention_ref(q, k, v, causal=case.causal)
    elif provider == "compile":
        ran = "inductor"
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(attention_ref)
        fwd = lambda q, k, v: _compiled["fn"](q, k, v, causal=case.causal)
    elif provider == "sdpa":
        ran, fwd = "sdpa", lambda q, k, v: _sdpa(q, k, v, case.causal)
    elif provider == "flash_attn":
        ran, fwd = "flash_attn", lambda q, k, v: _flash(q, k, v, case.causal)
    else:
        raise ValueError(provider)
    return Workload(fwd, [q, k, v], ran, lambda out: (out.float() * grad.float()).sum(), label=label)


def reference(case: Case, device: str) -> Workload:
    q, k, v, grad = make_inputs(case, device)
    return Workload(lambda q, k, v: attention_ref(q, k, v, causal=case.causal), [q, k, v], "torch",
                    lambda out: (out.float() * grad.float()).sum())


def grad_bytes(case: Case, mode: str) -> int:
    if mode in ("nograd", "fwd"):
        return 0
    kv = case.kv_heads or case.heads
    return case.batch * (case.heads + 2 * kv) * case.seqlen * case.head_dim * (torch.finfo(case.dtype).bits // 8)
