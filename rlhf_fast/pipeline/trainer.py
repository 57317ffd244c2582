"""The trainer base of every pipeline stage (SFT, reward model, PPO, GRPO/RLOO, DPO): the step loop with
resume, logging and periodic checkpoints, the final evaluation, checkpoint and Hugging Face export."""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_fast.pipeline import checkpoint as CK
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline.common import MetricsLog


class Trainer:
    """What every stage's trainer shares: the step loop with resume, logging and periodic checkpoints,
    then the final evaluation, checkpoint and Hugging Face export. An algorithm is a subclass that says
    what one step is.

    A subclass sets STAGE (the metrics file and the export's "stage"), DESC and POSTFIX (progress bar
    label and the stats it shows) and provides config, dist, progress, step_count, total_steps,
    step(batch) -> stats (which advances step_count), batch_at(step) and _ckpt() (the models, optimizers
    and schedulers of a checkpoint). It may add fields to the checkpoint's state (state / load_state),
    to the result (result_fields), numbers after a step (after_step), held-out metrics (final_eval),
    and write its own export (export)."""

    STAGE: str = ""
    DESC: str = ""
    POSTFIX: tuple[str, ...] = ("loss",)

    def _ckpt(self):
        raise NotImplementedError

    def state(self, done: bool = False) -> dict:
        return {"step": self.step_count, "done": done}

    def load_state(self, st: dict) -> None:
        self.step_count = st["step"]

    def result_fields(self) -> dict:
        return {}

    def after_step(self, stats: dict) -> dict:
        return stats

    def final_eval(self) -> dict:
        return {}

    def export(self, out: Path) -> None:
        self.save(out / "model")

    def train(self) -> dict:
        out = Path(self.config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out, self.STAGE, enabled=self.dist.is_main)
        train_time = self._run_steps(out, log)
        result = {"steps": self.step_count, "train_time_s": train_time, **self.result_fields()}
        ev = self.final_eval()
        if ev:
            result.update(ev)
            log.log(self.step_count, **ev)
        log.close()
        self.export(out)
        CK.save_checkpoint(self.dist, out, *self._ckpt(), self.state(done=True))
        return result

    def _run_steps(self, out: Path, log: MetricsLog) -> float:
        """Resume from the checkpoint in `out` when config.resume, then step(batch_at(i)) until
        total_steps, logging every config.log_every steps and checkpointing every
        config.checkpoint_every. Returns the seconds spent. Progress bar and log on rank 0 only."""
        from tqdm.auto import tqdm

        cfg, d = self.config, self.dist
        if cfg.resume:
            st = CK.load_checkpoint(d, out, *self._ckpt())
            if st is not None:
                self.load_state(st)
                log.truncate_after(self.step_count)
        t0 = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step_count, desc=self.DESC,
                   disable=not (self.progress and d.is_main), dynamic_ncols=True)
        while self.step_count < self.total_steps:
            stats = self.after_step(self.step(self.batch_at(self.step_count)))
            bar.update(1)
            if self.step_count % cfg.log_every == 0 or self.step_count == self.total_steps:
                log.log(self.step_count, **stats)
                bar.set_postfix({k: f"{stats[k]:.3f}" for k in self.POSTFIX if k in stats})
            if cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0 \
                    and self.step_count < self.total_steps:
                CK.save_checkpoint(d, out, *self._ckpt(), self.state())
        bar.close()
        return time.time() - t0


class OneModelTrainer(Trainer):
    """A trainer of one model (``model``, ``tokenizer``) by one AdamW and schedule (``optimizer``,
    ``scheduler``): SFT, reward model, DPO."""

    def _ckpt(self):
        return {"model": self.model}, {"adamw": self.optimizer}, {"lr": self.scheduler}

    def save(self, path) -> None:
        """The Hugging Face export (rank 0 writes; LoRA merged; a collective under FSDP)."""
        D.export_model(self.model, self.tokenizer, path, self.dist, {"stage": self.STAGE, "config": vars(self.config)})


def split_eval(train_data: list, eval_data: list | None, eval_fraction: float, what: str) -> tuple[list, list]:
    """(train, eval): eval_data as given, or the first eval_fraction of train_data held out.
    Raises when no training `what` remain."""
    if eval_data is None:
        n_eval = int(len(train_data) * eval_fraction)
        eval_data, train_data = train_data[:n_eval], train_data[n_eval:]
    if not train_data:
        raise ValueError(f"train_data: no training {what}")
    return train_data, eval_data
