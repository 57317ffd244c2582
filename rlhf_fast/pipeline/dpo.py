"""DPO and its variants (IPO, SLiC hinge, robust DPO, length-normalised DPO) on preference pairs, with
:func:`rlhf_fast.dpo_loss`.

The reference is the model the stage starts from: its sequence log-probs of every pair are computed once,
before the first step, from the model as given (with LoRA the adapter starts at zero, so that is the model
with its adapter disabled), and no second model is held. With ``packing="shared_prefix"`` a pair runs as
one packed sequence ``[prompt, chosen, rejected]`` (the prompt computed once for both answers, forward and
backward); "padded" runs ``[prompt, chosen]`` and ``[prompt, rejected]`` as rows of one batch. The token
log-probs come straight from the lm_head (:func:`rlhf_fast.linear_logprobs`: no logits are held).

Preference rows give one pair each; a ranked row ``{prompt, responses, ranking}`` gives every strictly
ordered pair of its ranking (tied answers make no pair; a row whose answers are all tied gives none, and is
counted in the result as ``rows_without_pair``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline import trainer as T
from rlhf_fast.pipeline.chat import Encoder
from rlhf_fast.pipeline.config import DPOConfig, data_options, learning_rate
from rlhf_fast.pipeline.data import load_ranked
from rlhf_fast.pipeline.rl import answer_hidden, resolve_packing
from rlhf_fast.reference import DPO_LOSS_TYPES

_KEEP = ("system", "chat_template_kwargs", "_where")


def preference_pairs(rows: list[dict]) -> tuple[list[dict], int]:
    """({prompt, chosen, rejected, ...} pairs, rows without a strictly ordered pair) of ranked rows
    (preference rows are ranked rows of K = 2)."""
    pairs, without = [], 0
    for r in rows:
        resp, ranks = r["responses"], r["ranking"]
        found = [(i, j) for i in range(len(resp)) for j in range(len(resp)) if ranks[i] < ranks[j]]
        if not found:
            without += 1
        for i, j in found:
            pairs.append({"prompt": r["prompt"], "chosen": resp[i], "rejected": resp[j],
                          **{k: r[k] for k in _KEEP if k in r}})
    return pairs, without


def encode_pairs(encoder: Encoder, pairs: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    out = []
    for p in pairs:
        where = p.get("_where", "")
        prompt = encoder.prompt(p["prompt"], where, p.get("system"), p.get("chat_template_kwargs"))
        out.append((prompt, encoder.response(p["chosen"], where), encoder.response(p["rejected"], where)))
    return out


def pair_logprobs(model, batch, packing: str, pad_id: int, device) -> tuple[Tensor, Tensor]:
    """(chosen (P,), rejected (P,)) fp32 summed log-probs of each pair's answers under `model`."""
    h, labels, answer_of = answer_hidden(model, [b[0] for b in batch], [[b[1], b[2]] for b in batch], packing,
                                         pad_id, device)
    weight, bias = C.lm_head_params(model)
    lp = rlhf_fast.linear_logprobs(h, weight, labels, bias=bias)
    sums = torch.zeros(2 * len(batch), device=lp.device, dtype=lp.dtype).index_add(0, answer_of, lp)
    return sums[0::2], sums[1::2]


