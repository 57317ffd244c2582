"""PPO-ptx: the InstructGPT RL stage.

Per iteration: sample prompts, generate ``samples_per_prompt`` answers each with the actor
(``generate``: sampling, temperature, top-p, KV cache); score them with the frozen reward model at the
last answer token (+ optional rule rewards), normalised by the mean/std of the scores of the first
rollout (the SFT policy's answers); shape per-token rewards ``-beta * (log pi - log pi_SFT)`` with the
score added on the last token (beta fixed or adapted towards ``kl_target``); advantages and returns by
:func:`rlhf_fast.gae`; then ``ppo_epochs`` passes of minibatch updates:

  actor   :func:`rlhf_fast.linear_ppo_loss` — clipped-ratio policy loss, entropy bonus and
          ``ptx_coef`` x the ptx negative log-likelihood, straight from the lm_head, in one backward pass
  critic  :func:`rlhf_fast.value_loss` — clipped value loss; the critic is the reward model's network
          with its scalar head read at every position

With ``packing="shared_prefix"`` (the default) both updates run each prompt packed with its
``samples_per_prompt`` answers (:func:`rlhf_fast.pipeline.rl.answer_hidden`: the prompt computed once per group),
minibatches and micro-batches holding whole groups; ``"padded"`` runs one left-padded row per answer.

Actor, critic, frozen reference and reward model are separate modules on one explicit device (with LoRA,
the reference and the reward model are the actor and the critic with their adapters disabled). Under
torchrun each rank generates for its share of the prompts; losses take ``num_items`` = the minibatch's
answer tokens over all ranks, and the advantages are whitened with all-reduced statistics.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline.chat import Encoder
from rlhf_fast.pipeline.config import PPOConfig, learning_rate
from rlhf_fast.pipeline.data import IGNORE, load_ptx
from rlhf_fast.pipeline.generation import Samples
from rlhf_fast.pipeline.reward import score_answers
from rlhf_fast.pipeline.rl import (
    RolloutTrainer,
    answer_hidden,
    answer_logprobs,
    last_token_scores,
    load_rule,
    resolve_packing,
    use_sampler_logprobs,
    without_adapter,
)
from rlhf_fast.pipeline.sft import encode_lm
from rlhf_fast.pipeline.trunk import packed_trunk, shared_depth, top_hidden

__all__ = ["AdaptiveKL", "PPOTrainer", "load_rule", "values_of"]


class AdaptiveKL:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019), per token."""

    def __init__(self, beta: float, target: float, horizon: int, adaptive: bool):
        self.beta, self.target, self.horizon, self.adaptive = float(beta), float(target), int(horizon), adaptive

    def update(self, kl: float, n: int) -> None:
        if self.adaptive and self.target > 0:
            err = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.beta *= 1.0 + err * n / self.horizon


def values_of(critic, head, input_ids, attention_mask) -> Tensor:
    """(B, T-1) critic values at the positions that predict the next token."""
    h = C.hidden_states(critic, input_ids, attention_mask)[:, :-1]
    return head(h).squeeze(-1).float()


