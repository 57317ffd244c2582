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

Actor, critic, frozen reference and reward model are separate modules on one explicit device; losses
take ``num_items`` (the minibatch's answer tokens) so a data-parallel launcher can pass global counts.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline.config import PPOConfig
from rlhf_fast.pipeline.data import IGNORE, Encoder, load_prompts, load_ptx
from rlhf_fast.pipeline.generation import Samples, sample
from rlhf_fast.pipeline.sft import encode_lm


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


class PPOTrainer:
    """PPO-ptx on prompts with a reward model.

    ``PPOTrainer(config, policy=..., reward_model=..., tokenizer=..., prompts=[{"prompt"}, ...],
    ptx_data=[...], rules=[fn, ...], evaluator=fn).train()``. ``policy`` defaults to ``config.policy``
    (``AutoModelForCausalLM``), ``reward_model`` to ``config.reward_model``
    (``AutoModelForSequenceClassification``, one label); the reference is a frozen copy of the policy
    and the critic a trainable copy of the reward model. ``evaluator(policy) -> dict`` (optional) is
    called every ``eval_every`` iterations and its numbers are logged.
    """

    def __init__(self, config: PPOConfig, *, policy=None, reward_model=None, tokenizer=None,
                 prompts: list[dict] | None = None, ptx_data: list[dict] | None = None,
                 rules: list[Callable[[str, str], float]] | None = None,
                 evaluator: Callable | None = None, progress: bool = True):
        cfg = self.config = config
        self.device = C.resolve_device(cfg.device)
        if tokenizer is None:
            if not cfg.policy:
                raise ValueError("policy: give PPOConfig.policy (the SFT model's path) or pass policy= and tokenizer=")
            tokenizer = C.load_tokenizer(cfg.policy, cfg.trust_remote_code)
        if policy is None:
            if not cfg.policy:
                raise ValueError("policy: give PPOConfig.policy (the SFT model's path) or pass policy=")
            policy = C.load_causal_lm(cfg.policy, cfg.trust_remote_code)
        if reward_model is None:
            if not cfg.reward_model:
                raise ValueError("reward_model: give PPOConfig.reward_model (a path) or pass reward_model=")
            reward_model = C.load_scalar_model(cfg.reward_model, cfg.trust_remote_code,
                                               pad_token_id=tokenizer.pad_token_id)
        for name in ("temperature", "top_p", "clip_eps", "minibatch_size", "samples_per_prompt",
                     "prompts_per_iteration", "max_new_tokens"):
            if not getattr(cfg, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(cfg, name)}")
        self.tokenizer = tokenizer
        self.actor = policy.to(self.device)
        weight, bias = C.lm_head_params(self.actor)
        if bias is not None:
            raise ValueError("policy: an lm_head with a bias is not supported by linear_ppo_loss")
        self.ref = copy.deepcopy(self.actor).eval().requires_grad_(False)
        self.reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        self.critic = copy.deepcopy(self.reward_model).train().requires_grad_(True)
        self.rm_head, self.critic_head = C.scalar_head(self.reward_model), C.scalar_head(self.critic)
        if prompts is None:
            if not cfg.prompts:
                raise ValueError("prompts: give PPOConfig.prompts (a JSONL file) or pass prompts=")
            prompts = load_prompts(cfg.prompts)
        if not prompts:
            raise ValueError("prompts: no prompts")
        if ptx_data is None and cfg.ptx_data:
            ptx_data = load_ptx(cfg.ptx_data)
        self.prompts = prompts
        self.ptx_data = ptx_data or []
        self.rules = list(rules or []) + [load_rule(s) for s in cfg.rule_rewards]
        self.evaluator = evaluator
        self.progress = progress
        self.encoder = Encoder(tokenizer, cfg.max_prompt_len, cfg.max_new_tokens)
        self.ptx_encoder = Encoder(tokenizer, cfg.max_prompt_len, cfg.max_new_tokens + 2)
        self.prompt_ids = [self.encoder.prompt(p["prompt"], p.get("_where", "")) for p in prompts]
        self.actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.95),
                                            weight_decay=0.0)
        self.kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
        self.score_norm: tuple[float, float] | None = None
        self.iteration = 0

    # -- rollout ---------------------------------------------------------------------------
    def prompts_at(self, iteration: int) -> list[int]:
        g = torch.Generator().manual_seed(C.step_seed(self.config.seed, 1, iteration))
        n = len(self.prompts)
        k = self.config.prompts_per_iteration
        return torch.randperm(n, generator=g)[:k].tolist() if k <= n else torch.randint(n, (k,), generator=g).tolist()

    @torch.no_grad()
    def scores(self, s: Samples, prompt_texts: list[str]) -> tuple[Tensor, Tensor]:
        """(raw RM score + rule rewards (B,), the RM score alone (B,))."""
        h = C.hidden_states(self.reward_model, s.input_ids, s.attention_mask)
        rm = self.rm_head(h[torch.arange(h.shape[0], device=self.device), s.last_index]).squeeze(-1).float()
        total = rm.clone()
        if self.rules:
            texts = s.texts(self.tokenizer)
            extra = [sum(float(rule(prompt_texts[int(i)], t)) for rule in self.rules)
                     for i, t in zip(s.prompt_index.tolist(), texts, strict=True)]
            total = total + self.config.rule_reward_coef * torch.tensor(extra, device=self.device)
        return total, rm

    @torch.no_grad()
    def rollout(self, iteration: int) -> dict:
        cfg = self.config
        idx = self.prompts_at(iteration)
        prompt_ids = [self.prompt_ids[i] for i in idx]
        texts = [self.prompts[i]["prompt"] for i in idx]
        torch.manual_seed(C.step_seed(cfg.seed, 2, iteration))  # the sampling of this iteration
        s = sample(self.actor, prompt_ids, num_samples=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_p=cfg.top_p, pad_id=self.tokenizer.pad_token_id,
                   eos_id=self.tokenizer.eos_token_id, device=self.device)
        old_lp = C.token_logprobs(self.actor, s.input_ids, s.attention_mask, s.labels, cfg.temperature)
        ref_lp = C.token_logprobs(self.ref, s.input_ids, s.attention_mask, s.labels, cfg.temperature)
        values = values_of(self.critic, self.critic_head, s.input_ids, s.attention_mask)
        score, rm_score = self.scores(s, texts)
        if self.score_norm is None:  # the first rollout's answers set the scale of the reward
            self.score_norm = (float(score.mean()), float(score.std().clamp_min(1e-6)))
        mean, std = self.score_norm
        norm_score = (score - mean) / std
        if cfg.score_clip:
            norm_score = norm_score.clamp(-cfg.score_clip, cfg.score_clip)
        mask = s.response_mask
        kl = rlhf_fast.kl_penalty(old_lp, ref_lp, estimator="k1") * mask        # (B, T-1)
        rewards = -self.kl_ctl.beta * kl
        rows = torch.arange(rewards.shape[0], device=self.device)
        rewards[rows, s.last_index - 1] += norm_score
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                 whiten=cfg.whiten_advantages)
        n_tok = mask.sum().clamp_min(1)
        kl_token = float(kl.sum() / n_tok)
        return {"samples": s, "old_lp": old_lp, "ref_lp": ref_lp, "values": values, "adv": adv, "ret": ret,
                "stats": {"score": float(rm_score.mean()), "reward": float(score.mean()),
                          "norm_score": float(norm_score.mean()), "kl_per_token": kl_token,
                          "kl_per_answer": float(kl.sum(1).mean()), "beta": self.kl_ctl.beta,
                          "answer_len": float(mask.sum(1).float().mean()),
                          "value_mean": float((values * mask).sum() / n_tok)}}

    # -- update ----------------------------------------------------------------------------
    def ptx_batch(self, iteration: int, epoch: int, mb: int):
        if not self.ptx_data or self.config.ptx_coef == 0:
            return None
        g = torch.Generator().manual_seed(C.step_seed(self.config.seed, 3, iteration, epoch, mb))
        idx = torch.randint(len(self.ptx_data), (self.config.ptx_batch_size,), generator=g).tolist()
        return encode_lm(self.ptx_encoder, [self.ptx_data[i] for i in idx]).to(self.device)

    def update_minibatch(self, ro: dict, rows: Tensor, ptx) -> dict:
        """One actor step (linear_ppo_loss) and one critic step (value_loss) on rollout rows `rows`."""
        cfg = self.config
        s: Samples = ro["samples"]
        ids, attn = s.input_ids[rows], s.attention_mask[rows]
        mask, labels = s.response_mask[rows], s.labels[rows]
        num_items = mask.sum()
        weight, _ = C.lm_head_params(self.actor)
        hidden = C.hidden_states(self.actor, ids, attn)[:, :-1]
        ptx_hidden = ptx_labels = None
        if ptx is not None:
            ptx_hidden = C.hidden_states(self.actor, ptx.input_ids, ptx.attention_mask)[:, :-1]
            ptx_labels = ptx.labels
        loss, pst = rlhf_fast.linear_ppo_loss(
            hidden, weight, labels.clamp_min(0), ro["old_lp"][rows], ro["adv"][rows], mask,
            ref_logprobs=ro["ref_lp"][rows], kl_coef=0.0, entropy_coef=cfg.entropy_coef, clip_eps=cfg.clip_eps,
            num_items=num_items, ptx_hidden=ptx_hidden, ptx_labels=ptx_labels,
            ptx_coef=cfg.ptx_coef if ptx is not None else 0.0, temperature=cfg.temperature, ignore_index=IGNORE)
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        actor_gnorm = C.clip_grad(self.actor.parameters(), cfg.max_grad_norm)
        self.actor_opt.step()

        values = values_of(self.critic, self.critic_head, ids, attn)
        vloss, vst = rlhf_fast.value_loss(values, ro["values"][rows], ro["ret"][rows], mask,
                                          clip_eps=cfg.value_clip_eps, num_items=num_items)
        self.critic_opt.zero_grad(set_to_none=True)
        vloss.backward()
        critic_gnorm = C.clip_grad(self.critic.parameters(), cfg.max_grad_norm)
        self.critic_opt.step()
        out = {"loss": float(loss.detach()), "value_loss": float(vloss.detach()), "actor_grad_norm": actor_gnorm,
               "critic_grad_norm": critic_gnorm}
        out.update({k: float(v.detach()) for k, v in pst.items()})
        out["value_clip_frac"] = float(vst["clip_frac"])
        out["explained_variance"] = float(vst["explained_variance"])
        return out

    def step(self, iteration: int | None = None) -> dict:
        """One PPO iteration: rollout, then ppo_epochs x minibatch updates. Returns the logged statistics."""
        cfg = self.config
        it = self.iteration if iteration is None else iteration
        t0 = time.time()
        ro = self.rollout(it)
        t_roll = time.time() - t0
        b = ro["samples"].input_ids.shape[0]
        agg: dict[str, float] = {}
        n_mb = 0
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(C.step_seed(cfg.seed, 4, it, epoch))
            perm = torch.randperm(b, generator=g).to(self.device)
            for mb, start in enumerate(range(0, b, cfg.minibatch_size)):
                st = self.update_minibatch(ro, perm[start: start + cfg.minibatch_size], self.ptx_batch(it, epoch, mb))
                for k, v in st.items():
                    agg[k] = agg.get(k, 0.0) + v
                n_mb += 1
        stats = {k: v / max(1, n_mb) for k, v in agg.items()}
        stats.update(ro["stats"])
        self.kl_ctl.update(ro["stats"]["kl_per_token"], b)
        stats["rollout_s"], stats["step_s"] = t_roll, time.time() - t0
        self.iteration = it + 1
        return stats

    # -- loop ------------------------------------------------------------------------------
    def _ckpt(self):
        return ({"actor": self.actor, "critic": self.critic},
                {"actor": self.actor_opt, "critic": self.critic_opt}, {})

    def _state(self, done=False):
        return {"step": self.iteration, "beta": self.kl_ctl.beta,
                "score_norm": list(self.score_norm) if self.score_norm else None, "done": done}

    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = C.MetricsLog(out, "ppo")
        if cfg.resume:
            st = C.load_checkpoint(out, *self._ckpt())
            if st is not None:
                self.iteration, self.kl_ctl.beta = st["step"], st["beta"]
                self.score_norm = tuple(st["score_norm"]) if st["score_norm"] else None
                log.truncate_after(self.iteration)
        t0 = time.time()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="ppo", disable=not self.progress,
                   dynamic_ncols=True)
        while self.iteration < cfg.iterations:
            stats = self.step()
            if self.evaluator is not None and cfg.eval_every and (self.iteration % cfg.eval_every == 0):
                stats.update(self.evaluator(self.actor))
            bar.update(1)
            if self.iteration % cfg.log_every == 0 or self.iteration == cfg.iterations:
                log.log(self.iteration, **stats)
            bar.set_postfix(score=f"{stats['score']:.2f}", kl=f"{stats['kl_per_token']:.3f}")
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0 \
                    and self.iteration < cfg.iterations:
                C.save_checkpoint(out, *self._ckpt(), self._state())
        bar.close()
        log.close()
        self.save(out)
        C.save_checkpoint(out, *self._ckpt(), self._state(done=True))
        return {"iterations": self.iteration, "train_time_s": time.time() - t0, "beta": self.kl_ctl.beta}

    def save(self, out) -> None:
        out = Path(out)
        C.save_model(self.actor, self.tokenizer, out / "model", {"stage": "ppo", "config": vars(self.config)})
        C.save_model(self.critic, self.tokenizer, out / "critic", {"stage": "ppo-critic"})