class DPOTrainer(T.OneModelTrainer):
    """Trains a causal LM on preference pairs with the DPO family of losses.

    ``DPOTrainer(config, model=..., tokenizer=..., train_data=[{"prompt", "responses", "ranking"}, ...])``:
    rows as :func:`rlhf_fast.pipeline.data.load_ranked` returns them (preference pairs are rankings of two);
    ``train_data`` defaults to ``config.data``. Under torchrun each rank takes rows ``r::world_size`` of the
    global batch; each micro-batch's mean loss is weighted by its share of the global batch's pairs.
    """

    STAGE, DESC, POSTFIX = "dpo", "dpo", ("loss", "reward_accuracy")

    def __init__(self, config: DPOConfig, *, model=None, tokenizer=None, train_data: list[dict] | None = None,
                 eval_data: list[dict] | None = None, progress: bool = True):
        if config.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {config.loss_type!r}")
        self.config = config
        self.dist = D.setup(config.distributed, config.device, config.precision)
        self.device = self.dist.device
        tokenizer = C.given_or_loaded(
            tokenizer, config.model, "model: give DPOConfig.model (the SFT model's path) or pass model= and "
            "tokenizer=", lambda: C.load_tokenizer(config.model, config.trust_remote_code))
        model = C.given_or_loaded(model, config.model, "model: give DPOConfig.model (the SFT model's path) or pass "
                                  "model=", lambda: C.load_causal_lm(config.model, config.trust_remote_code))
        self.model, self.tokenizer = D.prepare(model.to(self.device), config, self.dist, "CAUSAL_LM"), tokenizer
        self.engine = D.Engine(self.model, self.dist)
        self.packing = resolve_packing(config.packing, self.model)
        rows = C.given_or_loaded(train_data, config.data, "data: give DPOConfig.data (preference data) or pass "
                                 "train_data=", lambda: load_ranked(config.data, **data_options(config)))
        pairs, self.rows_without_pair = preference_pairs(rows)
        if self.rows_without_pair:
            warnings.warn(f"data: {self.rows_without_pair} of {len(rows)} rows have no strictly ordered pair (all "
                          f"their answers tied): they train nothing", stacklevel=2)
        eval_pairs = preference_pairs(eval_data)[0] if eval_data is not None else None
        train_pairs, eval_pairs = T.split_eval(pairs, eval_pairs, config.eval_fraction, "pairs")
        self.encoder = Encoder(tokenizer, config.max_prompt_len, config.max_response_len, config.chat_template)
        self.train_rows = encode_pairs(self.encoder, train_pairs)
        self.eval_rows = encode_pairs(self.encoder, eval_pairs) if eval_pairs else []
        self.progress = progress
        D.check_batch("batch_size", min(config.batch_size, len(self.train_rows)), self.dist, config.grad_accum)
        # the reference: the starting model's sequence log-probs, once (every rank computes all of them)
        self.train_ref = self.reference_logprobs(self.train_rows)
        self.eval_ref = self.reference_logprobs(self.eval_rows)
        self.steps_per_epoch, self.total_steps, self.optimizer, self.scheduler = C.optimizer_and_schedule(
            config, self.engine.trainable_parameters(), len(self.train_rows), learning_rate(config, 1e-6, 5e-5))
        self.step_count = 0

    def _pair_logprobs(self, model, batch):
        return pair_logprobs(model, batch, self.packing, self.tokenizer.pad_token_id, self.device)

    def reference_logprobs(self, rows, batch_size: int = 16) -> Tensor:
        """(P, 2) the model's (chosen, rejected) log-probs of `rows` as it is now: called before training."""
        if not rows:
            return torch.zeros(0, 2)
        parts = []
        self.model.eval()
        for i in range(0, len(rows), batch_size):
            c, r = self.engine.no_grad(self._pair_logprobs, rows[i: i + batch_size])
            parts.append(torch.stack([c, r], 1).cpu())
        self.model.train()
        return torch.cat(parts)

    def batch_at(self, step: int) -> list[int]:
        idx = C.global_batch_indices(len(self.train_rows), self.config.batch_size, self.steps_per_epoch,
                                     self.config.seed, step)
        return D.shard(idx, self.dist)

    def _loss(self, model, rows, ref: Tensor):
        cfg = self.config
        pc, pr = self._pair_logprobs(model, rows)
        ref = ref.to(pc.device)
        lengths = {}
        if cfg.loss_type in ("ipo", "sigmoid_norm"):  # per-token log-ratios (TRL 1.x)
            lengths = {"chosen_lengths": torch.tensor([len(b[1]) for b in rows], device=pc.device),
                       "rejected_lengths": torch.tensor([len(b[2]) for b in rows], device=pc.device)}
        return rlhf_fast.dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta=cfg.beta, loss_type=cfg.loss_type,
                                  label_smoothing=cfg.label_smoothing, **lengths)

    def step(self, batch: list[int]) -> dict:
        """One optimizer step on this rank's pairs `batch` (indices) in ``grad_accum`` micro-batches."""
        self.model.train()
        (n_pairs,) = self.dist.sum(len(batch))
        self.optimizer.zero_grad(set_to_none=True)
        st = D.Stats()
        micro = D.micro_splits(len(batch), self.config.grad_accum)
        for j, sl in enumerate(micro):
            idx = batch[sl]
            with self.engine.sync(j == len(micro) - 1):
                loss, stats = self.engine(self._loss, [self.train_rows[i] for i in idx], self.train_ref[idx])
                part = loss * (len(idx) / max(1.0, n_pairs))
                self.engine.backward(part)
            st.total("loss", part.detach())
            for key, v in (("chosen", stats.chosen_rewards.mean()), ("rejected", stats.rejected_rewards.mean()),
                           ("accuracy", stats.reward_accuracy), ("margin", stats.reward_margin)):
                st.add(key, v, len(idx))
        gnorm = C.clip_grad(self.engine.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        out = st.reduce(self.dist)
        return {"loss": out["loss"], "reward_accuracy": out["accuracy"], "reward_margin": out["margin"],
                "rewards_chosen": out["chosen"], "rewards_rejected": out["rejected"],
                "grad_norm": gnorm, "lr": self.scheduler.get_last_lr()[0]}

    def evaluate(self, batch_size: int = 16) -> dict:
        """Loss and reward accuracy on the held-out pairs (every rank evaluates all of them)."""
        if not self.eval_rows:
            return {}
        tot = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        self.model.eval()
        for i in range(0, len(self.eval_rows), batch_size):
            rows = self.eval_rows[i: i + batch_size]
            loss, stats = self.engine.no_grad(self._loss, rows, self.eval_ref[i: i + batch_size])
            tot["loss"] += float(loss) * len(rows)
            tot["accuracy"] += float(stats.reward_accuracy) * len(rows)
            tot["margin"] += float(stats.reward_margin) * len(rows)
        self.model.train()
        n = len(self.eval_rows)
        return {"eval_loss": tot["loss"] / n, "eval_reward_accuracy": tot["accuracy"] / n,
                "eval_reward_margin": tot["margin"] / n}

    def result_fields(self) -> dict:
        return {"packing": self.packing, "pairs": len(self.train_rows), "rows_without_pair": self.rows_without_pair}

    def final_eval(self) -> dict:
        return self.evaluate()
