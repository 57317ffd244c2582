"""SFT and reward-model step time of rlhf_fast's pipeline trainers vs TRL's ``SFTTrainer`` /
``RewardTrainer``, on the same tiny Llama, the same data and the same optimizer, on this machine's CPU.

    python bench/bench_trl.py [--quick] [--vocab 0 32000] [--hidden 256] [--layers 4] [--steps 6] [--warmup 2]
                              [--threads 1] [--sft-batch 32] [--rm-batch 16] [--trl-rm-batch 0] [--k-min 4]
                              [--k-max 9] [--trl-attn sdpa] [--stages sft rm] [--json results.json]

Model: ``build_tiny_llama`` (4 heads, 2 KV heads, MLP 3x hidden) on the default task's word-level tokenizer (58
tokens), grown to ``--vocab`` with extra tokens as a real LM's vocabulary would be (0: as built); the same seed-0
initialisation for both trainers (the reward model: that network with a scalar head ``score`` from a fixed
seed, loaded as the pipeline loads it); fp32. rlhf_fast runs it as the pipeline does, with
``attn_implementation="rlhf_fast"`` and its ``nn.Linear`` layers through ``rlhf_fast.linear``; TRL with
``--trl-attn`` (default ``sdpa``, what transformers gives a TRL user) and plain ``nn.Linear`` layers.

SFT: ``--sft-batch`` demonstrations ``{"prompt", "response"}`` of the default task per optimizer step; TRL gets
the same rows as a prompt/completion dataset (loss on completion tokens only, same max lengths), in the same
order (``train_sampling_strategy="sequential"``), so both train on identical batches, step for step.

Reward model: ranked rows ``{"prompt", "responses", "ranking"}`` (K in [--k-min, --k-max] task
demonstrations per prompt, ranked by the task's simulated labeler, no model sampling). rlhf_fast trains on
``--rm-batch`` prompts per step, all C(K, 2) pairs of a prompt in one batch element (K-wise ``ranking_loss``,
shared-prefix packing: the prompt and its K answers as one sequence). TRL trains on the same rows expanded into
their (chosen, rejected) pairs, ``--trl-rm-batch`` pairs per step (default: the mean number of pairs of an
rlhf_fast step, so both do about the same comparisons per optimizer step). A comparison is one ranked pair.

Both: AdamW (betas 0.9/0.95, eps 1e-8, no weight decay, same lr; TRL with ``optim="adamw_torch"``, the same
torch.optim.AdamW), gradient clipping at 1.0, warm-up then cosine to 10% of the lr, no eval, no logging, no
saving, no activation checkpointing (TRL's default is on), dataloader workers 0.

Measured: each (stage, trainer) in a fresh process with ``--threads`` torch threads (default 1: on this shared
2-core machine two threads wait on each other whenever one is descheduled, which inflates trainers made of
many small ops far more than fused ones; 0 = torch's default). ``--warmup`` optimizer steps are excluded, then
the median over ``--steps`` steps of
  * ms/step: one optimizer step (forward, backward, clipping, AdamW, scheduler): around
    ``SFTTrainer.step`` / ``RewardTrainer.step``; for TRL a ``TrainerCallback``, ``on_step_begin`` ->
    ``on_step_end``;
  * ms/step incl. data: from one step's end to the next's (adds tokenising / collating the batch and the
    trainer's own bookkeeping outside the optimizer step);
  * RM comparisons/s: ranked pairs of the step / its time;
each as process CPU time (``time.process_time``, which leaves out the time spent waiting for a core, so it
stays put on a loaded machine; with one thread it is the compute time) and as wall time
(``time.perf_counter``). Speed-ups = TRL time / rlhf_fast time (RM: ratio of comparisons/s).

Before timing, a check process builds both trainers on identical initial weights and compares, on the first
batch, the token ids and loss mask, the loss and every gradient (SFT), and the per-answer rewards, the loss of
the first prompt's C(K, 2) pairs and its gradients (RM; over one prompt the K-wise loss, a mean over the
prompt's pairs, is TRL's pairwise mean over the same pairs).

Not run in CI. ``--quick`` (3 timed steps after 1 warm-up, both vocabularies) takes 2-3 minutes here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

STAGES = ("sft", "rm")
PROVIDERS = ("rlhf_fast", "trl")


# ---------------------------------------------------------------------------------------------
# Shared setup: tokenizer, models and data (identical in every worker process)
# ---------------------------------------------------------------------------------------------

def _tokenizer(vocab: int):
    from rlhf_fast.pipeline.task import build_tokenizer

    tok = build_tokenizer()
    if vocab > len(tok):  # a real LM's vocabulary size: the lm_head's share of the step grows with it
        tok.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tok))])
    return tok


def _causal_lm(spec, tok):
    from rlhf_fast.pipeline import common as C

    h = spec["hidden"]
    return C.build_tiny_llama(tok, hidden_size=h, intermediate_size=3 * h, num_layers=spec["layers"], num_heads=4,
                              num_kv_heads=2, seed=0)


def _scalar_model(spec, tok, workdir):
    """The tiny Llama's network with a scalar head ``score`` (AutoModelForSequenceClassification, num_labels=1),
    as the pipeline builds its reward model; the head is initialised from a fixed seed."""
    import torch

    from rlhf_fast.pipeline import common as C

    path = os.path.join(workdir, "base")
    if not os.path.isdir(path):
        C.save_model(_causal_lm(spec, tok), tok, path)
    model = C.load_scalar_model(path, pad_token_id=tok.pad_token_id)
    head = C.scalar_head(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.weight.copy_(0.02 * torch.randn(head.weight.shape, generator=g))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return model


def _n_steps(spec) -> int:
    return spec["warmup"] + spec["steps"]


def _sft_rows(spec) -> list[dict]:
    import torch

    from rlhf_fast.pipeline.task import TopicTask, sft_examples

    return sft_examples(TopicTask(), spec["sft_batch"] * _n_steps(spec), torch.Generator().manual_seed(0))


def _ranked_rows(spec) -> list[dict]:
    """K task demonstrations per prompt, ranked by the task's labeler (the ranked JSONL format)."""
    import torch

    from rlhf_fast.pipeline.task import TopicTask

    task, g = TopicTask(), torch.Generator().manual_seed(0)
    rows = []
    for p in task.prompts(spec["rm_batch"] * _n_steps(spec), g):
        k = int(torch.randint(spec["k_min"], spec["k_max"] + 1, (1,), generator=g))
        answers = [task.demonstration(p, g) for _ in range(k)]
        rows.append({"prompt": p, "responses": answers, "ranking": task.rank(p, answers, g)})
    return rows


