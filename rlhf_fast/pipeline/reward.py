"""Reward model: the SFT network with its unembedding replaced by a scalar head read at the last answer
token, trained with the InstructGPT K-wise loss :func:`rlhf_fast.ranking_loss` — all K answers of a
prompt are one batch element. With ``packing="shared_prefix"`` each prompt and its K answers run as one
packed sequence ``[prompt, answer_1, ..., answer_K]`` (prompt computed once,
:func:`rlhf_fast.integrations.transformers.shared_prefix_forward`); ``packing="padded"`` runs the K
``[prompt, answer_k]`` sequences as a right-padded batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline import trainer as T
from rlhf_fast.pipeline.chat import Encoder
from rlhf_fast.pipeline.config import RMConfig, data_options, learning_rate
from rlhf_fast.pipeline.data import load_ranked, pad_right
from rlhf_fast.pipeline.rl import PACKINGS, resolve_packing


def encode_ranked(encoder: Encoder, rows: list[dict]):
    """(prompt ids, [answer ids], ranks) per row; ranks as given (0 = best)."""
    out = []
    for r in rows:
        where = r.get("_where", "")
        p = encoder.prompt(r["prompt"], where, r.get("system"), r.get("chat_template_kwargs"))
        answers = [encoder.response(a, where) for a in r["responses"]]
        out.append((p, answers, list(r["ranking"])))
    return out


def score_answers(model, prompts: list[list[int]], answers: list[list[list[int]]], packing: str, pad_id: int,
                  device) -> Tensor:
    """(A,) fp32 rewards of every answer (group by group) read at its last token."""
    model = D.unwrap_peft(model)  # a LoRA reward model: the transformers model with its adapters inside
    head = C.scalar_head(model)
    if packing == "shared_prefix":
        from rlhf_fast.integrations.transformers import shared_prefix_forward

        out = shared_prefix_forward(model, [torch.tensor(p, device=device) for p in prompts],
                                    [[torch.tensor(a, device=device) for a in ans] for ans in answers],
                                    reward_head=head, compute_logprobs=False)
        return out.rewards
    if packing != "padded":
        raise ValueError(f"packing: expected one of {PACKINGS}, got {packing!r}")
    seqs = [p + a for p, ans in zip(prompts, answers, strict=True) for a in ans]
    ids, mask = pad_right(seqs, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    h = C.hidden_states(model, ids, mask)                                   # (A, T, H)
    last = mask.sum(1) - 1
    return head(h[torch.arange(h.shape[0], device=device), last]).squeeze(-1).float()


def ranking_batch_loss(model, batch, packing: str, pad_id: int, device):
    """(loss, stats, rewards (P, Kmax)) of a batch of (prompt, answers, ranks) with ranking_loss."""
    prompts = [b[0] for b in batch]
    answers = [b[1] for b in batch]
    flat = score_answers(model, prompts, answers, packing, pad_id, device)
    ks = [len(a) for a in answers]
    kmax = max(ks)
    parts = flat.split(ks)
    rewards = torch.stack([torch.nn.functional.pad(x, (0, kmax - x.shape[0])) for x in parts])   # (P, Kmax)
    ranks = torch.tensor([b[2] + [0] * (kmax - len(b[2])) for b in batch], dtype=torch.long, device=device)
    n = torch.tensor(ks, dtype=torch.long, device=device)
    loss, stats = rlhf_fast.ranking_loss(rewards, num_candidates=n, ranks=ranks)
    return loss, stats, rewards


def prompts_with_pairs(batch) -> int:
    """Prompts of a batch that have at least one ranked pair (the ones ranking_loss averages over)."""
    return sum(1 for b in batch if len(set(b[2][: len(b[1])])) > 1)


class RewardTrainer(T.OneModelTrainer):
    """Trains a reward model on ranked answers.

    ``RewardTrainer(config, model=..., tokenizer=..., train_data=[{"prompt", "responses", "ranking"}, ...])``;
    ``model`` defaults to ``config.model`` (the SFT model) loaded with ``AutoModelForSequenceClassification``
    (``num_labels=1``: the network with a scalar head ``score``), ``train_data`` to ``config.data``.

    Under torchrun each rank scores rows ``r::world_size`` of the global batch of prompts; ranking_loss
    averages over the prompts it is given, so each micro-batch's loss is weighted by its share of the
    global batch's prompts (those with a ranked pair): the sum over ranks and micro-batches is the loss
    of the global batch.
    """

    STAGE, DESC, POSTFIX = "rm", "reward model", ("loss", "accuracy")

    def __init__(self, config: RMConfig, *, model=None, tokenizer=None, train_data: list[dict] | None = None,
                 eval_data: list[dict] | None = None, progress: bool = True):
        resolve_packing(config.packing)  # checked before any model is loaded
        self.config = config
        self.dist = D.setup(config.distributed, config.device, config.precision)
        self.device = self.dist.device
        tokenizer = C.given_or_loaded(
            tokenizer, config.model, "model: give RMConfig.model (the SFT model's path) or pass model= and tokenizer=",
            lambda: C.load_tokenizer(config.model, config.trust_remote_code))
        model = C.given_or_loaded(
            model, config.model, "model: give RMConfig.model (the SFT model's path) or pass model=",
            lambda: C.load_scalar_model(config.model, config.trust_remote_code, pad_token_id=tokenizer.pad_token_id,
                                        seed=config.seed))
        self.packing = resolve_packing(config.packing, model)  # padded for a model without rlhf_fast attention
        self.model, self.tokenizer = D.prepare(model, config, self.dist, "SEQ_CLS"), tokenizer
        self.engine = D.Engine(self.model, self.dist)
        train_data = C.given_or_loaded(
            train_data, config.data, "data: give RMConfig.data (a ranked JSONL file) or pass train_data=",
            lambda: load_ranked(config.data, merge_pairs=config.merge_pairs, **data_options(config)))
        train_data, eval_data = T.split_eval(train_data, eval_data, config.eval_fraction, "prompts")
        self.encoder = Encoder(tokenizer, config.max_prompt_len, config.max_response_len, config.chat_template)
        self.train_rows = encode_ranked(self.encoder, train_data)
        self.eval_rows = encode_ranked(self.encoder, eval_data) if eval_data else []
        self.progress = progress
        D.check_batch("batch_size", min(config.batch_size, len(self.train_rows)), self.dist, config.grad_accum)
        self.steps_per_epoch, self.total_steps, self.optimizer, self.scheduler = C.optimizer_and_schedule(
            config, self.engine.trainable_parameters(), len(self.train_rows), learning_rate(config, 1e-5, 1e-4))
        self.step_count = 0

    def batch_at(self, step: int):
        idx = C.global_batch_indices(len(self.train_rows), self.config.batch_size, self.steps_per_epoch,
                                     self.config.seed, step)
        return [self.train_rows[j] for j in D.shard(idx, self.dist)]

    def step(self, batch) -> dict:
        """One optimizer step on `batch` (this rank's share of the global batch: a list of (prompt ids,
        [answer ids], ranks)) in ``grad_accum`` micro-batches."""
        self.model.train()
        (n_prompts,) = self.dist.sum(prompts_with_pairs(batch))
        self.optimizer.zero_grad(set_to_none=True)
        micro = D.micro_splits(len(batch), self.config.grad_accum)
        st = D.Stats()
        for j, sl in enumerate(micro):
            mb = batch[sl]
            with self.engine.sync(j == len(micro) - 1):
                loss, stats, _ = self.engine(ranking_batch_loss, mb, self.packing, self.tokenizer.pad_token_id,
                                             self.device)
                share = prompts_with_pairs(mb) / max(1.0, n_prompts)  # 1.0 for one whole batch
                part = loss * share if share != 1.0 else loss
                self.engine.backward(part)
            pairs = int(stats.num_pairs)
            st.total("loss", part.detach())
            st.total("pairs", pairs)
            st.add("accuracy", stats.accuracy, pairs)
            st.add("margin", stats.mean_margin, pairs)
        gnorm = C.clip_grad(self.engine.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        out = st.reduce(self.dist)
        return {"loss": out["loss"], "accuracy": out["accuracy"], "pairs": int(out["pairs"]),
                "margin": out["margin"], "grad_norm": gnorm, "lr": self.scheduler.get_last_lr()[0]}

    def evaluate(self, rows=None, batch_size: int = 32) -> dict:
        """Loss and pairwise accuracy against the given rankings (every rank evaluates all `rows`)."""
        rows = self.eval_rows if rows is None else rows
        if not rows:
            return {}
        return self.engine.no_grad(self._evaluate, rows, batch_size)

    def _evaluate(self, model, rows, batch_size: int) -> dict:
        model.eval()
        tot_loss, correct, pairs = 0.0, 0.0, 0
        for i in range(0, len(rows), batch_size):
            b = rows[i: i + batch_size]
            loss, stats, _ = ranking_batch_loss(model, b, self.packing, self.tokenizer.pad_token_id, self.device)
            tot_loss += float(loss) * len(b)
            correct += float(stats.accuracy) * int(stats.num_pairs)
            pairs += int(stats.num_pairs)
        model.train()
        return {"eval_loss": tot_loss / len(rows), "eval_accuracy": correct / max(1, pairs)}

    def result_fields(self) -> dict:
        return {"packing": self.packing}

    def final_eval(self) -> dict:
        return self.evaluate()
