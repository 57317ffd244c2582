"""What the RL stages (PPO-ptx, GRPO/RLOO) share on top of :class:`~rlhf_fast.pipeline.trainer.Trainer`:
the prompts and their encoding, the seeded choice of an iteration's prompts, sampling the answers on each
rank, rule rewards, reference log-probs; and the shared-prefix packing of a prompt with its answers for the
training forward (each prompt computed once for its K answers, forward and backward)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline import trainer as T
from rlhf_fast.pipeline.chat import Encoder
from rlhf_fast.pipeline.config import data_options
from rlhf_fast.pipeline.data import load_prompts
from rlhf_fast.pipeline.generation import Samples, sample

PACKINGS = ("shared_prefix", "padded")


def load_rule(spec: str) -> Callable[[str, str], float]:
    """A rule reward ``module:function`` (or ``path/to/file.py:function``): fn(prompt, response) -> float."""
    if ":" not in spec:
        raise ValueError(f"rule_rewards: expected 'module:function' or 'file.py:function', got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise ValueError(f"rule_rewards: no such file {mod_name!r} (in {spec!r})")
        spec_ = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"rule_rewards: cannot import {mod_name!r} (in {spec!r}): {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"rule_rewards: {mod_name!r} has no function {fn_name!r}")
    return fn


def without_adapter(fn):
    """fn(model, ...) run with the peft model's LoRA adapter disabled (the base model)."""
    def run(model, *args, **kwargs):
        with model.disable_adapter():
            return fn(model, *args, **kwargs)
    return run


OLD_LOGPROBS = ("auto", "sampler", "recompute")


def use_sampler_logprobs(old_logprobs: str, precision: str) -> bool:
    """Whether the ratio's old log-probs are the sampler's own (``old_logprobs`` of PPOConfig / GRPOConfig:
    "sampler", "recompute", or "auto": the sampler's unless under bf16)."""
    if old_logprobs not in OLD_LOGPROBS:
        raise ValueError(f"old_logprobs: expected 'auto', 'sampler' or 'recompute', got {old_logprobs!r}")
    return old_logprobs == "sampler" or (old_logprobs == "auto" and precision != "bf16")


def answer_logprobs(model, prompts, answers, packing: str, pad_id: int, device, temperature: float,
                    trunk=None) -> Tensor:
    """(N,) fp32 log-probs of every answer token (answer by answer) under `model`, from the lm_head through
    :func:`rlhf_fast.linear_logprobs`."""
    h, labels, _ = answer_hidden(model, prompts, answers, packing, pad_id, device, trunk)
    weight, bias = C.lm_head_params(model)
    return rlhf_fast.linear_logprobs(h, weight, labels, bias=bias, temperature=temperature)


def last_token_scores(model, s: Samples) -> Tensor:
    """(B,) fp32 scalar-head scores of a reward model at each answer's last token."""
    h = C.hidden_states(model, s.input_ids, s.attention_mask)
    last = h[torch.arange(h.shape[0], device=h.device), s.last_index]
    return C.scalar_head(model)(last).squeeze(-1).float()


def resolve_packing(packing: str, model=None) -> str:
    """`packing` checked; "shared_prefix" falls back to "padded" for a model that cannot run the rlhf_fast
    attention (loaded with another attn_implementation). Without a model: only the check."""
    if packing not in PACKINGS:
        raise ValueError(f"packing: expected one of {PACKINGS}, got {packing!r}")
    if model is None or packing != "shared_prefix":
        return packing
    if getattr(D.unwrap_peft(model).config, "_attn_implementation", None) != C.ATTN:
        return "padded"
    return packing