def _pairs(rows: list[dict]) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """Every ranked row as its C(K, 2) (chosen, rejected) pairs, TRL's explicit-prompt preference format, and
    (row, chosen answer, rejected answer) of each pair. TRL concatenates prompt + answer as strings: the
    leading space keeps the word-level tokenizer's words apart."""
    pairs, where = [], []
    for r, row in enumerate(rows):
        k, rank = len(row["responses"]), row["ranking"]
        for i in range(k):
            for j in range(i + 1, k):
                w, loser = (i, j) if rank[i] < rank[j] else (j, i)
                pairs.append({"prompt": row["prompt"], "chosen": " " + row["responses"][w],
                              "rejected": " " + row["responses"][loser]})
                where.append((r, w, loser))
    return pairs, where


def _pairs_per_step(spec) -> int:
    if spec["trl_rm_batch"]:
        return spec["trl_rm_batch"]
    rows = _ranked_rows(spec)
    return max(1, round(len(_pairs(rows)[0]) / _n_steps(spec)))


# ---------------------------------------------------------------------------------------------
# The four trainers
# ---------------------------------------------------------------------------------------------

def _ours_sft(spec, tok, model, rows, workdir):
    from rlhf_fast.pipeline.config import SFTConfig
    from rlhf_fast.pipeline.sft import SFTTrainer

    cfg = SFTConfig(output_dir=os.path.join(workdir, "ours_sft"), batch_size=spec["sft_batch"], lr=spec["sft_lr"],
                    max_steps=_n_steps(spec), warmup_steps=spec["warmup"], eval_fraction=0.0, device="cpu", seed=0,
                    max_prompt_len=spec["max_prompt_len"], max_response_len=spec["max_response_len"])
    return SFTTrainer(cfg, model=model, tokenizer=tok, train_data=rows, progress=False)


