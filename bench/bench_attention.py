"""attention benchmark: a reward model's forward(+backward) over P prompts x K answers.

The InstructGPT reward model scores K in [4, 9] answers per prompt, all K in one batch element. Trainers
(TRL's RewardTrainer, OpenRLHF) run them as K separate (padded) sequences [prompt, answer_j]: the prompt's
tokens go through every layer K times. With rlhf_fast the batch is packed as [prompt, answer_1..answer_K]
and run once with shared-prefix attention (rlhf_fast.integrations.transformers.shared_prefix_forward):
every answer sees exactly what it saw alone, and the prompt is computed once.

Providers:
  rlhf_fast[shared_prefix]   tiny Llama with attn_implementation="rlhf_fast", one packed shared-prefix pass
  separate_sdpa              the same weights, K separate sequences per prompt, attn_implementation="sdpa"
Modes: fwd (scoring, no grad), fwd+bwd (the pairwise ranking loss, gradients of every weight).
The reference (correctness check before timing) is the separate path with "eager" attention.

gpu_yardstick() gives the FLOPs and bytes of attention-only GPU benchmark shapes and their time at H100
peak (python bench/bench_attention.py --yardstick).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OP = "attention"
VOCAB = 8192


@dataclass(frozen=True)
class Case:
    prompts: int
    k: int = 9
    prompt_len: int = 256
    answer_len: int = 64
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return (f"RM P={self.prompts} K={self.k} prompt={self.prompt_len} answer={self.answer_len} "
                f"llama h={self.hidden} L={self.layers}")

    @property
    def packed_tokens(self) -> int:
        return self.prompts * (self.prompt_len + self.k * self.answer_len)

    @property
    def separate_tokens(self) -> int:
        return self.prompts * self.k * (self.prompt_len + self.answer_len)


CASES = [Case(prompts=4)]
QUICK_CASES = [Case(prompts=2, prompt_len=128, answer_len=32, layers=2)]
MODES = ("fwd", "fwd+bwd")
REPS = 5


def providers(device: str) -> list[str]:
    return ["rlhf_fast[shared_prefix]", "separate_sdpa"]


_MODELS: dict = {}


def _model(case: Case, impl: str, device: str):
    """The reward model (LlamaModel + scalar head) of the case, the same weights for every attention."""
    import transformers

    import rlhf_fast.integrations.transformers  # noqa: F401  (registers "rlhf_fast")

    key = (case, impl, device)
    if key not in _MODELS:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=case.hidden,
                                          intermediate_size=case.intermediate, num_hidden_layers=case.layers,
                                          num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                                          max_position_embeddings=case.prompt_len + case.answer_len)
        torch.manual_seed(0)
        model = transformers.LlamaModel._from_config(config, attn_implementation=impl, dtype=case.dtype)
        head = torch.nn.Linear(case.hidden, 1).to(case.dtype)
        _MODELS[key] = (model.to(device), head.to(device))
    return _MODELS[key]


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (case.prompt_len,), generator=g).to(device) for _ in range(case.prompts)]
    answers = [[torch.randint(1, VOCAB, (case.answer_len,), generator=g).to(device) for _ in range(case.k)]
               for _ in range(case.prompts)]
    return prompts, answers


def pairwise_loss(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """InstructGPT's loss, answers ranked in their given order: -mean over the C(K,2) pairs of each prompt
    of log sigmoid(r_w - r_l)."""
    r = rewards.float().view(-1, k)
    w, l = torch.triu_indices(k, k, offset=1)
    return -torch.nn.functional.logsigmoid(r[:, w] - r[:, l]).mean()


def _separate_rewards(model, head, prompts, answers):
    """K separate sequences per prompt (right padding; all answers have the same length here)."""
    seqs = [torch.cat([p, a]) for p, ans in zip(prompts, answers, strict=True) for a in ans]
    width = max(s.shape[0] for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    mask = torch.zeros_like(ids)
    last = []
    for i, s in enumerate(seqs):
        ids[i, :s.shape[0]] = s
        mask[i, :s.shape[0]] = 1
        last.append(s.shape[0] - 1)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = torch.arange(len(seqs), device=ids.device)
    return head(hidden[rows, torch.tensor(last, device=ids.device)]).squeeze(-1)


def _shared_rewards(model, head, prompts, answers):
    from rlhf_fast.integrations.transformers import shared_prefix_forward

    return shared_prefix_forward(model, prompts, answers, reward_head=head, compute_logprobs=False).rewards


def _params(model, head):
    return list(model.parameters()) + list(head.parameters())


def _step(forward, model, head, prompts, answers, case, mode):
    if mode == "fwd":
        with torch.no_grad():
            return forward(model, head, prompts, answers)
    for p in _params(model, head):
        p.grad = None
    rewards = forward(model, head, prompts, answers)
    pairwise_loss(rewards, case.k).backward()
    return rewards


def _outputs(forward, model, head, prompts, answers, case, mode):
    rewards = _step(forward, model, head, prompts, answers, case, mode).detach().float()
    grad = None
    if mode != "fwd":
        grad = torch.cat([p.grad.flatten().float() for p in _params(model, head)])
    return rewards, None, grad


def setup(provider: str, case: Case, mode: str, device: str):
    prompts, answers = make_inputs(case, device)
    if provider == "rlhf_fast[shared_prefix]":
        import rlhf_fast
        from rlhf_fast.integrations.transformers import ATTN_IMPLEMENTATION

        model, head = _model(case, ATTN_IMPLEMENTATION, device)
        probe = torch.empty(1, case.heads, 2, case.hidden // case.heads, device=device, dtype=case.dtype)
        ran = "shared_prefix:" + rlhf_fast.select_backend("shared_prefix_attention", probe)
        forward = _shared_rewards
    elif provider == "separate_sdpa":
        model, head = _model(case, "sdpa", device)
        ran, forward = "sdpa", _separate_rewards
    else:
        raise ValueError(provider)
    run = lambda: _step(forward, model, head, prompts, answers, case, mode)
    outputs = lambda: _outputs(forward, model, head, prompts, answers, case, mode)
    return run, ran, outputs


def reference(case: Case, mode: str, device: str):
    prompts, answers = make_inputs(case, device)
    model, head = _model(case, "eager", device)
    return _outputs(_separate_rewards, model, head, prompts, answers, case, mode)


def grad_bytes(case: Case, mode: str) -> int:
    """Bytes of the weight gradients every method fills (subtracted from peak memory)."""
    if mode == "fwd":
        return 0
    model, head = _model(case, "eager", "cpu")
    return sum(p.numel() * p.element_size() for p in _params(model, head))


def derived(case: Case, mode: str, median_ms: float) -> dict:
    answers = case.prompts * case.k
    return {"answers/s": round(answers / median_ms * 1e3, 1), "packed_tokens": case.packed_tokens,
            "separate_tokens": case.separate_tokens}


# ---------------------------------------------------------------------------------------------
# GPU yardstick: FLOPs and compulsory bytes of attention-only shapes, time at H100 SXM peak
# ---------------------------------------------------------------------------------------------

H100_BF16_FLOPS = 989e12   # dense bf16 tensor-core peak, H100 SXM
H100_HBM_BYTES = 3.35e12   # HBM3 bandwidth, H100 SXM
FA2_CLASS_FLOPS = 330e12   # flash-attention-2 class fwd+bwd throughput at D = 128 on H100


def _pairs_causal(t: int, s: int) -> int:
    """Visible (query, key) pairs of one head under the bottom-right causal mask: row i sees
    min(S, i + S - T + 1) keys (none when that is <= 0)."""
    if t <= s:
        return t * (s - t) + t * (t + 1) // 2
    return s * (s + 1) // 2


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    q_tokens: int     # all query tokens of the call
    k_tokens: int     # all key tokens of the call
    pairs: int        # visible (query, key) pairs per head

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.heads * self.head_dim * self.pairs  # S = q k^T and O = P v, 2 flops per MAC
        # backward: S recomputed, dV = P^T dO, dP = dO v^T, dQ = dS k, dK = dS^T q: 2.5x the forward
        return fwd if mode == "fwd" else 3.5 * fwd

    def bytes(self, mode: str, elem: int = 2) -> float:
        q = self.q_tokens * self.heads * self.head_dim * elem
        kv = self.k_tokens * self.kv_heads * self.head_dim * elem
        lse = self.q_tokens * self.heads * 4
        fwd = q + 2 * kv + q + lse                     # read q, k, v; write o, lse
        bwd = (q + 2 * kv + 2 * q + lse) + 2 * lse + (q + 2 * kv)  # read q,k,v,o,dO,lse; delta w+r; write dq,dk,dv
        return fwd if mode == "fwd" else fwd + bwd


def _dense(name, b, h, t, d, causal, kv_heads=None):
    pairs = b * (_pairs_causal(t, t) if causal else t * t)
    return Shape(name, h, kv_heads or h, d, b * t, b * t, pairs)


def _varlen(name, lengths, h, d):
    return Shape(name, h, h, d, sum(lengths), sum(lengths), sum(_pairs_causal(n, n) for n in lengths))


def _shared(name, groups, prompt, k, answer, h, d):
    per_group = _pairs_causal(prompt, prompt) + k * (answer * prompt + _pairs_causal(answer, answer))
    tokens = groups * (prompt + k * answer)
    return Shape(name, h, h, d, tokens, tokens, groups * per_group)


def gpu_shapes() -> list[Shape]:
    varlen = [2048, 512, 1024, 4096, 256, 3072, 1536, 768, 2048, 1280, 640, 896, 1792, 384, 2304, 1024]  # 23.5k
    return [
        _dense("dense causal B=8 H=32 T=2048 D=128", 8, 32, 2048, 128, True),
        _dense("dense full B=8 H=32 T=2048 D=128", 8, 32, 2048, 128, False),
        _dense("dense causal B=8 H=32 T=2048 D=64", 8, 32, 2048, 64, True),
        _dense("dense causal GQA B=8 H=32/8 T=2048 D=128", 8, 32, 2048, 128, True, kv_heads=8),
        _varlen(f"varlen causal 16 seqs ({sum(varlen)} tok) H=32 D=128", varlen, 32, 128),
        _shared("shared prefix G=8 prompt=1024 K=9 answer=256 H=32 D=128", 8, 1024, 9, 256, 32, 128),
        _dense("separate K=9 x G=8 T=1280 (same RM batch) H=32 D=128", 72, 32, 1280, 128, True),
    ]


def gpu_yardstick() -> list[dict]:
    """Per shape and mode: GFLOP, MB moved at least, time at H100 peak compute / bandwidth, and at the
    330 TFLOP/s flash-attention-2-class fwd+bwd throughput."""
    rows = []
    for shape in gpu_shapes():
        for mode in ("fwd", "fwd+bwd"):
            f, b = shape.flops(mode), shape.bytes(mode)
            t_compute, t_bytes = f / H100_BF16_FLOPS * 1e3, b / H100_HBM_BYTES * 1e3
            rows.append({"shape": shape.name, "mode": mode, "GFLOP": round(f / 1e9, 1), "MB": round(b / 2**20, 1),
                         "FLOP/byte": round(f / b, 1), "ms @989TF": round(t_compute, 3),
                         "ms @3.35TB/s": round(t_bytes, 3), "ms @330TF": round(f / FA2_CLASS_FLOPS * 1e3, 3),
                         "bound": "compute" if t_compute >= t_bytes else "memory"})
    return rows


def yardstick_markdown() -> str:
    rows = gpu_yardstick()
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if "--yardstick" in sys.argv:
        print(yardstick_markdown())
