"""GRPO and its family: per iteration, K answers to each of the iteration's prompts, a score per answer
(rule rewards and/or a frozen reward model), group-relative advantages (:func:`rlhf_fast.group_advantages`:
GRPO, Dr. GRPO, RLOO's leave-one-out baseline, REINFORCE++), then ``num_iterations`` passes of the
clipped-ratio loss with an optional k3 KL to the reference, straight from the lm_head
(:func:`rlhf_fast.linear_ppo_loss`). No critic, no reward shaping.

Training forwards pack each prompt with its K answers (``packing="shared_prefix"``,
:func:`rlhf_fast.pipeline.rl.answer_hidden`): the prompt's tokens are computed once per group instead of K
times, forward and backward; a group is never split across micro-batches. Every loss is normalised by
counts over all ranks and micro-batches of the optimizer step, so the step's gradient does not depend on the
world size or on ``grad_accum``.

How our options map to TRL's GRPOTrainer: ``num_generations``, ``beta``, ``epsilon`` / ``epsilon_high``,
``num_iterations``, ``scale_rewards`` and ``loss_type`` mean what they mean there, with one difference:
TRL's "bnpo" normalises by the tokens of one process's batch and "dapo" by the tokens of the global batch;
ours always takes the global count, so the two are the same loss. RLOO is ``advantage="rloo"`` (TRL's
RLOOTrainer; verl's and OpenRLHF's ``rloo`` estimator). ``loss_type="cispo"``, ``importance_sampling_level`` (GSPO),
``delta`` (two-sided clip = our dual clip) and ``rollout_is*`` (TRL's ``vllm_importance_sampling_*``) are TRL's too;
for cispo, ``epsilon_high`` is the cap of the weight itself, as in TRL.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline.config import GRPOConfig, learning_rate
from rlhf_fast.pipeline.rl import (
    RolloutTrainer,
    answer_hidden,
    answer_logprobs,
    last_token_scores,
    resolve_packing,
    use_sampler_logprobs,
    without_adapter,
)
from rlhf_fast.pipeline.trunk import packed_trunk, shared_depth
from rlhf_fast.reference import ADVANTAGE_MODES, RATIO_LEVELS, ROLLOUT_IS_MODES

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo")
ROLLOUT_IS = ("none", *ROLLOUT_IS_MODES)


def check_policy_options(cfg: GRPOConfig) -> None:
    """The loss options of GRPOConfig, checked before any model is loaded."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.importance_sampling_level not in RATIO_LEVELS:
        raise ValueError(f"importance_sampling_level: expected one of {RATIO_LEVELS}, "
                         f"got {cfg.importance_sampling_level!r}")
    if not cfg.epsilon > 0 or (cfg.epsilon_high is not None and not cfg.epsilon_high > 0):
        raise ValueError(f"epsilon: expected > 0 (epsilon_high too), got {cfg.epsilon}, {cfg.epsilon_high}")
    if cfg.loss_type == "cispo":
        if cfg.epsilon_high is None or not cfg.epsilon_high > 1:
            raise ValueError(f"epsilon_high: with loss_type 'cispo' it is the cap of the importance weight, expected "
                             f"a number > 1 (ScaleRL: 5.0), got {cfg.epsilon_high}")
        if cfg.importance_sampling_level != "token" or cfg.delta is not None:
            raise ValueError("loss_type: 'cispo' takes neither importance_sampling_level 'sequence' nor delta")
    high = 1.0 + (cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)
    if cfg.delta is not None and not cfg.delta > high:
        raise ValueError(f"delta: expected a number > 1 + epsilon_high = {high}, got {cfg.delta}")
    if cfg.rollout_is not in ROLLOUT_IS:
        raise ValueError(f"rollout_is: expected one of {ROLLOUT_IS}, got {cfg.rollout_is!r}")
    if cfg.rollout_is != "none" and cfg.old_logprobs == "sampler":
        raise ValueError("rollout_is: corrects the sampler's log-probs against the trainer's, so old_logprobs must "
                         "be 'recompute' or 'auto', not 'sampler'")


