"""Reward model: the SFT network with its unembedding replaced by a scalar head read at the last answer
token, trained with the InstructGPT K-wise loss :func:`rlhf_fast.ranking_loss` — all K answers of a
prompt are one batch element. With ``packing="shared_prefix"`` each prompt and its K answers run as one
packed sequence ``[prompt, answer_1, ..., answer_K]`` (prompt computed once,
:func:`rlhf_fast.integrations.transformers.shared_prefix_forward`); ``packing="padded"`` runs the K
``[prompt, answer_k]`` sequences as a right-padded batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline.config import RMConfig
from rlhf_fast.pipeline.data import Encoder, load_ranked, pad_right

PACKINGS = ("shared_prefix", "padded")


def encode_ranked(encoder: Encoder, rows: list[dict]):
    """(prompt ids, [answer ids], ranks) per row; ranks as given (0 = best)."""
    out = []
    for r in rows:
        p = encoder.prompt(r["prompt"], r.get("_where", ""))
        answers = [encoder.response(a) for a in r["responses"]]
        out.append((p, answers, list(r["ranking"])))
    return out


def score_answers(model, prompts: list[list[int]], answers: list[list[list[int]]], packing: str, pad_id: int,
                  device) -> Tensor:
    """(A,) fp32 rewards of every answer (group by group) read at its last token."""
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


class RewardTrainer:
    """Trains a reward model on ranked answers.

    ``RewardTrainer(config, model=..., tokenizer=..., train_data=[{"prompt", "responses", "ranking"}, ...])``;
    ``model`` defaults to ``config.model`` (the SFT model) loaded with ``AutoModelForSequenceClassification``
    (``num_labels=1``: the network with a scalar head ``score``), ``train_data`` to ``config.data``.
    """

    def __init__(self, config: RMConfig, *, model=None, tokenizer=None, train_data: list[dict] | None = None,
                 eval_data: list[dict] | None = None, progress: bool = True):
        if config.packing not in PACKINGS:
            raise ValueError(f"packing: expected one of {PACKINGS}, got {config.packing!r}")
        self.config = config
        self.device = C.resolve_device(config.device)
        if tokenizer is None:
            if not config.model:
                raise ValueError("model: give RMConfig.model (the SFT model's path) or pass model= and tokenizer=")
            tokenizer = C.load_tokenizer(config.model, config.trust_remote_code)
        if model is None:
            if not config.model:
                raise ValueError("model: give RMConfig.model (the SFT model's path) or pass model=")
            model = C.load_scalar_model(config.model, config.trust_remote_code, pad_token_id=tokenizer.pad_token_id)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.packing = config.packing
        if self.packing == "shared_prefix" and getattr(model.config, "_attn_implementation", None) != C.ATTN:
            self.packing = "padded"  # the model cannot run rlhf_fast attention: padded batches
        if train_data is None:
            if not config.data:
                raise ValueError("data: give RMConfig.data (a ranked JSONL file) or pass train_data=")
            train_data = load_ranked(config.data)
        train_data, eval_data = C.split_eval(train_data, eval_data, config.eval_fraction, "prompts")
        self.encoder = Encoder(tokenizer, config.max_prompt_len, config.max_response_len)
        self.train_rows = encode_ranked(self.encoder, train_data)
        self.eval_rows = encode_ranked(self.encoder, eval_data) if eval_data else []
        self.progress = progress
        self.steps_per_epoch = max(1, len(self.train_rows) // config.batch_size)
        total = self.steps_per_epoch * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           C.lr_lambda(config.warmup_steps, self.total_steps))
        self.step_count = 0

    def batch_at(self, step: int):
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(C.step_seed(self.config.seed, epoch))
        order = torch.randperm(len(self.train_rows), generator=g)
        idx = order[i * self.config.batch_size: (i + 1) * self.config.batch_size].tolist()
        return [self.train_rows[j] for j in idx]

    def step(self, batch) -> dict:
        """One optimizer step on `batch` (list of (prompt ids, [answer ids], ranks))."""
        self.model.train()
        loss, stats, _ = ranking_batch_loss(self.model, batch, self.packing, self.tokenizer.pad_token_id, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = C.clip_grad(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return {"loss": float(loss.detach()), "accuracy": float(stats.accuracy), "pairs": int(stats.num_pairs),
                "margin": float(stats.mean_margin), "grad_norm": gnorm, "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self, rows=None, batch_size: int = 32) -> dict:
        """Loss and pairwise accuracy against the given rankings."""
        rows = self.eval_rows if rows is None else rows
        if not rows:
            return {}
        self.model.eval()
        tot_loss, correct, pairs = 0.0, 0.0, 0
        for i in range(0, len(rows), batch_size):
            b = rows[i: i + batch_size]
            loss, stats, _ = ranking_batch_loss(self.model, b, self.packing, self.tokenizer.pad_token_id, self.device)
            tot_loss += float(loss) * len(b)
            correct += float(stats.accuracy) * int(stats.num_pairs)
            pairs += int(stats.num_pairs)
        self.model.train()
        return {"eval_loss": tot_loss / len(rows), "eval_accuracy": correct / max(1, pairs)}

    def _ckpt(self):
        return {"model": self.model}, {"adamw": self.optimizer}, {"lr": self.scheduler}

    def train(self) -> dict:
        cfg = self.config
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = C.MetricsLog(out, "rm")
        train_time = C.run_steps(self, out, log, "reward model", ("loss", "accuracy"))
        result = {"steps": self.step_count, "train_time_s": train_time, "packing": self.packing}
        ev = self.evaluate()
        if ev:
            result.update(ev)
            log.log(self.step_count, **ev)
        log.close()
        self.save(out / "model")
        C.save_checkpoint(out, *self._ckpt(), {"step": self.step_count, "done": True})
        return result

    def save(self, path) -> None:
        C.save_model(self.model, self.tokenizer, path, {"stage": "rm", "config": vars(self.config)})
