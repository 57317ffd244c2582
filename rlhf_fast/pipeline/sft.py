"""SFT: next-token cross-entropy on the response tokens of (prompt, response) pairs, through
:func:`rlhf_fast.linear_logprobs` (log-probs straight from the lm_head, no (B, T, V) logits)."""

from __future__ import annotations

import torch

from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline import trainer as T
from rlhf_fast.pipeline.chat import Encoder
from rlhf_fast.pipeline.config import SFTConfig, data_options, learning_rate
from rlhf_fast.pipeline.data import LMBatch, lm_batch_masked, load_sft


def sft_loss(model, batch: LMBatch, num_items: int | None = None, temperature: float = 1.0):
    """sum of -log p(response tokens) / num_items (default: the batch's response tokens)."""
    logprobs = C.token_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels, temperature)
    n = batch.num_tokens if num_items is None else num_items
    return -logprobs.sum() / max(1, n)


@torch.no_grad()
def eval_nll(model, encoder: Encoder, examples: list[dict], device, batch_size: int = 64) -> float:
    """Mean NLL per response token of `examples` (``text`` rows: every token after the first)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = encode_lm(encoder, examples[i: i + batch_size]).to(device)
        lp = C.token_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
        total += float(-lp.sum())
        count += batch.num_tokens
    model.train(was)
    return total / max(1, count)


def encode_row(encoder: Encoder, r: dict) -> tuple[list[int], list[bool]]:
    """(token ids, train mask) of one SFT / ptx row: {"prompt", "completion"} (or the legacy "response"; loss
    on the answer), {"messages"} (loss on the assistant turns) or {"text"} (loss on every token after the
    first). Sequences are cut to max_prompt_len + max_response_len tokens."""
    where, system, kw = r.get("_where", ""), r.get("system"), r.get("chat_template_kwargs")
    limit = encoder.max_prompt_len + encoder.max_response_len
    if "messages" in r:
        ids, train = encoder.conversation(r["messages"], where, system, kw)
    elif "prompt" in r:
        p = encoder.prompt(r["prompt"], where, system, kw)
        a = encoder.response(r["completion"] if "completion" in r else r["response"], where)
        ids, train = p + a, [False] * len(p) + [True] * len(a)
    else:
        ids = encoder.text(r["text"])
        train = [False] + [True] * (len(ids) - 1)
    if len(ids) > limit:
        encoder.truncated += 1
        ids, train = ids[:limit], train[:limit]
    return ids, train


def encode_lm(encoder: Encoder, rows: list[dict]) -> LMBatch:
    seqs, train = zip(*[encode_row(encoder, r) for r in rows], strict=True)
    return lm_batch_masked(list(seqs), list(train), encoder.tokenizer.pad_token_id)


class SFTTrainer(T.OneModelTrainer):
    """Fine-tunes a causal LM on demonstrations.

    ``SFTTrainer(config, model=..., tokenizer=..., train_data=[{"prompt", "completion"}, ...]).train()``;
    without ``train_data`` the examples come from ``config.data``. ``model`` / ``tokenizer`` default to
    ``config.model`` loaded with ``AutoModelForCausalLM``. Prompts and answers are rendered with the
    tokenizer's chat template (``config.chat_template``) and the loss covers the answer tokens only.

    Under torchrun (``config.distributed`` "ddp" / "fsdp") every rank builds the trainer with the same
    arguments; each step's global batch of ``batch_size`` examples is drawn as in one process and rank r
    trains on rows ``r::world_size`` of it, in ``grad_accum`` micro-batches, each normalised by the
    global batch's response-token count.
    """

    STAGE, DESC, POSTFIX = "sft", "sft", ("loss",)

    def __init__(self, config: SFTConfig, *, model=None, tokenizer=None, train_data: list[dict] | None = None,
                 eval_data: list[dict] | None = None, progress: bool = True):
        self.config = config
        self.dist = D.setup(config.distributed, config.device, config.precision)
        self.device = self.dist.device
        model = C.given_or_loaded(model, config.model, "model: give SFTConfig.model (a path or hub id) or pass model=",
                                  lambda: C.load_causal_lm(config.model, config.trust_remote_code))
        tokenizer = C.given_or_loaded(tokenizer, config.model, "model: give SFTConfig.model or pass tokenizer=",
                                      lambda: C.load_tokenizer(config.model, config.trust_remote_code))
        self.model = D.prepare(model, config, self.dist, "CAUSAL_LM")
        self.engine = D.Engine(self.model, self.dist)
        self.tokenizer = tokenizer
        train_data = C.given_or_loaded(train_data, config.data, "data: give SFTConfig.data (a JSONL file) or pass "
                                       "train_data=", lambda: load_sft(config.data, **data_options(config)))
        train_data, eval_data = T.split_eval(train_data, eval_data, config.eval_fraction, "examples")
        self.train_data, self.eval_data = train_data, eval_data
        self.encoder = Encoder(tokenizer, config.max_prompt_len, config.max_response_len, config.chat_template)
        self.progress = progress
        D.check_batch("batch_size", min(config.batch_size, len(train_data)), self.dist, config.grad_accum)
        self.steps_per_epoch, self.total_steps, self.optimizer, self.scheduler = C.optimizer_and_schedule(
            config, self.engine.trainable_parameters(), len(train_data), learning_rate(config, 2e-5, 2e-4))
        self.step_count = 0

    def batch_at(self, step: int) -> LMBatch:
        """This rank's share of the global batch of optimizer step `step` (a permutation per epoch seeded by
        (seed, epoch), so the global batch depends on the step only; one process: the whole batch)."""
        idx = C.global_batch_indices(len(self.train_data), self.config.batch_size, self.steps_per_epoch,
                                     self.config.seed, step)
        return encode_lm(self.encoder, [self.train_data[j] for j in D.shard(idx, self.dist)])

    def step(self, batch: LMBatch) -> dict:
        """One optimizer step on `batch` (this rank's share of the global batch) in ``grad_accum``
        micro-batches; returns the loss (mean NLL per response token of the global batch), grad norm,
        learning rate and the global batch's response tokens."""
        self.model.train()
        batch = batch.to(self.device)
        (n_tokens,) = self.dist.sum(batch.num_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        micro = D.micro_splits(len(batch), self.config.grad_accum)
        loss_sum = 0.0
        for j, sl in enumerate(micro):
            with self.engine.sync(j == len(micro) - 1):
                loss = self.engine(sft_loss, batch.rows(sl) if len(micro) > 1 else batch, int(n_tokens))
                self.engine.backward(loss)
            loss_sum += float(loss.detach())
        gnorm = C.clip_grad(self.engine.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        (loss_total,) = self.dist.sum(loss_sum)
        return {"loss": loss_total, "grad_norm": gnorm, "lr": self.scheduler.get_last_lr()[0],
                "tokens": int(n_tokens), "truncated": self.encoder.truncated}

    def final_eval(self) -> dict:
        if not self.eval_data:
            return {}
        # every rank evaluates the (small) held-out set: the same number everywhere
        return {"eval_loss": self.engine.no_grad(eval_nll, self.encoder, self.eval_data, self.device)}