def _ours_rm(spec, tok, model, rows, workdir):
    from rlhf_fast.pipeline.config import RMConfig
    from rlhf_fast.pipeline.reward import RewardTrainer

    cfg = RMConfig(output_dir=os.path.join(workdir, "ours_rm"), batch_size=spec["rm_batch"], lr=spec["rm_lr"],
                   max_steps=_n_steps(spec), warmup_steps=spec["warmup"], eval_fraction=0.0, device="cpu", seed=0,
                   packing="shared_prefix", max_prompt_len=spec["max_prompt_len"],
                   max_response_len=spec["max_response_len"])
    return RewardTrainer(cfg, model=model, tokenizer=tok, train_data=rows, progress=False)


def _trl_args(spec, workdir, batch_size, lr, max_steps):
    """TrainingArguments fields shared by TRL's SFTConfig and RewardConfig: the same optimizer, schedule and
    clipping as the pipeline's trainers; no eval, logging, saving or mixed precision; batches in dataset order."""
    return dict(output_dir=workdir, per_device_train_batch_size=batch_size, max_steps=max_steps, learning_rate=lr,
                optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
                max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                warmup_steps=spec["warmup"], train_sampling_strategy="sequential", seed=0, use_cpu=True, bf16=False,
                fp16=False, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
                disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
                **{_checkpointing_field(): False})  # TRL turns activation checkpointing on by default


def _checkpointing_field() -> str:
    """transformers 5.x renamed ``gradient_checkpointing`` to ``activation_checkpointing``."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _trl_sft(spec, tok, model, rows, workdir, callbacks=None):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model.set_attn_implementation(spec["trl_attn"])
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["response"]} for r in rows])
    args = SFTConfig(**_trl_args(spec, os.path.join(workdir, "trl_sft"), spec["sft_batch"], spec["sft_lr"],
                                 _n_steps(spec)),
                     max_length=spec["max_prompt_len"] + spec["max_response_len"], completion_only_loss=True,
                     packing=False, padding_free=False)
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=callbacks)


def _trl_rm(spec, tok, model, pairs, workdir, callbacks=None):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model.set_attn_implementation(spec["trl_attn"])
    args = RewardConfig(**_trl_args(spec, os.path.join(workdir, "trl_rm"), _pairs_per_step(spec), spec["rm_lr"],
                                    _n_steps(spec)),
                        max_length=spec["max_prompt_len"] + spec["max_response_len"], center_rewards_coefficient=None)
    return RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                         callbacks=callbacks)


# ---------------------------------------------------------------------------------------------
# Workers (one per process)
# ---------------------------------------------------------------------------------------------

def _now() -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time (all threads) does not count the time the process waits for a core
    or is stopped, so it is the steadier figure on a shared machine."""
    return time.perf_counter(), time.process_time()


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """(wall, CPU) time at each optimizer step's begin and end (on_step_end follows the scheduler step)."""

        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(_now())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(_now())

    return StepTimer()


def _summary(spec, begin, end, comparisons=None) -> dict:
    """Medians over the timed steps, wall and process CPU ms: one optimizer step (begin -> end) and the step
    with its data (one step's end -> the next's); ranked pairs per second of CPU time (RM)."""
    import torch

    w, med = spec["warmup"], statistics.median
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(begin, end, strict=True)][w:]
    loop = [(end[i][0] - end[i - 1][0], end[i][1] - end[i - 1][1]) for i in range(max(1, w), len(end))]
    out = {"ms_step": 1e3 * med(s[0] for s in steps), "cpu_ms_step": 1e3 * med(s[1] for s in steps),
           "ms_step_data": 1e3 * med(s[0] for s in loop), "cpu_ms_step_data": 1e3 * med(s[1] for s in loop),
           "threads": torch.get_num_threads(), "timed_steps": len(steps),
           "all_ms_step": [round(1e3 * s[0], 1) for s in steps],
           "all_cpu_ms_step": [round(1e3 * s[1], 1) for s in steps]}
    if comparisons is not None:
        c = comparisons[w:]
        out["comparisons_per_step"] = statistics.mean(c)
        out["comparisons_per_s"] = med(n / s[0] for n, s in zip(c, steps, strict=True))
        out["comparisons_per_cpu_s"] = med(n / s[1] for n, s in zip(c, steps, strict=True))
    return out


def _setup_worker(spec) -> None:
    import datasets
    import torch

    datasets.disable_progress_bars()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])


def _trl_train(trainer) -> None:
    trainer.train()
    if getattr(trainer.model, "is_gradient_checkpointing", False):
        raise RuntimeError("TRL trained with activation checkpointing on: the comparison would not be like for like")


