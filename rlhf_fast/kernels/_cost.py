"""Analytic cost model of the ops and of their GPU kernels: FLOPs, compulsory bytes, time at peak.

``op_cost`` / ``kernel_cost`` count the FLOPs and the compulsory bytes (every input read once, every
output written once) of an op or of one kernel at a given shape; ``estimate`` turns them into the time
at the peak of an H100 SXM or an H200 (``PEAKS``): max(FLOPs / peak FLOP/s, bytes / peak bandwidth),
the roofline lower bound. The same functions give the benchmarks their GB/s and TFLOP/s (bench/), the
README's estimate tables and ``rlhf-fast inspect --estimate``. Needs neither triton nor a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    name: str
    bandwidth: float          # HBM bytes/s
    tensor_flops: dict        # dense tensor-core FLOP/s by operand precision
    fp32_flops: float         # FP32 FMA on the CUDA cores (element-wise math, reductions)


# Datasheet peaks (dense, no sparsity). H200: the H100 SXM's compute with HBM3e.
PEAKS = {
    "H100": Peak("H100 SXM", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12}, 67e12),
    "H200": Peak("H200", 4.8e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12}, 67e12),
}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Operand precision of the tensor-core GEMMs per input dtype: fp32 inputs run on TF32 tensor cores
# (linear_logprobs as tf32x3: three TF32 products, counted in kernel_cost).
TENSOR_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "tf32"}


@dataclass(frozen=True)
class Cost:
    """FLOPs (`tensor_flops` on tensor cores, `flops` on CUDA cores) and compulsory HBM bytes."""

    bytes: float
    tensor_flops: float = 0.0
    flops: float = 0.0
    precision: str = "bf16"   # operand precision of the tensor-core FLOPs

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.tensor_flops + other.tensor_flops, self.flops + other.flops,
                    self.precision)

    @property
    def total_flops(self) -> float:
        return self.tensor_flops + self.flops

    def seconds(self, peak: Peak) -> dict:
        # tensor cores and CUDA cores work side by side: the lower bound is the busier of the two
        compute = max(self.tensor_flops / peak.tensor_flops[self.precision], self.flops / peak.fp32_flops)
        memory = self.bytes / peak.bandwidth
        return {"compute_s": compute, "memory_s": memory, "s": max(compute, memory),
                "bound": "compute" if compute >= memory else "memory"}


def _pairs_causal(t: int, s: int) -> int:
    """Visible (query, key) pairs of one head under the bottom-right causal mask: query i sees
    min(S, i + S - T + 1) keys (none when that is <= 0)."""
    if t <= s:
        return t * (s - t) + t * (t + 1) // 2
    return s * (s + 1) // 2


def attention_shape(kind: str, *, heads: int, head_dim: int, kv_heads: int | None = None, batch: int = 1,
                    seqlen: int = 0, causal: bool = True, lengths=(), groups: int = 0, prompt: int = 0,
                    k: int = 0, answer: int = 0, dtype: str = "bf16") -> dict:
    """Shape parameters of one attention call for op_cost("attention", ...): query/key tokens and the
    (query, key) pairs every head computes, for kind "dense" (batch x seqlen, causal or full), "varlen"
    (packed causal sequences of `lengths`) or "shared_prefix" (groups of one prompt + k answers)."""
    if kind == "dense":
        pairs = batch * (_pairs_causal(seqlen, seqlen) if causal else seqlen * seqlen)
        tokens = batch * seqlen
    elif kind == "varlen":
        pairs, tokens = sum(_pairs_causal(n, n) for n in lengths), sum(lengths)
    elif kind == "shared_prefix":
        pairs = groups * (_pairs_causal(prompt, prompt) + k * (answer * prompt + _pairs_causal(answer, answer)))
        tokens = groups * (prompt + k * answer)
    else:
        raise ValueError(f"attention shape kind {kind!r}: expected dense, varlen or shared_prefix")
    return dict(heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim, q_tokens=tokens, k_tokens=tokens,
                pairs=pairs, dtype=dtype)


def _attention_parts(heads, kv_heads, head_dim, q_tokens, k_tokens, pairs, dtype="bf16"):
    e = DTYPE_BYTES[dtype]
    q = q_tokens * heads * head_dim * e          # q, o, dO, dq each
    kv = k_tokens * kv_heads * head_dim * e      # k, v, dk, dv each
    row = q_tokens * heads * 4                   # lse, delta (fp32 per query row and head)
    mac = 2.0 * heads * head_dim * pairs         # FLOPs of one (T x S x D) GEMM over the visible pairs
    return q, kv, row, mac, TENSOR_PRECISION[dtype]


def op_cost(op: str, mode: str, **p) -> Cost:
    """FLOPs and compulsory bytes of one call of `op` in `mode` ("fwd", "bwd" or "fwd+bwd"; a no-grad
    forward costs as "fwd") at shape `p` (the keyword arguments each op documents below; dtype is
    "bf16", "fp16" or "fp32").

    FLOPs are those of the fused algorithm as the literature counts them: attention as flash-attention-2
    (forward 2 GEMMs = 4 pairs D per head; backward 5 GEMMs with the recompute of S = 10 pairs D, so
    fwd+bwd = 3.5x the forward; the softmax's exp and max, ~1/D of that, are not counted),
    linear_logprobs with its backward recomputing the logits (1 + 3 GEMMs); element-wise ops count a
    few FP32 operations per element (they are bandwidth-bound by a wide margin either way).
    Bytes: every input read once and every output written once (the HBM floor); what a kernel re-reads
    from L2 is not counted.
    """
    if mode == "nograd":
        mode = "fwd"
    if mode == "fwd+bwd":
        return op_cost(op, "fwd", **p) + op_cost(op, "bwd", **p)
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode {mode!r}: expected nograd, fwd, bwd or fwd+bwd")
    fwd = mode == "fwd"
    e = DTYPE_BYTES[p.get("dtype", "fp32")]
    if op == "gather_logprobs":  # n rows, vocab; entropy
        n, v, ent = p["n"], p["vocab"], bool(p.get("entropy", False))
        logits = n * v * e
        per_elem = 4 + 3 * ent  # max, subtract, exp, add (+ p * x, add, multiply for the entropy)
        if fwd:  # read logits, labels; write logprobs (+ entropy)
            return Cost(logits + 8 * n + 4 * n * (1 + ent), flops=per_elem * n * v)
        # read logits, labels, lse, grad (+ entropy and its grad); write grad_logits
        return Cost(2 * logits + 16 * n + 8 * n * ent, flops=(per_elem + 2) * n * v)
    if op in ("linear_logprobs", "linear_ppo_loss"):  # n (tokens), hidden, vocab
        n, h, v = p["n"], p["hidden"], p["vocab"]
        gemm = 2.0 * n * h * v
        weights = (n + v) * h * e
        per_token = 12 if op == "linear_logprobs" else 12 + 3 * e + 1  # + old/ref log-probs, advantages, mask
        if fwd:
            return Cost(weights + per_token * n, tensor_flops=gemm, flops=6.0 * n * v,
                        precision=TENSOR_PRECISION[p.get("dtype", "fp32")])
        # linear_logprobs recomputes the logits, then dH = G W, dW = G^T H; linear_ppo_loss forms G in
        # its forward pass (3 GEMMs in all). Both write dH and dW.
        gemms = 3 if op == "linear_logprobs" else 2
        return Cost(2 * weights + 8 * n, tensor_flops=gemms * gemm, flops=6.0 * n * v,
                    precision=TENSOR_PRECISION[p.get("dtype", "fp32")])
    if op == "linear":  # m rows, k inputs, n outputs: x (m, k) @ weight (n, k).T
        m, k, n = p["m"], p["k"], p["n"]
        gemm, prec = 2.0 * m * k * n, TENSOR_PRECISION[p.get("dtype", "fp32")]
        if fwd:  # read x, weight; write the output
            return Cost((m * k + n * k + m * n) * e, tensor_flops=gemm, precision=prec)
        # read grad, x, weight; write grad_x, grad_weight (two GEMMs)
        return Cost((m * n + 2 * m * k + 2 * n * k) * e, tensor_flops=2 * gemm, precision=prec)
    if op in ("kl_penalty", "ppo_policy_loss", "value_loss"):  # tokens
        t = p["tokens"]
        inputs = {"kl_penalty": 2, "ppo_policy_loss": 3, "value_loss": 3}[op]
        mask = 0 if op == "kl_penalty" else 1
        if fwd:  # read the inputs (+ mask); write the per-token result / forward-written gradient (fp32)
            return Cost(t * (inputs * e + mask + 4), flops=20.0 * t)
        return Cost(t * (4 + e), flops=2.0 * t)  # read the per-token gradient, write grad of the input
    if op == "gae":  # tokens; whiten
        t, whiten = p["tokens"], bool(p.get("whiten", False))
        if not fwd:
            return Cost(0.0)  # GAE has no backward
        return Cost(t * (2 * e + 1 + 8) + whiten * t * (4 + 1 + 4), flops=(15.0 + 6 * whiten) * t)
    if op == "ranking_loss":  # prompts, k; ranked (int64 ranks and candidate counts)
        n, k, ranked = p["prompts"], p["k"], bool(p.get("ranked", False))
        reads = n * k * e + ranked * (8 * n * k + 8 * n)
        pairs = n * k * (k - 1) / 2
        if fwd:
            return Cost(reads + 4, flops=20.0 * pairs)
        return Cost(reads + n * k * e, flops=25.0 * pairs)
    if op == "group_advantages":  # prompts, k; batch (batch scaling: a second pass, float64 in between)
        n, batch = p["prompts"] * p["k"], bool(p.get("batch", False))
        if not fwd:
            return Cost(0.0)  # advantages have no backward
        # read scores and mask, write fp32; with batch scaling write float64, read it, scores and mask again
        return Cost(n * (2 * e + 2 + 20) if batch else n * (e + 1 + 4), flops=(15.0 + 6 * batch) * n)
    if op == "attention":  # attention_shape(...)
        shape = {k: p[k] for k in ("heads", "kv_heads", "head_dim", "q_tokens", "k_tokens", "pairs")}
        q, kv, row, mac, prec = _attention_parts(**shape, dtype=p.get("dtype", "bf16"))
        if fwd:  # read q, k, v; write o, lse
            return Cost(2 * q + 2 * kv + row, tensor_flops=2 * mac, precision=prec)
        # read q, k, v, o, dO, lse; delta written and read; write dq, dk, dv
        return Cost(3 * q + 2 * kv + row + 2 * row + q + 2 * kv, tensor_flops=5 * mac, precision=prec)
    raise ValueError(f"no cost model for op {op!r}")


# Which op and phase each Triton kernel (KernelSpec.name without its [variant] and +flags) computes.
KERNEL_OPS = {
    "gather_logprobs_fwd": "gather_logprobs", "gather_logprobs_bwd": "gather_logprobs",
    "linear_logprobs_fwd": "linear_logprobs", "linear_logprobs_bwd": "linear_logprobs",
    "linear_logprobs_combine": "linear_logprobs",
    "kl_penalty_fwd": "kl_penalty", "ppo_policy_loss_fwd": "ppo_policy_loss", "value_loss_fwd": "value_loss",
    "policy_finalize": "ppo_policy_loss", "value_finalize": "value_loss",
    "gae_fwd": "gae", "gae_merge_moments": "gae", "gae_whiten": "gae",
    "ranking_loss_fwd": "ranking_loss", "ranking_loss_bwd": "ranking_loss", "ranking_loss_finalize": "ranking_loss",
    "attention_fwd": "attention", "attention_bwd_preprocess": "attention", "attention_bwd_dkdv": "attention",
    "attention_bwd_dq": "attention",
    "group_advantages_fwd": "group_advantages", "group_advantages_batch": "group_advantages",
}


def kernel_base(name: str) -> tuple[str, set[str]]:
    """("gather_logprobs_fwd", {"entropy"}) from "gather_logprobs_fwd+entropy"; variants in [...] dropped."""
    base = re.split(r"[\[+]", name, maxsplit=1)[0]
    return base, set(re.findall(r"\+(\w+)", name))


def kernel_cost(name: str, **p) -> Cost:
    """FLOPs and compulsory bytes of ONE kernel launch (`name` as in KernelSpec.name) at the op shape `p`
    (op_cost's keywords): what that kernel executes, recomputation included, e.g. the attention backward
    here is a dK/dV kernel (S, dV, dP, dK: 4 GEMMs) and a dQ kernel (S, dP, dQ: 3 GEMMs), 7 GEMMs where
    op_cost counts flash-attention-2's 5."""
    base, flags = kernel_base(name)
    op = KERNEL_OPS.get(base)
    if op is None:
        raise ValueError(f"no cost model for kernel {name!r}")
    e = DTYPE_BYTES[p.get("dtype", "fp32")]
    if op == "gather_logprobs":
        p = dict(p, entropy="entropy" in flags)
        return op_cost(op, "fwd" if base.endswith("_fwd") else "bwd", **p)
    if op == "linear_logprobs":
        n = p["n"]
        if base.endswith("combine"):  # per row and vocabulary split: max, sum (+ entropy term) in fp32
            splits = p.get("splits", 16)
            return Cost(n * splits * 4 * (3 + ("entropy" in flags)) + 8 * n + 4 * n, flops=10.0 * n * splits)
        cost = op_cost(op, "fwd" if base.endswith("_fwd") else "bwd", **p)
        if base.endswith("_bwd"):  # dH and dW accumulate in fp32 buffers: written as fp32
            cost = Cost(cost.bytes + (p["n"] + p["vocab"]) * p["hidden"] * (4 - e), cost.tensor_flops, cost.flops,
                        cost.precision)
        if p.get("dtype") == "fp32":  # tf32x3: three TF32 products per fp32 product
            cost = Cost(cost.bytes, 3 * cost.tensor_flops, cost.flops, "tf32")
        return cost
    if op in ("kl_penalty", "ppo_policy_loss", "value_loss"):
        if base.endswith("finalize"):  # one program folds the per-block partials
            return Cost(p.get("partials", 64) * 8 * 4.0, flops=8.0 * p.get("partials", 64))
        return op_cost(op, "fwd", **p)
    if op == "gae":
        t = p["tokens"]
        if base == "gae_fwd":
            return Cost(t * (2 * e + 1 + 8) + ("whiten" in flags) * p.get("sequences", 256) * 12, flops=15.0 * t)
        if base == "gae_merge_moments":
            return Cost(p.get("sequences", 256) * 12 + 8, flops=10.0 * p.get("sequences", 256))
        return Cost(t * (4 + 1 + 4), flops=2.0 * t)  # gae_whiten: read adv and mask, write adv
    if op == "group_advantages":
        n = p["prompts"] * p["k"]
        if base == "group_advantages_batch":  # read float64 advantages, scores, mask; write fp32
            return Cost(n * (8 + e + 1 + 4), flops=6.0 * n)
        return Cost(n * (e + 1 + (8 if ",batch]" in name else 4)), flops=15.0 * n)
    if op == "ranking_loss":
        if base.endswith("finalize"):
            return Cost(p.get("programs", 128) * 40 + 4, flops=4.0 * p.get("programs", 128))
        return op_cost(op, "fwd" if base.endswith("_fwd") else "bwd", **p)
    # attention
    shape = {k: p[k] for k in ("heads", "kv_heads", "head_dim", "q_tokens", "k_tokens", "pairs")}
    q, kv, row, mac, prec = _attention_parts(**shape, dtype=p.get("dtype", "bf16"))
    if base == "attention_fwd":
        return op_cost("attention", "fwd", **p)
    if base == "attention_bwd_preprocess":  # delta = rowsum(dO * O)
        return Cost(2 * q + row, flops=2.0 * p["q_tokens"] * p["heads"] * p["head_dim"])
    if base == "attention_bwd_dkdv":  # read q, k, v, dO, lse, delta; write dk, dv
        return Cost(2 * q + 4 * kv + 2 * row, tensor_flops=4 * mac, precision=prec)
    if base == "attention_bwd_dq":  # read q, k, v, dO, lse, delta; write dq
        return Cost(3 * q + 2 * kv + 2 * row, tensor_flops=3 * mac, precision=prec)
    raise ValueError(f"no cost model for kernel {name!r}")


# The GPU benchmark shapes of every op (bench/ runs these on a GPU; the README's estimate tables and
# inspect's per-kernel estimates use them).
_VARLEN = (2048, 512, 1024, 4096, 256, 3072, 1536, 768, 2048, 1280, 640, 896, 1792, 384, 2304, 1024)
GPU_SHAPES: dict[str, list[tuple[str, dict]]] = {
    "gather_logprobs": [
        ("N=8192 V=32000 bf16", dict(n=8192, vocab=32000, dtype="bf16")),
        ("N=8192 V=128256 bf16", dict(n=8192, vocab=128256, dtype="bf16")),
        ("N=8192 V=128256 bf16 +entropy", dict(n=8192, vocab=128256, dtype="bf16", entropy=True)),
    ],
    "linear_logprobs": [
        ("N=8192 H=4096 V=128256 bf16", dict(n=8192, hidden=4096, vocab=128256, dtype="bf16")),
        ("N=8192 H=4096 V=32000 bf16", dict(n=8192, hidden=4096, vocab=32000, dtype="bf16")),
    ],
    "linear_ppo_loss": [("N=8192 H=4096 V=128256 bf16", dict(n=8192, hidden=4096, vocab=128256, dtype="bf16"))],
    "kl_penalty": [("B=256 T=4096 bf16", dict(tokens=256 * 4096, dtype="bf16"))],
    "ppo_policy_loss": [("B=256 T=4096 bf16", dict(tokens=256 * 4096, dtype="bf16"))],
    "value_loss": [("B=256 T=4096 bf16", dict(tokens=256 * 4096, dtype="bf16"))],
    "gae": [("B=256 T=2048 fp32", dict(tokens=256 * 2048, sequences=256, dtype="fp32")),
            ("B=256 T=2048 fp32 +whiten", dict(tokens=256 * 2048, sequences=256, dtype="fp32", whiten=True))],
    "ranking_loss": [("P=1024 K=9 bf16 ranked", dict(prompts=1024, k=9, dtype="bf16", ranked=True))],
    "group_advantages": [("P=16384 K=16 fp32", dict(prompts=16384, k=16, dtype="fp32")),
                         ("P=65536 K=8 fp32 batch", dict(prompts=65536, k=8, dtype="fp32", batch=True))],
    "attention": [
        ("dense causal B=8 H=32 T=2048 D=128",
         attention_shape("dense", batch=8, heads=32, seqlen=2048, head_dim=128)),
        ("dense full B=8 H=32 T=2048 D=128",
         attention_shape("dense", batch=8, heads=32, seqlen=2048, head_dim=128, causal=False)),
        ("dense causal B=8 H=32 T=2048 D=64", attention_shape("dense", batch=8, heads=32, seqlen=2048, head_dim=64)),
        ("dense causal GQA B=8 H=32/8 T=2048 D=128",
         attention_shape("dense", batch=8, heads=32, kv_heads=8, seqlen=2048, head_dim=128)),
        (f"varlen causal 16 seqs ({sum(_VARLEN)} tok) H=32 D=128",
         attention_shape("varlen", lengths=_VARLEN, heads=32, head_dim=128)),
        ("shared prefix G=8 prompt=1024 K=9 answer=256 H=32 D=128",
         attention_shape("shared_prefix", groups=8, prompt=1024, k=9, answer=256, heads=32, head_dim=128)),
        ("separate K=9 x G=8 T=1280 (same RM batch) H=32 D=128",
         attention_shape("dense", batch=72, heads=32, seqlen=1280, head_dim=128)),
    ],
}
# flash-attention-2's fwd+bwd throughput at D = 128 on an H100: the goal of the Triton attention kernels
FA2_CLASS_FLOPS = 330e12


def estimate(cost: Cost, peaks=("H100", "H200")) -> dict:
    """GFLOP, MB, FLOP/byte and, per machine, the time at peak in microseconds and what bounds it."""
    row = {"GFLOP": cost.total_flops / 1e9, "MB": cost.bytes / 1e6,
           "FLOP/byte": cost.total_flops / cost.bytes if cost.bytes else float("inf")}
    for name in peaks:
        s = cost.seconds(PEAKS[name])
        row[f"{name}_us"] = s["s"] * 1e6
        row[f"{name}_bound"] = s["bound"]
    return row


def op_estimates(ops=None) -> list[dict]:
    """op_cost at every GPU benchmark shape and mode, timed at the H100 and H200 peaks."""
    rows = []
    for op, shapes in GPU_SHAPES.items():
        if ops and op not in ops:
            continue
        modes = ("fwd",) if op in ("gae", "group_advantages") else ("fwd", "bwd", "fwd+bwd")
        for label, shape in shapes:
            for mode in modes:
                rows.append({"op": op, "shape": label, "mode": mode, **estimate(op_cost(op, mode, **shape))})
    return rows


def kernel_estimates(names) -> list[dict]:
    """kernel_cost of each distinct kernel name at its op's GPU benchmark shapes (dtype taken from the shape)."""
    rows = []
    for name in dict.fromkeys(names):
        base, flags = kernel_base(name)
        op = KERNEL_OPS.get(base)
        if op is None:
            continue
        for label, shape in GPU_SHAPES[op]:
            # a shape with an optional output (entropy, whitening) goes with the kernels that compute it
            if any(f in shape and bool(shape[f]) != (f in flags) for f in ("entropy", "whiten")):
                continue
            rows.append({"kernel": name, "shape": label, **estimate(kernel_cost(name, **shape))})
    return rows


def attention_table() -> list[dict]:
    """Issue-5 yardstick: FLOPs and bytes per call of the attention GPU benchmark shapes, the time at the
    H100's 989 TFLOP/s / 3.35 TB/s, and at the 330 TFLOP/s of flash-attention-2-class kernels."""
    rows = []
    for label, shape in GPU_SHAPES["attention"]:
        for mode in ("fwd", "fwd+bwd"):
            cost = op_cost("attention", mode, **shape)
            s = cost.seconds(PEAKS["H100"])
            rows.append({"shape": label, "mode": mode, "GFLOP": cost.total_flops / 1e9, "MB": cost.bytes / 1e6,
                         "FLOP/byte": cost.total_flops / cost.bytes, "ms @989TF": s["compute_s"] * 1e3,
                         "ms @3.35TB/s": s["memory_s"] * 1e3, "ms @330TF": cost.tensor_flops / FA2_CLASS_FLOPS * 1e3,
                         "bound": s["bound"]})
    return rows