def gather_rows(x: Tensor, d: D.Dist) -> Tensor:
    """Every rank's `x` (the same shape on every rank) concatenated along dim 0, in rank order."""
    if not d.active:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class GRPOTrainer(RolloutTrainer):
    """GRPO / Dr. GRPO / DAPO / RLOO / REINFORCE++ on prompts, with rule rewards and/or a reward model.

    ``GRPOTrainer(config, policy=..., tokenizer=..., prompts=[{"prompt"}, ...], rules=[fn, ...],
    reward_model=..., evaluator=fn).train()``. ``policy`` defaults to ``config.model``, ``reward_model`` to
    ``config.reward_model`` (none: the rules alone score). ``fn(prompt, response) -> float``. With
    ``beta > 0`` the reference is a frozen copy of the starting policy, or with LoRA the policy with its
    adapter disabled; with ``beta == 0`` no reference is held or run.

    Under torchrun each rank generates for its share of the iteration's prompts; the advantages are computed
    from every rank's scores (batch scaling sees the whole batch) and the losses are normalised by global
    counts.
    """

    STAGE, DESC, POSTFIX = "grpo", "grpo", ("reward", "loss")

    def __init__(self, config: GRPOConfig, *, policy=None, reward_model=None, tokenizer=None,
                 prompts: list[dict] | None = None, rules: list[Callable[[str, str], float]] | None = None,
                 evaluator: Callable | None = None, progress: bool = True):
        cfg = self.config = config
        d = self.dist = D.setup(cfg.distributed, cfg.device, cfg.precision)
        self.device = d.device
        if cfg.advantage not in ADVANTAGE_MODES:
            raise ValueError(f"advantage: expected one of {ADVANTAGE_MODES}, got {cfg.advantage!r}")
        use_sampler_logprobs(cfg.old_logprobs, "fp32")  # checked before any model is loaded
        check_policy_options(cfg)
        if cfg.num_generations < 2:
            raise ValueError(f"num_generations: expected >= 2 (a group of one answer has no relative advantage), "
                             f"got {cfg.num_generations}")
        if not cfg.beta >= 0:
            raise ValueError(f"beta: expected >= 0, got {cfg.beta}")
        if cfg.num_iterations < 1:
            raise ValueError(f"num_iterations: expected >= 1, got {cfg.num_iterations}")
        per_step = cfg.prompts_per_step or cfg.prompts_per_iteration
        if per_step < 0 or per_step % d.world_size or per_step > cfg.prompts_per_iteration:
            raise ValueError(f"prompts_per_step: expected 0 or a multiple of the world size {d.world_size} up to "
                             f"prompts_per_iteration={cfg.prompts_per_iteration}, got {cfg.prompts_per_step}")
        self.groups_per_step = per_step // d.world_size
        tokenizer = C.given_or_loaded(
            tokenizer, cfg.model, "model: give GRPOConfig.model (the policy's path) or pass policy= and tokenizer=",
            lambda: C.load_tokenizer(cfg.model, cfg.trust_remote_code))
        policy = C.given_or_loaded(policy, cfg.model, "model: give GRPOConfig.model (the policy's path) or pass "
                                   "policy=", lambda: C.load_causal_lm(cfg.model, cfg.trust_remote_code))
        if reward_model is None and cfg.reward_model:
            reward_model = C.load_scalar_model(cfg.reward_model, cfg.trust_remote_code,
                                               pad_token_id=tokenizer.pad_token_id, seed=cfg.seed)
        self._setup_prompts(cfg, tokenizer, prompts, rules, cfg.num_generations)
        if reward_model is None and not self.rules:
            raise ValueError("reward_model: give GRPOConfig.reward_model, rule_rewards (or rules=), or both: the "
                             "answers need a score")
        policy = policy.to(self.device)
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta > 0 and not cfg.lora_r else None
        self.actor = D.prepare(policy, cfg, d, "CAUSAL_LM")
        self.actor_run = D.Engine(self.actor, d)
        self.ref_run = None if self.ref is None else D.Engine(self.ref, d, trainable=False)
        self.reward_model = None if reward_model is None else reward_model.to(self.device).eval().requires_grad_(False)
        self.rm_run = None if self.reward_model is None else D.Engine(self.reward_model, d, trainable=False)
        self.packing = resolve_packing(cfg.packing, self.actor)
        # the frozen decoder layers below the LoRA layers, shared by actor and reference: run once per rollout
        networks = [m for m in (self.actor, self.ref) if m is not None]
        self.trunk_depth = shared_depth(networks) if self.packing == "shared_prefix" and cfg.shared_trunk else 0
        self.optimizer = torch.optim.AdamW(self.actor_run.trainable_parameters(), lr=learning_rate(cfg, 1e-6, 2e-5),
                                           weight_decay=0.0)
        # with a rollout correction the ratio's old log-probs are the trainer's own, the sampler's are the weights'
        self.sampler_logprobs = cfg.rollout_is == "none" and use_sampler_logprobs(cfg.old_logprobs, d.precision)
        self.evaluator, self.progress = evaluator, progress
        self.step_count, self.total_steps = 0, cfg.iterations

    # -- rollout ---------------------------------------------------------------------------
    def _logprobs(self, run, ro: dict, adapter_off: bool = False) -> Tensor:
        fn = without_adapter(answer_logprobs) if adapter_off else answer_logprobs
        return run.no_grad(fn, ro["prompts"], ro["answers"], self.packing, self.tokenizer.pad_token_id, self.device,
                           self.config.temperature, ro.get("trunk") if self.packing == "shared_prefix" else None)

    @torch.no_grad()
    def scores(self, s, idx: list[int]) -> Tensor:
        """(B,) the score of each answer: reward model (at the answer's last token) + rule_reward_coef x rules."""
        total = torch.zeros(s.input_ids.shape[0], device=self.device)
        if self.rm_run is not None:
            total = total + self.rm_run.no_grad(last_token_scores, s)
        rules = self.rule_scores(s, idx)
        if rules is not None:
            total = total + self.config.rule_reward_coef * rules
        return total

    @torch.no_grad()
    def rollout(self, iteration: int) -> dict:
        """This rank's groups: prompts, K answers each, per-token old (and reference) log-probs in answer
        order, and the answers' advantages (from every rank's scores); statistics global."""
        cfg, d = self.config, self.dist
        k = cfg.num_generations
        idx, s = self.generate(iteration, self.sampler_logprobs or cfg.rollout_is != "none")
        ro = {"prompts": [self.prompt_ids[i] for i in idx],
              "answers": [s.responses[g * k:(g + 1) * k] for g in range(len(idx))]}
        mask = s.response_mask
        lengths = mask.sum(1)
        ro["lengths"] = lengths
        ro["offsets"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        ro["trunk"] = self.actor_run.no_grad(packed_trunk, ro["prompts"], ro["answers"], self.trunk_depth,
                                             self.device) if self.trunk_depth else None
        ro["old"] = s.logprobs[mask] if self.sampler_logprobs and s.logprobs is not None else \
            self._logprobs(self.actor_run, ro)
        ro["is_w"], is_stats = self._rollout_weights(ro["old"], s)
        ro["ref"] = None
        if cfg.beta > 0:
            ro["ref"] = self._logprobs(self.ref_run, ro) if self.ref_run is not None else \
                self._logprobs(self.actor_run, ro, adapter_off=True)
        score = self.scores(s, idx)
        scores = gather_rows(score.view(len(idx), k), d)                         # (all prompts, K)
        adv = rlhf_fast.group_advantages(scores, mode=cfg.advantage, scale=cfg.scale_rewards)
        ro["adv"] = adv.view(d.world_size, len(idx), k)[d.rank].reshape(-1)
        stopped = torch.tensor([len(r) > 0 and r[-1] in self.encoder.stop_ids for r in s.responses],
                               dtype=torch.float32)
        n_tok = d.sum(lengths.sum())[0]
        ro["stats"] = {"reward": float(scores.mean()), "reward_std": float(scores.std(1).mean()),
                       "frac_reward_zero_std": float((scores.max(1).values == scores.min(1).values).float().mean()),
                       "answer_len": n_tok / scores.numel(),
                       "clipped_ratio": 1.0 - d.sum(stopped.sum())[0] / scores.numel(), **is_stats}
        return ro

    def _rollout_weights(self, old: Tensor, s) -> tuple[Tensor | None, dict]:
        """(per-token rollout importance weights in answer order, or None without rollout_is; their statistics
        over every rank's tokens)."""
        cfg = self.config
        if cfg.rollout_is == "none":
            return None, {}
        mask = s.response_mask
        old_pad = torch.zeros(mask.shape, device=old.device).masked_scatter(mask, old)
        w, st = rlhf_fast.rollout_importance_weights(old_pad, s.logprobs.to(old.device), mask, mode=cfg.rollout_is,
                                                     clip_max=cfg.rollout_is_max, clip_min=cfg.rollout_is_min)
        n = mask.sum()
        sums = self.dist.sum(*(st[k] * n for k in ("weight_mean", "clipped_frac", "log_diff_mean")), n)
        total = max(1.0, sums[-1])
        return w[mask], {"rollout_is_weight": sums[0] / total, "rollout_is_clipped_frac": sums[1] / total,
                         "rollout_is_log_diff": sums[2] / total}

    # -- update ----------------------------------------------------------------------------
    def _rows(self, groups: list[int]) -> list[int]:
        k = self.config.num_generations
        return [g * k + j for g in groups for j in range(k)]

    def _loss(self, model, ro: dict, groups: list[int], n_tok: float, n_seq: float):
        cfg = self.config
        rows = self._rows(groups)
        prompts, answers = [ro["prompts"][g] for g in groups], [ro["answers"][g] for g in groups]
        trunk = ro["trunk"].select(groups, prompts, answers) \
            if ro.get("trunk") is not None and self.packing == "shared_prefix" else None
        h, labels, _ = answer_hidden(model, prompts, answers, self.packing, self.tokenizer.pad_token_id, self.device,
                                     trunk)
        off, lengths = ro["offsets"], ro["lengths"][rows]
        tok = torch.cat([torch.arange(int(off[r]), int(off[r + 1]), device=self.device) for r in rows])
        adv = ro["adv"][rows].repeat_interleave(lengths)
        if ro["is_w"] is not None:  # every policy loss is positively homogeneous in A: this weights its policy term
            adv = adv * ro["is_w"][tok]
        if cfg.loss_type == "grpo":        # each answer's token mean, averaged over the step's answers
            w = (1.0 / (lengths.float() * n_seq)).repeat_interleave(lengths)
        elif cfg.loss_type == "dr_grpo":   # token sum / (answers x generation budget)
            w = torch.full_like(adv, 1.0 / (n_seq * cfg.max_new_tokens))
        else:                              # bnpo / dapo: the step's token mean
            w = torch.full_like(adv, 1.0 / n_tok)
        weight, bias = C.lm_head_params(model)
        ref = None if ro["ref"] is None else ro["ref"][tok]
        if cfg.loss_type == "cispo" or cfg.importance_sampling_level == "sequence":
            return self._logprob_loss(h, weight, bias, labels, ro["old"][tok], adv, w, ref, lengths)
        return rlhf_fast.linear_ppo_loss(
            h[None], weight, labels[None], ro["old"][tok][None], adv[None], w[None],
            ref_logprobs=None if ref is None else ref[None], kl_coef=cfg.beta, kl_estimator="k3",
            clip_eps=cfg.epsilon, clip_eps_high=cfg.epsilon_high, dual_clip=cfg.delta, num_items=1.0,
            temperature=cfg.temperature, bias=bias)

    def _logprob_loss(self, h, weight, bias, labels, old, adv, w, ref, lengths):
        """CISPO and GSPO: their per-token gradient is not the fused head's (CISPO's weight multiplies log pi; GSPO's
        ratio is a mean over the answer), so the log-probs come first (:func:`rlhf_fast.linear_logprobs`, no logits
        held either) and :func:`rlhf_fast.ppo_policy_loss` takes them answer by answer: one more lm_head GEMM in the
        backward than the fused head."""
        cfg = self.config
        lp, entropy = rlhf_fast.linear_logprobs(h, weight, labels, bias=bias, temperature=cfg.temperature,
                                                return_entropy=True)
        pos = torch.arange(int(lengths.max()), device=lp.device)[None] < lengths[:, None]
        rows = lambda x: torch.zeros(pos.shape, dtype=x.dtype, device=x.device).masked_scatter(pos, x)
        cispo = cfg.loss_type == "cispo"
        loss, stats = rlhf_fast.ppo_policy_loss(
            rows(lp), rows(old), rows(adv), rows(w), clip_eps=cfg.epsilon,
            clip_eps_high=cfg.epsilon_high - 1.0 if cispo else cfg.epsilon_high, dual_clip=cfg.delta,
            num_items=1, objective="cispo" if cispo else "clip", ratio_level=cfg.importance_sampling_level)
        stats = dict(stats, entropy=entropy.detach().mean(), kl=torch.zeros(()))
        if ref is not None and cfg.beta > 0:
            kl = rlhf_fast.kl_penalty(lp, ref, estimator="k3")
            loss = loss + cfg.beta * (kl * w).sum()
            stats["kl"] = kl.detach().mean()
        return loss, stats

    def update(self, ro: dict, groups: list[int]) -> dict:
        """One optimizer step on this rank's `groups` of the rollout, in ``grad_accum`` micro-batches of whole
        groups; the loss is normalised by the step's answers / tokens over all ranks."""
        cfg, d = self.config, self.dist
        rows = self._rows(groups)
        n_tok, n_seq = d.sum(ro["lengths"][rows].sum(), len(rows))
        micro = D.micro_splits(len(groups), cfg.grad_accum)
        st = D.Stats()
        self.optimizer.zero_grad(set_to_none=True)
        for j, sl in enumerate(micro):
            with self.actor_run.sync(j == len(micro) - 1):
                loss, pst = self.actor_run(self._loss, ro, groups[sl], max(1.0, n_tok), max(1.0, n_seq))
                self.actor_run.backward(loss)
            n_here = float(ro["lengths"][self._rows(groups[sl])].sum())
            st.total("loss", loss.detach())
            for key in ("clip_frac", "approx_kl", "ratio_mean", "kl", "entropy"):
                st.add(key, pst[key], n_here)
        gnorm = C.clip_grad(self.actor_run.trainable_parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        out = st.reduce(d)
        out["grad_norm"] = gnorm
        return out

    def batch_at(self, step: int) -> int:
        return step

    def step(self, iteration: int | None = None) -> dict:
        """One iteration: rollout, then num_iterations passes over its groups, prompts_per_step at a time."""
        cfg = self.config
        it = self.step_count if iteration is None else iteration
        t0 = time.time()
        ro = self.rollout(it)
        t_roll = time.time() - t0
        n_groups = len(ro["prompts"])
        agg: dict[str, float] = {}
        n = 0
        for mu in range(cfg.num_iterations):
            g = torch.Generator().manual_seed(C.step_seed(cfg.seed, 4, it, mu))
            order = torch.randperm(n_groups, generator=g).tolist()
            for start in range(0, n_groups, self.groups_per_step):
                for key, v in self.update(ro, order[start: start + self.groups_per_step]).items():
                    agg[key] = agg.get(key, 0.0) + v
                n += 1
        stats = {key: v / max(1, n) for key, v in agg.items()}
        stats.update(ro["stats"])
        stats["rollout_s"], stats["step_s"] = t_roll, time.time() - t0
        self.step_count = it + 1
        return stats

    # -- checkpoints and export -------------------------------------------------------------
    def _ckpt(self):
        return {"actor": self.actor}, {"actor": self.optimizer}, {}

    def result_fields(self) -> dict:
        return {"iterations": self.step_count, "packing": self.packing}

    def save(self, path) -> None:
        """The policy's Hugging Face export (rank 0 writes; LoRA merged; a collective under FSDP)."""
        D.export_model(self.actor, self.tokenizer, path, self.dist, {"stage": "grpo", "config": vars(self.config)})