def worker_time(spec, stage: str, provider: str) -> dict:
    import torch

    _setup_worker(spec)
    tok = _tokenizer(spec["vocab"])
    with tempfile.TemporaryDirectory() as d:
        if stage == "sft":
            rows, model = _sft_rows(spec), _causal_lm(spec, tok)
            if provider == "rlhf_fast":
                from rlhf_fast.pipeline.sft import encode_lm

                tr = _ours_sft(spec, tok, model, rows, d)
                b = spec["sft_batch"]
                begin, end = [], []
                for i in range(_n_steps(spec)):
                    batch = encode_lm(tr.encoder, rows[i * b: (i + 1) * b])
                    begin.append(_now())
                    tr.step(batch)
                    end.append(_now())
                return _summary(spec, begin, end)
            timer = _step_timer()
            _trl_train(_trl_sft(spec, tok, model, rows, d, callbacks=[timer]))
            return _summary(spec, timer.begin, timer.end)

        rows = _ranked_rows(spec)
        model = _scalar_model(spec, tok, d)
        if provider == "rlhf_fast":
            tr = _ours_rm(spec, tok, model, rows, d)
            if tr.packing != "shared_prefix":
                raise RuntimeError(f"reward model: expected shared-prefix packing, got {tr.packing}")
            b = spec["rm_batch"]
            begin, end, comparisons = [], [], []
            for i in range(_n_steps(spec)):
                batch = tr.train_rows[i * b: (i + 1) * b]
                begin.append(_now())
                st = tr.step(batch)
                end.append(_now())
                comparisons.append(st["pairs"])
            return _summary(spec, begin, end, comparisons)
        pairs, _ = _pairs(rows)
        n = _pairs_per_step(spec)
        timer = _step_timer()
        torch.manual_seed(0)
        _trl_train(_trl_rm(spec, tok, model, pairs, d, callbacks=[timer]))
        return _summary(spec, timer.begin, timer.end, [n] * len(timer.end))


def _grad_diff(a, b) -> float:
    """max |grad_a - grad_b| / max |grad_a| over every parameter (matched by name)."""
    ga = {k: p.grad for k, p in a.named_parameters() if p.grad is not None}
    gb = {k: p.grad for k, p in b.named_parameters() if p.grad is not None}
    if set(ga) != set(gb):
        raise RuntimeError(f"gradients of different parameters: {sorted(set(ga) ^ set(gb))[:5]}")
    scale = max(float(g.abs().max()) for g in ga.values())
    return max(float((ga[k] - gb[k]).abs().max()) for k in ga) / max(scale, 1e-30)