def answer_hidden(model, prompts: list[list[int]], answers: list[list[list[int]]], packing: str, pad_id: int,
                  device, trunk=None) -> tuple[Tensor, Tensor, Tensor]:
    """The last hidden states that predict every answer token, answer by answer (group by group): ``(N, H)``,
    with the tokens they predict ``(N,)`` and each token's answer ``(N,)``.

    "shared_prefix": one packed sequence per prompt and its answers ``[prompt, answer_1, ..., answer_K]``
    (:func:`rlhf_fast.shared_prefix_attention`): the prompt's tokens are computed once for its K answers,
    in the forward and in the backward; with `trunk` (a :class:`~rlhf_fast.pipeline.trunk.Trunk` of these
    groups) only the model's layers above the shared frozen trunk run. "padded": the ``[prompt, answer_k]``
    rows as one right-padded batch. All give the same rows to fp32 rounding."""
    base = D.unwrap_peft(model)  # a LoRA model: the transformers model with its adapters inside
    n_ans = [len(a) for a in answers]
    flat_answers = [a for ans in answers for a in ans]
    if trunk is not None:
        from rlhf_fast.pipeline.trunk import top_hidden

        h, layout = top_hidden(base, trunk), trunk.layout
        return h[layout.source_index], trunk.ids[0][layout.target_index], layout.target_answer
    if packing == "shared_prefix":
        from rlhf_fast.integrations.transformers import LAYOUT_KWARG
        from rlhf_fast.pipeline.trunk import packed_inputs

        ids, pos, layout = packed_inputs(prompts, answers, device)
        h = base.base_model(input_ids=ids, position_ids=pos, use_cache=False, **{LAYOUT_KWARG: layout})
        h = h.last_hidden_state[0]
        return h[layout.source_index], ids[0][layout.target_index], layout.target_answer
    if packing != "padded":
        raise ValueError(f"packing: expected one of {PACKINGS}, got {packing!r}")
    from rlhf_fast.pipeline.data import pad_right

    rows, j = [], 0
    for p, k in zip(prompts, n_ans, strict=True):
        rows += [p + a for a in flat_answers[j: j + k]]
        j += k
    ids, mask = pad_right(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    plen = torch.tensor([len(p) for p, k in zip(prompts, n_ans, strict=True) for _ in range(k)], device=device)
    t = torch.arange(ids.shape[1] - 1, device=device)
    predicts = (t[None] >= plen[:, None] - 1) & (mask[:, 1:] > 0)          # position t predicts an answer token
    h = C.hidden_states(base, ids, mask)[:, :-1]
    answer_of = torch.repeat_interleave(torch.arange(len(flat_answers), device=device),
                                        torch.tensor([len(a) for a in flat_answers], device=device))
    return h[predicts], ids[:, 1:][predicts], answer_of


class _Encoded:
    """The token ids of rows read on demand (formats.IndexedRows), encoded when indexed."""

    def __init__(self, rows, encode):
        self.rows, self.encode = rows, encode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return self.encode(self.rows[i])


class RolloutTrainer(T.Trainer):
    """A trainer that samples answers to prompts each iteration. Provides, from ``config`` (prompts,
    prompts_per_iteration, samples_per_prompt / num_generations, max_new_tokens, temperature, top_p,
    max_prompt_len, chat_template, rule_rewards, seed): ``prompts``, ``prompt_ids``, ``encoder``, ``rules``,
    ``prompts_at(iteration)`` and ``generate(iteration)``. A subclass sets ``actor_run`` (the policy's
    engine) before it generates."""

    def _setup_prompts(self, cfg, tokenizer, prompts, rules, num_samples: int) -> None:
        d = self.dist
        if prompts is None:
            if not cfg.prompts:
                raise ValueError(f"prompts: give {type(cfg).__name__}.prompts (a data file) or pass prompts=")
            prompts = load_prompts(cfg.prompts, **data_options(cfg))
        if not prompts:
            raise ValueError("prompts: no prompts")
        for name in ("temperature", "top_p", "prompts_per_iteration", "max_new_tokens"):
            if not getattr(cfg, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(cfg, name)}")
        if cfg.grad_accum < 1:
            raise ValueError(f"grad_accum: must be >= 1, got {cfg.grad_accum}")
        if cfg.prompts_per_iteration % d.world_size:
            raise ValueError(f"prompts_per_iteration: {cfg.prompts_per_iteration} is not a multiple of the world "
                             f"size {d.world_size} (every rank generates for the same number of prompts)")
        self.num_samples = num_samples
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.rules = list(rules or []) + [load_rule(s) for s in cfg.rule_rewards]
        self.encoder = Encoder(tokenizer, cfg.max_prompt_len, cfg.max_new_tokens, cfg.chat_template)
        encode = lambda p: self.encoder.prompt(p["prompt"], p.get("_where", ""), p.get("system"),
                                               p.get("chat_template_kwargs"))
        # rows held in memory are encoded (and checked) once; rows read on demand are encoded when drawn
        self.prompt_ids = ([encode(p) for p in prompts] if isinstance(prompts, list | tuple)
                           else _Encoded(prompts, encode))

    @property
    def iteration(self) -> int:
        """Iterations done (the step count)."""
        return self.step_count

    def prompts_at(self, iteration: int) -> list[int]:
        """The global prompt indices of an iteration (each rank generates for its share, :func:`D.shard`)."""
        g = torch.Generator().manual_seed(C.step_seed(self.config.seed, 1, iteration))
        n = len(self.prompts)
        k = self.config.prompts_per_iteration
        return torch.randperm(n, generator=g)[:k].tolist() if k <= n else torch.randint(n, (k,), generator=g).tolist()

    @torch.no_grad()
    def generate(self, iteration: int, return_logprobs: bool) -> tuple[list[int], Samples]:
        """(this rank's prompt indices, their ``num_samples`` answers each, rows grouped by prompt)."""
        cfg, d = self.config, self.dist
        idx = D.shard(self.prompts_at(iteration), d)
        # the sampling of this iteration (rank 0 draws what a single process draws)
        torch.manual_seed(C.step_seed(cfg.seed, 2, iteration, *([d.rank] if d.rank else [])))
        s = self.actor_run.no_grad(sample, [self.prompt_ids[i] for i in idx], num_samples=self.num_samples,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                   pad_id=self.tokenizer.pad_token_id, eos_id=self.encoder.stop_ids,
                                   device=self.device, return_logprobs=return_logprobs)
        return idx, s

    def rule_scores(self, s: Samples, idx: list[int]) -> Tensor | None:
        """(B,) the summed rule rewards of each answer, or None without rules."""
        if not self.rules:
            return None
        texts = s.texts(self.tokenizer)
        prompt_texts = [self.prompts[i]["prompt"] for i in idx]
        extra = [sum(float(rule(prompt_texts[int(i)], t)) for rule in self.rules)
                 for i, t in zip(s.prompt_index.tolist(), texts, strict=True)]
        return torch.tensor(extra, device=self.device, dtype=torch.float32)

    def after_step(self, stats: dict) -> dict:
        cfg = self.config
        if self.evaluator is not None and cfg.eval_every and self.step_count % cfg.eval_every == 0:
            stats.update(self.actor_run.no_grad(self.evaluator))  # every rank: FSDP generation is collective
        return stats
