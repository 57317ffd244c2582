"""attention benchmark: a reward model's forward(+backward) over P prompts x K answers.

The InstructGPT reward model scores K in [4, 9] answers per prompt, all K in one batch element. Trainers
(TRL's RewardTrainer, OpenRLHF) run them as K separate (padded) sequences [prompt, answer_j]: the prompt's
tokens go through every layer K times. With rlhf_fast the batch is packed as [prompt, answer_1..answer_K]
and run once with shared-prefix attention (rlhf_fast.integrations.transformers.shared_prefix_forward):
every answer sees exactly what it saw alone, and the prompt is computed once.

Providers:
  rlhf_fast        tiny Llama with attn_implementation="rlhf_fast", one packed shared-prefix pass; labelled
                   rlhf_fast[shared_prefix:<backend>] by the backend the registry selects
  separate_sdpa    the same weights, K separate sequences per prompt, attn_implementation="sdpa"
Modes: nograd (scoring), fwd, bwd, fwd+bwd (the pairwise ranking loss, gradients of every weight).
The reference (correctness check before timing) is the separate path with "eager" attention.
Sweep: prompts per batch.

The attention kernels alone are benchmarked in bench_attention_op.py; their GPU shapes' FLOPs, bytes and
time at H100 peak come from rlhf_fast.kernels._cost (python -m rlhf_fast.bench.bench_attention --yardstick).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_fast.bench.common import Workload

OP = "shared_prefix_attention"
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
SWEEP = [Case(prompts=2), Case(prompts=8)]
QUICK_CASES = [Case(prompts=2, prompt_len=128, answer_len=32, layers=2),
               Case(prompts=1, prompt_len=128, answer_len=32, layers=2)]
GPU_CASES = [Case(prompts=p, prompt_len=1024, answer_len=256, hidden=2048, layers=4, heads=16, kv_heads=4,
                  intermediate=5504, dtype=torch.bfloat16) for p in (2, 4, 8)]
MODES = ("nograd", "fwd", "bwd", "fwd+bwd")
REPS = 5
FUSED_PROVIDERS = ["rlhf_fast"]  # the model runs on the automatic choice; no per-backend providers
TOLERANCE = {torch.float32: (2e-3, 2e-4)}  # a 4-layer model: summation order differs between attentions


def sweep(case: Case) -> list[tuple[str, str, int]]:
    return [(f"K={case.k} prompt={case.prompt_len} answer={case.answer_len} L={case.layers}", "prompts",
             case.prompts)]


def providers(device: str) -> list[str]:
    return ["separate_sdpa"]


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


def workload(provider: str, case: Case, device: str) -> Workload:
    prompts, answers = make_inputs(case, device)
    if provider == "rlhf_fast":
        import rlhf_fast
        from rlhf_fast.integrations.transformers import ATTN_IMPLEMENTATION

        model, head = _model(case, ATTN_IMPLEMENTATION, device)
        probe = torch.empty(1, case.heads, 2, case.hidden // case.heads, device=device, dtype=case.dtype)
        ran = "shared_prefix:" + rlhf_fast.select_backend(OP, probe)
        forward = _shared_rewards
    elif provider == "separate_sdpa":
        model, head = _model(case, "sdpa", device)
        ran, forward = "sdpa", _separate_rewards
    else:
        raise ValueError(provider)
    return Workload(lambda: forward(model, head, prompts, answers), [], ran, lambda r: pairwise_loss(r, case.k),
                    params=_params(model, head), label=f"rlhf_fast[{ran}]" if provider == "rlhf_fast" else None)


def reference(case: Case, device: str) -> Workload:
    prompts, answers = make_inputs(case, device)
    model, head = _model(case, "eager", device)
    return Workload(lambda: _separate_rewards(model, head, prompts, answers), [], "torch",
                    lambda r: pairwise_loss(r, case.k), params=_params(model, head))


def grad_bytes(case: Case, mode: str) -> int:
    """Bytes of the weight gradients every method fills (subtracted from peak memory)."""
    if mode in ("nograd", "fwd"):
        return 0
    model, head = _model(case, "eager", "cpu")
    return sum(p.numel() * p.element_size() for p in _params(model, head))


def derived(case: Case, mode: str, median_ms: float) -> dict:
    answers = case.prompts * case.k
    return {"answers/s": round(answers / median_ms * 1e3, 1), "packed_tokens": case.packed_tokens,
            "separate_tokens": case.separate_tokens}


def yardstick_markdown() -> str:
    """The attention GPU shapes: FLOPs and bytes per call, time at H100 peak (rlhf_fast.kernels._cost)."""
    from rlhf_fast.kernels._cost import attention_table
    from rlhf_fast.kernels._inspect import markdown_table

    return markdown_table(attention_table())


if __name__ == "__main__":
    import sys

    if "--yardstick" in sys.argv:
        print(yardstick_markdown())