def worker_check(spec) -> dict:
    """Identical initial weights: the first batch's tokens, loss and gradients from both trainers."""
    import torch

    from rlhf_fast.pipeline.reward import ranking_batch_loss
    from rlhf_fast.pipeline.sft import encode_lm, sft_loss

    _setup_worker(spec)
    out = {}
    tok = _tokenizer(spec["vocab"])
    with tempfile.TemporaryDirectory() as d:
        # -- SFT ---------------------------------------------------------------------------------------
        rows, model = _sft_rows(spec), _causal_lm(spec, tok)
        ours = _ours_sft(spec, tok, model, rows, d)
        trl = _trl_sft(spec, tok, copy.deepcopy(model), rows, d)
        b_ours = encode_lm(ours.encoder, rows[: spec["sft_batch"]])
        b_trl = next(iter(trl.get_train_dataloader()))
        same_ids = tuple(b_trl["input_ids"].shape) == tuple(b_ours.input_ids.shape) \
            and bool((b_trl["input_ids"] == b_ours.input_ids).all())
        same_labels = same_ids and bool((b_trl["labels"][:, 1:] == b_ours.labels).all())
        ours.model.train()
        trl.model.train()
        loss_ours = sft_loss(ours.model, b_ours)
        loss_ours.backward()
        loss_trl = trl.compute_loss(trl.model, dict(b_trl))
        loss_trl.backward()
        loss_ours, loss_trl = loss_ours.detach(), loss_trl.detach()
        out["sft"] = {"same_tokens": same_ids, "same_loss_mask": same_labels, "loss_rlhf_fast": float(loss_ours),
                      "loss_trl": float(loss_trl), "loss_abs_diff": abs(float(loss_ours) - float(loss_trl)),
                      "grad_rel_diff": _grad_diff(ours.model, trl.model), "tokens": b_ours.num_tokens}
        del ours, trl, model

        # -- reward model ------------------------------------------------------------------------------
        rows = _ranked_rows(spec)
        pairs, where = _pairs(rows)
        model = _scalar_model(spec, tok, d)
        ours = _ours_rm(spec, tok, model, rows, d)
        trl = _trl_rm(spec, tok, copy.deepcopy(model), pairs, d)
        first = [i for i, w in enumerate(where) if w[0] == 0]  # the first prompt's C(K, 2) pairs
        examples = [trl.train_dataset[i] for i in first]
        row0 = ours.train_rows[0]
        same_tokens = all(ex["chosen_ids"] == row0[0] + row0[1][w] and ex["rejected_ids"] == row0[0] + row0[1][lo]
                          for ex, (_, w, lo) in zip(examples, [where[i] for i in first], strict=True))
        batch = trl.data_collator(examples)
        ours.model.train()
        trl.model.train()
        loss_ours, _, rewards = ranking_batch_loss(ours.model, [row0], ours.packing, tok.pad_token_id, ours.device)
        loss_ours.backward()
        loss_trl = trl.compute_loss(trl.model, dict(batch))
        loss_trl.backward()
        loss_ours, loss_trl = loss_ours.detach(), loss_trl.detach()
        with torch.no_grad():
            r_trl = trl.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = r_trl.chunk(2)
        r0 = rewards[0]
        reward_diff = max(max(abs(float(chosen[p]) - float(r0[w])), abs(float(rejected[p]) - float(r0[lo])))
                          for p, (_, w, lo) in enumerate([where[i] for i in first]))
        out["rm"] = {"same_tokens": same_tokens, "pairs": len(first), "k": len(row0[1]),
                     "loss_rlhf_fast": float(loss_ours), "loss_trl": float(loss_trl),
                     "loss_abs_diff": abs(float(loss_ours) - float(loss_trl)), "reward_abs_diff": reward_diff,
                     "grad_rel_diff": _grad_diff(ours.model, trl.model), "packing": ours.packing}
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _run_worker(spec, *job) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps({"spec": spec, "job": list(job)})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise RuntimeError(f"worker {job} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    from importlib.metadata import version

    return {**{m: version(m) for m in ("torch", "transformers", "trl")}, "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}


def _fmt_check(v, c) -> str:
    s, r = c["sft"], c["rm"]
    return (f"vocab {v}: SFT first batch ({s['tokens']} response tokens): tokens "
            f"{'identical' if s['same_tokens'] else 'DIFFER'}, loss mask "
            f"{'identical' if s['same_loss_mask'] else 'DIFFERS'}, loss {s['loss_rlhf_fast']:.6f} vs "
            f"{s['loss_trl']:.6f} (|diff| {s['loss_abs_diff']:.1e}), gradients max rel diff {s['grad_rel_diff']:.1e}. "
            f"RM first prompt (K={r['k']}, {r['pairs']} pairs): tokens "
            f"{'identical' if r['same_tokens'] else 'DIFFER'}, rewards max |diff| {r['reward_abs_diff']:.1e}, loss "
            f"{r['loss_rlhf_fast']:.6f} vs {r['loss_trl']:.6f} (|diff| {r['loss_abs_diff']:.1e}), gradients max rel "
            f"diff {r['grad_rel_diff']:.1e}.")


def _table(results: dict) -> str:
    """Markdown table; every rate and speed-up from process CPU time, wall time beside it."""
    lines = ["| vocab | stage | provider | CPU ms/step | CPU ms/step incl. data | wall ms/step | comparisons/step "
             "| comparisons/s | CPU ms / 100 comparisons | speed-up vs TRL (CPU) | speed-up vs TRL (wall) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, res in results.items():
        for stage in [s for s in STAGES if s in res]:
            trl = res[stage]["trl"]
            for p in PROVIDERS:
                r = res[stage][p]
                if stage == "sft":
                    cols = "| | |"
                    cpu = f"{trl['cpu_ms_step'] / r['cpu_ms_step']:.2f}x"
                    wall = f"{trl['ms_step'] / r['ms_step']:.2f}x"
                else:
                    rate = r["comparisons_per_cpu_s"]
                    cols = f"{r['comparisons_per_step']:.0f} | {rate:.0f} | {1e5 / rate:.1f} |"
                    cpu = (f"{rate / trl['comparisons_per_cpu_s']:.2f}x per comparison "
                           f"({trl['cpu_ms_step'] / r['cpu_ms_step']:.2f}x per step)")
                    wall = f"{r['comparisons_per_s'] / trl['comparisons_per_s']:.2f}x per comparison"
                if p == "trl":
                    cpu = wall = "1"
                lines.append(f"| {v} | {stage} | {p} | {r['cpu_ms_step']:.1f} | {r['cpu_ms_step_data']:.1f} | "
                             f"{r['ms_step']:.1f} | {cols} {cpu} | {wall} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[0, 32000],
                    help="vocabulary sizes to run: the task's tokenizer grown to this size with extra tokens "
                         "(0: as built, 58 tokens)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per trainer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    ap.add_argument("--sft-batch", type=int, default=32, help="SFT examples per optimizer step")
    ap.add_argument("--rm-batch", type=int, default=16, help="rlhf_fast: ranked prompts per optimizer step")
    ap.add_argument("--trl-rm-batch", type=int, default=0,
                    help="TRL: (chosen, rejected) pairs per optimizer step (0: rlhf_fast's mean pairs per step)")
    ap.add_argument("--k-min", type=int, default=4, help="fewest answers per ranked prompt")
    ap.add_argument("--k-max", type=int, default=9, help="most answers per ranked prompt")
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--rm-lr", type=float, default=1e-3)
    ap.add_argument("--trl-attn", default="sdpa", help="attn_implementation of TRL's model (sdpa, eager, rlhf_fast)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per worker (0: torch's default). One thread by default: on a shared "
                         "machine two threads wait on each other whenever one is descheduled, which inflates the "
                         "step time of many small ops far more than that of a few large ones")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--no-check", action="store_true", help="skip the equality check")
    ap.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up step")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        w = json.loads(args.worker)
        job = w["job"]
        res = worker_check(w["spec"]) if job[0] == "check" else worker_time(w["spec"], job[0], job[1])
        print(json.dumps(res))
        return
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if not 2 <= args.k_min <= args.k_max:
        ap.error("need 2 <= --k-min <= --k-max")

    info = _versions()
    print(f"# SFT / RM step time, rlhf_fast vs TRL: hidden {args.hidden}, {args.layers} layers, fp32, CPU "
          f"({info['cpu']}, {info['cpus']} cores), torch {info['torch']}, transformers "
          f"{info['transformers']}, trl {info['trl']}; {args.threads or 'default'} torch thread(s) per trainer; "
          f"median of {args.steps} steps after {args.warmup} warm-up",
          flush=True)
    results, checks = {}, {}
    t0 = time.time()
    for v in args.vocab:
        spec = {"vocab": v, "hidden": args.hidden, "layers": args.layers, "steps": args.steps, "warmup": args.warmup,
                "threads": args.threads, "sft_batch": args.sft_batch, "rm_batch": args.rm_batch,
                "trl_rm_batch": args.trl_rm_batch, "k_min": args.k_min, "k_max": args.k_max, "sft_lr": args.sft_lr,
                "rm_lr": args.rm_lr,
                "trl_attn": args.trl_attn, "max_prompt_len": 32, "max_response_len": 16}
        label = v if v else "task (58)"
        if not args.no_check:
            checks[label] = _run_worker(spec, "check")
            print(_fmt_check(label, checks[label]), flush=True)
        results[label] = {}
        for stage in args.stages:
            results[label][stage] = {p: _run_worker(spec, stage, p) for p in PROVIDERS}
            for p in PROVIDERS:
                r = results[label][stage][p]
                print(f"  vocab {label} {stage} {p}: {r['ms_step']:.1f} ms/step, CPU {r['cpu_ms_step']:.1f} ms/step, "
                      f"{r['threads']} torch threads (wall: {r['all_ms_step']}, CPU: {r['all_cpu_ms_step']})",
                      flush=True)
    print()
    print(_table(results))
    print(f"\nms/step: one optimizer step (forward, backward, clipping, AdamW, scheduler); incl. data: from one step's "
          f"end to the next's (adds tokenising / collating the batch and the trainer's bookkeeping). CPU: process CPU "
          f"time, which leaves out the time the worker waits for a core on a shared machine. A comparison is one "
          f"ranked (chosen, rejected) pair; comparisons/s per CPU second; speed-up = TRL time / rlhf_fast time (RM: "
          f"ratio of comparisons/s). {time.time() - t0:.0f} s in all.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args), "versions": info, "check": checks, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