class PPOTrainer(RolloutTrainer):
    """PPO-ptx on prompts with a reward model.

    ``PPOTrainer(config, policy=..., reward_model=..., tokenizer=..., prompts=[{"prompt"}, ...],
    ptx_data=[...], rules=[fn, ...], evaluator=fn).train()``. ``policy`` defaults to ``config.policy``
    (``AutoModelForCausalLM``), ``reward_model`` to ``config.reward_model``
    (``AutoModelForSequenceClassification``, one label); the reference is a frozen copy of the policy
    and the critic a trainable copy of the reward model. ``evaluator(policy) -> dict`` (optional) is
    called every ``eval_every`` iterations and its numbers are logged.

    With ``lora_r > 0`` actor and critic are peft LoRA models: the reference log-probs come from the actor
    with its adapter disabled and the reward model's scores from the critic with its adapter disabled, so
    each network is held once (``ref`` and ``reward_model`` are None).

    Under torchrun each rank generates for rows ``r::world_size`` of the iteration's prompts, scores and
    updates on its own answers; the reward normalisation, advantage whitening, KL statistics and every
    loss's ``num_items`` are global (all-reduced), so they do not depend on the world size.

    The step loop, resume, logging and checkpoints are :class:`~rlhf_fast.pipeline.trainer.Trainer`'s; one
    step is one iteration (rollout, then ``ppo_epochs`` passes of minibatch updates).
    """

    STAGE, DESC, POSTFIX = "ppo", "ppo", ("score", "kl_per_token")

    def __init__(self, config: PPOConfig, *, policy=None, reward_model=None, tokenizer=None,
                 prompts: list[dict] | None = None, ptx_data: list[dict] | None = None,
                 rules: list[Callable[[str, str], float]] | None = None,
                 evaluator: Callable | None = None, progress: bool = True):
        cfg = self.config = config
        d = self.dist = D.setup(cfg.distributed, cfg.device, cfg.precision)
        self.device = d.device
        tokenizer = C.given_or_loaded(
            tokenizer, cfg.policy,
            "policy: give PPOConfig.policy (the SFT model's path) or pass policy= and tokenizer=",
            lambda: C.load_tokenizer(cfg.policy, cfg.trust_remote_code))
        policy = C.given_or_loaded(policy, cfg.policy, "policy: give PPOConfig.policy (the SFT model's path) or pass "
                                   "policy=", lambda: C.load_causal_lm(cfg.policy, cfg.trust_remote_code))
        reward_model = C.given_or_loaded(
            reward_model, cfg.reward_model, "reward_model: give PPOConfig.reward_model (a path) or pass reward_model=",
            lambda: C.load_scalar_model(cfg.reward_model, cfg.trust_remote_code, pad_token_id=tokenizer.pad_token_id,
                                        seed=cfg.seed))
        use_sampler_logprobs(cfg.old_logprobs, "fp32")  # checked before any model is loaded
        for name in ("clip_eps", "minibatch_size", "samples_per_prompt"):
            if not getattr(cfg, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(cfg, name)}")
        self._setup_prompts(cfg, tokenizer, prompts, rules, cfg.samples_per_prompt)
        policy = policy.to(self.device)
        reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        if cfg.lora_r:
            # one copy of each network: reference = actor without its adapter, reward model = critic without
            self.ref, self.reward_model = None, None
            self.actor = D.prepare(policy, cfg, d, "CAUSAL_LM")
            self.critic = D.prepare(reward_model, cfg, d, "SEQ_CLS").train()
        else:
            self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
            self.reward_model = reward_model
            self.actor = D.prepare(policy, cfg, d)
            self.critic = D.prepare(copy.deepcopy(reward_model).train().requires_grad_(True), cfg, d)
        self.actor_run = D.Engine(self.actor, d)
        self.critic_run = D.Engine(self.critic, d)
        self.ref_run = None if self.ref is None else D.Engine(self.ref, d, trainable=False)
        self.rm_run = None if self.reward_model is None else D.Engine(self.reward_model, d, trainable=False)
        self.rm_head = None if self.reward_model is None else C.scalar_head(self.reward_model)
        self.critic_head = C.scalar_head(self.critic)
        packing = resolve_packing(cfg.packing, self.actor)
        self.packing = resolve_packing(packing, self.critic) if packing == "shared_prefix" else packing
        # the frozen decoder layers every network shares (LoRA in the top layers only): run once per rollout
        networks = [m for m in (self.actor, self.critic, self.ref, self.reward_model) if m is not None]
        self.trunk_depth = shared_depth(networks) if self.packing == "shared_prefix" and cfg.shared_trunk else 0
        if ptx_data is None and cfg.ptx_data:
            ptx_data = load_ptx(cfg.ptx_data, lazy=cfg.data_lazy)
        self.ptx_data = ptx_data or []
        if self.ptx_data and cfg.ptx_coef != 0:
            D.check_batch("ptx_batch_size", cfg.ptx_batch_size, d, cfg.grad_accum)
        self.evaluator = evaluator
        self.progress = progress
        self.ptx_encoder = Encoder(tokenizer, cfg.max_prompt_len, cfg.max_new_tokens + 2, cfg.chat_template)
        self.actor_opt = torch.optim.AdamW(self.actor_run.trainable_parameters(), lr=learning_rate(cfg, 1e-6, 2e-5),
                                           betas=(0.9, 0.95), weight_decay=0.0)
        critic_lr = cfg.critic_lr if cfg.critic_lr is not None else (1e-4 if cfg.lora_r else 1e-5)
        self.critic_opt = torch.optim.AdamW(self.critic_run.trainable_parameters(), lr=critic_lr,
                                            betas=(0.9, 0.95), weight_decay=0.0)
        self.kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
        self.score_norm: tuple[float, float] | None = None
        self.step_count, self.total_steps = 0, cfg.iterations
        self.sampler_logprobs = use_sampler_logprobs(cfg.old_logprobs, d.precision)

    # -- rollout ---------------------------------------------------------------------------
    def ref_logprobs(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """(B, T-1) log-probs of the reference policy: the frozen SFT copy, or with LoRA the actor with its
        adapter disabled."""
        t = self.config.temperature
        if self.ref_run is not None:
            return self.ref_run.no_grad(C.token_logprobs, input_ids, attention_mask, labels, t)
        return self.actor_run.no_grad(without_adapter(C.token_logprobs), input_ids, attention_mask, labels, t)

    @torch.no_grad()
    def scores(self, s: Samples, idx: list[int], rm: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(raw RM score + rule rewards (B,), the RM score alone (B,)); `rm`: the RM scores when already
        computed."""
        if rm is None:
            rm = self.rm_run.no_grad(last_token_scores, s) if self.rm_run is not None else \
                self.critic_run.no_grad(without_adapter(last_token_scores), s)
        rules = self.rule_scores(s, idx)
        total = rm.clone() if rules is None else rm + self.config.rule_reward_coef * rules
        return total, rm

    @torch.no_grad()
    def _packed_scoring(self, s: Samples, idx: list[int]):
        """(old and reference log-probs, critic values: (B, T-1) in the samples' layout, 0 off the answers;
        RM scores (B,); the frozen trunk's output or None) with each prompt packed with its answers: one
        forward per network in which the prompt is computed once for its samples_per_prompt answers, and the
        lm_head, the value head and the reward head read only the positions they score (the padded forwards
        of the samples' rectangle compute every prompt K times, and the padding). With a shared frozen trunk
        (:mod:`rlhf_fast.pipeline.trunk`) its layers run once for all the networks, and the update starts
        from its output too."""
        cfg, k, pad = self.config, self.num_samples, self.tokenizer.pad_token_id
        prompts = [self.prompt_ids[i] for i in idx]
        answers = [s.responses[g * k:(g + 1) * k] for g in range(len(idx))]
        mask = s.response_mask
        trunk = None
        if self.trunk_depth:
            trunk = self.actor_run.no_grad(packed_trunk, prompts, answers, self.trunk_depth, self.device)
        packed = (prompts, answers, "shared_prefix", pad, self.device)

        def padded(flat: Tensor) -> Tensor:   # answer by answer, token by token = the mask's row-major order
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, flat.float())

        def logprobs(model):
            return answer_logprobs(model, *packed, cfg.temperature, trunk)

        def values(model):
            return C.scalar_head(model)(answer_hidden(model, *packed, trunk)[0]).squeeze(-1).float()

        def rm_scores(model):
            if trunk is None:
                return score_answers(model, prompts, answers, "shared_prefix", pad, self.device)
            h = top_hidden(model, trunk)[trunk.layout.last_token_index]
            return C.scalar_head(model)(h).squeeze(-1).float()

        old = s.logprobs if self.sampler_logprobs and s.logprobs is not None else \
            padded(self.actor_run.no_grad(logprobs))
        ref = padded(self.ref_run.no_grad(logprobs) if self.ref_run is not None else
                     self.actor_run.no_grad(without_adapter(logprobs)))
        vals = padded(self.critic_run.no_grad(values))
        rm = self.rm_run.no_grad(rm_scores) if self.rm_run is not None else \
            self.critic_run.no_grad(without_adapter(rm_scores))
        return old, ref, vals, rm.float(), trunk

    @torch.no_grad()
    def rollout(self, iteration: int) -> dict:
        """This rank's answers to its share of the iteration's prompts, with old / reference log-probs,
        values, shaped rewards, GAE advantages (whitened over all ranks) and returns; statistics global."""
        cfg, d = self.config, self.dist
        t0 = time.time()
        idx, s = self.generate(iteration, self.sampler_logprobs)
        sample_s = time.time() - t0
        if self.packing == "shared_prefix":
            old_lp, ref_lp, values, rm_score, trunk = self._packed_scoring(s, idx)
        else:
            old_lp = s.logprobs if self.sampler_logprobs and s.logprobs is not None else \
                self.actor_run.no_grad(C.token_logprobs, s.input_ids, s.attention_mask, s.labels, cfg.temperature)
            ref_lp = self.ref_logprobs(s.input_ids, s.attention_mask, s.labels)
            values = self.critic_run.no_grad(
                lambda m: values_of(m, C.scalar_head(m), s.input_ids, s.attention_mask))
            rm_score = trunk = None
        score, rm_score = self.scores(s, idx, rm_score)
        if self.score_norm is None:  # the first rollout's answers (all ranks) set the scale of the reward
            mean, std, _ = D.global_mean_std(score, d)
            self.score_norm = (mean, max(std, 1e-6))
        mean, std = self.score_norm
        norm_score = (score - mean) / std
        if cfg.score_clip:
            norm_score = norm_score.clamp(-cfg.score_clip, cfg.score_clip)
        mask = s.response_mask
        kl = rlhf_fast.kl_penalty(old_lp, ref_lp, estimator="k1") * mask        # (B, T-1)
        rewards = -self.kl_ctl.beta * kl
        rows = torch.arange(rewards.shape[0], device=self.device)
        rewards[rows, s.last_index - 1] += norm_score
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:  # over every rank's tokens: the same numbers at any world size
            adv = D.masked_whiten(adv, mask, d)
        n_rows, n_tok, s_rm, s_score, s_norm, s_kl, s_value = d.sum(
            rows.numel(), mask.sum(), rm_score.sum(), score.sum(), norm_score.sum(), kl.sum(),
            (values * mask).sum())
        lengths = mask.sum(1)
        flat = {"old": old_lp[mask], "ref": ref_lp[mask], "adv": adv[mask], "values": values[mask],
                "ret": ret[mask], "offsets": torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]),
                "prompts": [self.prompt_ids[i] for i in idx]}  # per answer token, answer by answer
        return {"samples": s, "old_lp": old_lp, "ref_lp": ref_lp, "values": values, "rewards": rewards,
                "adv": adv, "ret": ret, "rows": int(n_rows), "flat": flat, "trunk": trunk,
                "stats": {"score": s_rm / n_rows, "reward": s_score / n_rows, "norm_score": s_norm / n_rows,
                          "kl_per_token": s_kl / max(1.0, n_tok), "kl_per_answer": s_kl / n_rows,
                          "beta": self.kl_ctl.beta, "answer_len": n_tok / n_rows,
                          "value_mean": s_value / max(1.0, n_tok), "sample_s": sample_s}}

    # -- update ----------------------------------------------------------------------------
    def ptx_batch(self, iteration: int, epoch: int, mb: int):
        """This rank's share of the global ptx batch of a minibatch (None without ptx)."""
        if not self.ptx_data or self.config.ptx_coef == 0:
            return None
        g = torch.Generator().manual_seed(C.step_seed(self.config.seed, 3, iteration, epoch, mb))
        idx = torch.randint(len(self.ptx_data), (self.config.ptx_batch_size,), generator=g).tolist()
        return encode_lm(self.ptx_encoder, [self.ptx_data[i] for i in D.shard(idx, self.dist)]).to(self.device)

    def _packed(self, model, ro: dict, rows: Tensor):
        """(hidden (1, N, H), labels (1, N), token index (N,)) of whole groups `rows` (consecutive rows of
        each group), each prompt packed with its answers: computed once for its samples_per_prompt answers."""
        k = self.config.samples_per_prompt
        s: Samples = ro["samples"]
        groups = (rows.view(-1, k)[:, 0] // k).tolist()
        prompts = [ro["flat"]["prompts"][g] for g in groups]
        answers = [s.responses[g * k:(g + 1) * k] for g in groups]
        trunk = ro["trunk"].select(groups, prompts, answers) if ro.get("trunk") is not None else None
        h, labels, _ = answer_hidden(model, prompts, answers, "shared_prefix", self.tokenizer.pad_token_id,
                                     self.device, trunk)
        off = ro["flat"]["offsets"]
        tok = torch.cat([torch.arange(int(off[r]), int(off[r + 1]), device=self.device) for r in rows.tolist()])
        return h[None], labels[None], tok

    def _actor_loss(self, model, ro: dict, rows: Tensor, ptx, num_items: int, ptx_coef: float):
        cfg = self.config
        s: Samples = ro["samples"]
        weight, bias = C.lm_head_params(model)
        if self.packing == "shared_prefix":
            hidden, labels, tok = self._packed(model, ro, rows)
            f = ro["flat"]
            old, adv, ref = f["old"][tok][None], f["adv"][tok][None], f["ref"][tok][None]
            mask = torch.ones_like(old, dtype=torch.bool)
        else:
            ids, attn = s.input_ids[rows], s.attention_mask[rows]
            mask, labels = s.response_mask[rows], s.labels[rows]
            old, adv, ref = ro["old_lp"][rows], ro["adv"][rows], ro["ref_lp"][rows]
            hidden = C.hidden_states(model, ids, attn)[:, :-1]
        ptx_hidden = ptx_labels = None
        if ptx is not None:
            ptx_hidden = C.hidden_states(model, ptx.input_ids, ptx.attention_mask)[:, :-1]
            ptx_labels = ptx.labels
        return rlhf_fast.linear_ppo_loss(
            hidden, weight, labels.clamp_min(0), old, adv, mask, ref_logprobs=ref, kl_coef=0.0,
            entropy_coef=cfg.entropy_coef, clip_eps=cfg.clip_eps,
            num_items=num_items, ptx_hidden=ptx_hidden, ptx_labels=ptx_labels,
            ptx_coef=ptx_coef if ptx is not None else 0.0, temperature=cfg.temperature, ignore_index=IGNORE,
            bias=bias)

    def _critic_loss(self, model, ro: dict, rows: Tensor, num_items: int):
        s: Samples = ro["samples"]
        if self.packing == "shared_prefix":
            hidden, _, tok = self._packed(model, ro, rows)
            f = ro["flat"]
            values = C.scalar_head(model)(hidden).squeeze(-1).float()
            return rlhf_fast.value_loss(values, f["values"][tok][None], f["ret"][tok][None],
                                        torch.ones_like(values, dtype=torch.bool),
                                        clip_eps=self.config.value_clip_eps, num_items=num_items)
        values = values_of(model, C.scalar_head(model), s.input_ids[rows], s.attention_mask[rows])
        return rlhf_fast.value_loss(values, ro["values"][rows], ro["ret"][rows], s.response_mask[rows],
                                    clip_eps=self.config.value_clip_eps, num_items=num_items)

    def update_minibatch(self, ro: dict, rows: Tensor, ptx) -> dict:
        """One actor step (linear_ppo_loss) and one critic step (value_loss) on this rank's rollout rows
        `rows` and ptx batch `ptx`, each in ``grad_accum`` micro-batches; the losses are normalised by the
        minibatch's answer tokens over all ranks (the ptx term by its ptx tokens over all ranks)."""
        cfg, d = self.config, self.dist
        s: Samples = ro["samples"]
        tok = s.response_mask[rows].sum(1)                                     # answer tokens per row
        unit = cfg.samples_per_prompt if self.packing == "shared_prefix" else 1  # packed: whole groups
        micro = [slice(m.start * unit, m.stop * unit) for m in D.micro_splits(rows.numel() // unit, cfg.grad_accum)]
        whole = len(micro) == 1
        n_tok, n_ptx = d.sum(tok.sum(), 0 if ptx is None else ptx.num_tokens)
        n_tok = int(n_tok)
        ptx_parts = None if ptx is None else D.micro_splits(len(ptx), len(micro))
        st = D.Stats()

        self.actor_opt.zero_grad(set_to_none=True)
        for j, sl in enumerate(micro):
            r = rows if whole else rows[sl]
            p = None if ptx is None else (ptx if whole else ptx.rows(ptx_parts[j]))
            share = 0.0 if p is None else p.num_tokens / max(1.0, n_ptx)      # 1.0 for one whole batch
            with self.actor_run.sync(j == len(micro) - 1):
                loss, pst = self.actor_run(self._actor_loss, ro, r, p, n_tok, cfg.ptx_coef * share)
                self.actor_run.backward(loss)
            n_here = float(tok[sl].sum())
            st.total("loss", loss.detach())
            st.total("policy_loss", pst["policy_loss"])
            for k in ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "kl", "entropy"):
                st.add(k, pst[k], n_here)
            # (every rank adds every name: the all-reduces of Stats.reduce line up)
            st.low("ratio_min", pst["ratio_min"] if n_here > 0 else float("inf"))
            st.high("ratio_max", pst["ratio_max"] if n_here > 0 else float("-inf"))
            st.add("ptx_loss", pst["ptx_loss"], 0 if p is None else p.num_tokens)
        actor_gnorm = C.clip_grad(self.actor_run.trainable_parameters(), cfg.max_grad_norm)
        self.actor_opt.step()

        self.critic_opt.zero_grad(set_to_none=True)
        for j, sl in enumerate(micro):
            r = rows if whole else rows[sl]
            with self.critic_run.sync(j == len(micro) - 1):
                vloss, vst = self.critic_run(self._critic_loss, ro, r, n_tok)
                self.critic_run.backward(vloss)
            n_here = float(tok[sl].sum())
            st.total("value_loss", vloss.detach())
            st.add("value_clip_frac", vst["clip_frac"], n_here)
            st.add("explained_variance", vst["explained_variance"], n_here)  # per-part, token-weighted
        critic_gnorm = C.clip_grad(self.critic_run.trainable_parameters(), cfg.max_grad_norm)
        self.critic_opt.step()
        out = st.reduce(d)
        out["actor_grad_norm"], out["critic_grad_norm"] = actor_gnorm, critic_gnorm
        return out

    def batch_at(self, step: int) -> int:
        return step

    def step(self, iteration: int | None = None) -> dict:
        """One PPO iteration: rollout, then ppo_epochs x minibatch updates. Returns the logged statistics.

        Each rank splits its rollout rows into minibatches of ``ceil(minibatch_size / world_size)`` rows
        (every rank has as many rows, so as many minibatches). Packed (``packing="shared_prefix"``), a
        minibatch holds whole groups (a prompt's samples_per_prompt answers; at least one group)."""
        cfg, d = self.config, self.dist
        it = self.step_count if iteration is None else iteration
        t0 = time.time()
        ro = self.rollout(it)
        t_roll = time.time() - t0
        b = ro["samples"].input_ids.shape[0]
        chunk = -(-cfg.minibatch_size // d.world_size)
        agg: dict[str, float] = {}
        n_mb = 0
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(C.step_seed(cfg.seed, 4, it, epoch))
            if self.packing == "shared_prefix":  # whole groups, in a random order
                k = cfg.samples_per_prompt
                perm = (torch.randperm(b // k, generator=g)[:, None] * k + torch.arange(k)).reshape(-1)
                chunk = max(1, chunk // k) * k
            else:
                perm = torch.randperm(b, generator=g)
            perm = perm.to(self.device)
            for mb, start in enumerate(range(0, b, chunk)):
                st = self.update_minibatch(ro, perm[start: start + chunk], self.ptx_batch(it, epoch, mb))
                for k, v in st.items():
                    agg[k] = agg.get(k, 0.0) + v
                n_mb += 1
        stats = {k: v / max(1, n_mb) for k, v in agg.items()}
        stats.update(ro["stats"])
        self.kl_ctl.update(ro["stats"]["kl_per_token"], ro["rows"])
        stats["rollout_s"], stats["step_s"] = t_roll, time.time() - t0
        self.step_count = it + 1
        return stats

    # -- loop ------------------------------------------------------------------------------
    def _ckpt(self):
        return ({"actor": self.actor, "critic": self.critic},
                {"actor": self.actor_opt, "critic": self.critic_opt}, {})

    def state(self, done: bool = False) -> dict:
        return {"step": self.step_count, "beta": self.kl_ctl.beta,
                "score_norm": list(self.score_norm) if self.score_norm else None, "done": done}

    def load_state(self, st: dict) -> None:
        self.step_count, self.kl_ctl.beta = st["step"], st["beta"]
        self.score_norm = tuple(st["score_norm"]) if st["score_norm"] else None

    def result_fields(self) -> dict:
        return {"iterations": self.step_count, "beta": self.kl_ctl.beta}

    def export(self, out: Path) -> None:
        self.save(out)

    def save(self, out) -> None:
        """Hugging Face exports of the policy (``out/model``) and the critic (``out/critic``): rank 0 writes,
        LoRA adapters merged; a collective under FSDP."""
        out = Path(out)
        D.export_model(self.actor, self.tokenizer, out / "model", self.dist,
                       {"stage": "ppo", "config": vars(self.config)})
        D.export_model(self.critic, self.tokenizer, out / "critic", self.dist, {"stage": "ppo-critic"})
