"""SFT -> reward model -> PPO-ptx end to end on the embedded default task (rlhf_fast/pipeline/task.py),
or with the user's base model (``model.model``), evaluated on held-out prompts after each stage.

Under torchrun (``distributed`` "ddp"/"fsdp") every stage trains on all ranks; the evaluations, the
sampling of the reward model's comparisons and the report run on every rank with the same seeds (so
every rank holds the same comparisons) from unsharded models, and rank 0 writes the files."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline.config import PipelineConfig, save_yaml
from rlhf_fast.pipeline.data import Encoder, read_jsonl, write_jsonl
from rlhf_fast.pipeline.evaluate import gold_eval, labeler_agreement, rm_gold_accuracy
from rlhf_fast.pipeline.generation import sample
from rlhf_fast.pipeline.ppo import PPOTrainer
from rlhf_fast.pipeline.reward import RewardTrainer
from rlhf_fast.pipeline.sft import SFTTrainer, eval_nll
from rlhf_fast.pipeline.task import TopicTask, build_tokenizer, sft_examples


def _stage_done(directory: Path) -> bool:
    f = directory / "checkpoint" / "trainer_state.json"
    return (directory / "model").exists() and f.exists() and json.loads(f.read_text())["state"].get("done", False)


def make_task(cfg: PipelineConfig) -> TopicTask:
    t = cfg.task
    return TopicTask(target_len=t.target_len, on_topic_prob=t.on_topic_prob, banned_prob=t.banned_prob,
                     end_prob=t.end_prob, label_noise=t.label_noise)


def task_data(cfg: PipelineConfig, task: TopicTask) -> dict:
    """The default task's data sets, drawn from one seeded generator; evaluation prompts are disjoint
    from every training prompt."""
    g = torch.Generator().manual_seed(C.step_seed(cfg.seed, 100))
    t = cfg.task
    sft = sft_examples(task, t.num_sft, g)
    rm_prompts = task.prompts(t.num_rm_prompts, g)
    ppo_prompts = task.prompts(t.num_ppo_prompts, g)
    ptx = task.ptx_texts(t.num_ptx, g)
    ptx_eval = task.ptx_texts(max(64, t.num_ptx // 10), g)
    seen = {r["prompt"] for r in sft} | set(rm_prompts) | set(ppo_prompts) | {r["prompt"] for r in ptx}
    eval_prompts: list[str] = []
    while len(eval_prompts) < t.num_eval_prompts:
        for p in task.prompts(t.num_eval_prompts, g):
            if p not in seen and p not in eval_prompts and len(eval_prompts) < t.num_eval_prompts:
                eval_prompts.append(p)
    return {"sft": sft, "rm_prompts": rm_prompts, "ppo_prompts": [{"prompt": p} for p in ppo_prompts],
            "ptx": ptx, "ptx_eval": ptx_eval, "eval_prompts": eval_prompts}


@torch.no_grad()
def label_comparisons(policy, tokenizer, encoder, task: TopicTask, prompts: list[str], *, k_min: int, k_max: int,
                      max_new_tokens: int, temperature: float, seed: int, device, batch: int = 128) -> list[dict]:
    """K in [k_min, k_max] answers per prompt sampled from `policy`, ranked by the simulated labeler."""
    if not 2 <= k_min <= k_max:
        raise ValueError(f"k_min/k_max: need 2 <= k_min <= k_max, got {k_min}, {k_max}")
    g = torch.Generator().manual_seed(C.step_seed(seed, 200))
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(C.step_seed(seed, 201))
        for start in range(0, len(prompts), batch):
            chunk = prompts[start: start + batch]
            s = sample(policy, [encoder.prompt(p) for p in chunk], num_samples=k_max, max_new_tokens=max_new_tokens,
                       temperature=temperature, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                       device=device)
            texts = s.texts(tokenizer)
            for i, p in enumerate(chunk):
                k = int(torch.randint(k_min, k_max + 1, (1,), generator=g))
                answers = texts[i * k_max: i * k_max + k]
                rows.append({"prompt": p, "responses": answers, "ranking": task.rank(p, answers, g)})
    return rows


def run_pipeline(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Run the three stages; returns the summary (also written to ``output_dir/summary.json``)."""
    t_start, cpu_start = time.time(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = D.setup(cfg.distributed, cfg.device, cfg.precision)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if d.is_main:
        save_yaml(cfg, out / "config.yaml")
    device = d.device
    task = make_task(cfg)
    data = task_data(cfg, task)
    times: dict[str, float] = {}
    ev = cfg.task
    gen_len = cfg.ppo.max_new_tokens

    # -- model and tokenizer ---------------------------------------------------------------
    if cfg.model.model:
        tokenizer = C.load_tokenizer(cfg.model.tokenizer or cfg.model.model, cfg.model.trust_remote_code)
        base = C.load_causal_lm(cfg.model.model, cfg.model.trust_remote_code)
    else:
        tokenizer = build_tokenizer()
        m = cfg.model
        base = C.build_tiny_llama(tokenizer, m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads,
                                  m.num_kv_heads, seed=cfg.seed)
    encoder = Encoder(tokenizer, cfg.sft.max_prompt_len, cfg.sft.max_response_len)

    def stage_cfg(sub, name):
        return dataclasses.replace(sub, output_dir=str(out / name), seed=cfg.seed, device=cfg.device,
                                   resume=cfg.resume, trust_remote_code=cfg.model.trust_remote_code,
                                   distributed=cfg.distributed, precision=cfg.precision)

    def plain(trained, path, loader, stage):
        """The stage's model for evaluation and sampling: the trainer's own, or — when it is sharded
        (FSDP) or a LoRA model — the merged export reloaded, the same on every rank."""
        if d.mode == "fsdp" or stage.lora_r:
            return loader(str(path), device=device)
        return trained

    def write(path: Path, text: str) -> None:
        if d.is_main:
            path.write_text(text)

    # -- SFT -------------------------------------------------------------------------------
    t0 = time.time()
    sft_dir = out / "sft"
    if cfg.resume and _stage_done(sft_dir):
        sft_model = C.load_causal_lm(str(sft_dir / "model"), device=device)
        sft_result = json.loads((sft_dir / "result.json").read_text())
    else:
        trainer = SFTTrainer(stage_cfg(cfg.sft, "sft"), model=base, tokenizer=tokenizer, train_data=data["sft"],
                             progress=progress)
        sft_result = trainer.train()
        write(sft_dir / "result.json", json.dumps(sft_result))
        sft_model = plain(trainer.model, sft_dir / "model", C.load_causal_lm, cfg.sft)
    sft_model.eval()
    sft_eval = gold_eval(sft_model, tokenizer, encoder, task, data["eval_prompts"], num_samples=ev.eval_samples,
                         max_new_tokens=gen_len, seed=cfg.seed + 7, device=device)
    ptx_loss_sft = eval_nll(sft_model, encoder, data["ptx_eval"], device)
    times["sft_s"] = time.time() - t0

    # -- reward model ----------------------------------------------------------------------
    t0 = time.time()
    rm_dir = out / "rm"
    rm_dir.mkdir(parents=True, exist_ok=True)
    comp_path = rm_dir / "comparisons.jsonl"
    if cfg.resume and comp_path.exists():
        comparisons = read_jsonl(comp_path, {"prompt": str, "responses": list, "ranking": list})
    else:
        comparisons = label_comparisons(sft_model, tokenizer, encoder, task, data["rm_prompts"], k_min=cfg.rm.k_min,
                                        k_max=cfg.rm.k_max, max_new_tokens=gen_len,
                                        temperature=cfg.rm.sample_temperature, seed=cfg.seed, device=device)
        if d.is_main:
            write_jsonl(comp_path, comparisons)
    agreement = labeler_agreement(task, comparisons)
    if cfg.resume and _stage_done(rm_dir):
        rm_model = C.load_scalar_model(str(rm_dir / "model"), device=device, pad_token_id=tokenizer.pad_token_id)
        rm_result = json.loads((rm_dir / "result.json").read_text())
    else:
        rm_model = C.load_scalar_model(str(sft_dir / "model"), pad_token_id=tokenizer.pad_token_id, seed=cfg.seed)
        rm_trainer = RewardTrainer(stage_cfg(cfg.rm, "rm"), model=rm_model, tokenizer=tokenizer,
                                   train_data=comparisons, progress=progress)
        rm_result = rm_trainer.train()
        write(rm_dir / "result.json", json.dumps(rm_result))
        rm_model = plain(rm_trainer.model, rm_dir / "model",
                         lambda p, device: C.load_scalar_model(p, device=device, pad_token_id=tokenizer.pad_token_id),
                         cfg.rm)
    rm_eval = rm_gold_accuracy(rm_model, sft_model, tokenizer, encoder, task, data["eval_prompts"], k=ev.rm_eval_k,
                               max_new_tokens=gen_len, seed=cfg.seed + 11, device=device,
                               packing=rm_result.get("packing", "padded"))
    times["rm_s"] = time.time() - t0

    # -- PPO-ptx ---------------------------------------------------------------------------
    t0 = time.time()
    ppo_dir = out / "ppo"
    curve_prompts = data["eval_prompts"][: max(1, len(data["eval_prompts"]) // 4)]

    def evaluator(policy):
        r = gold_eval(policy, tokenizer, encoder, task, curve_prompts, num_samples=2, max_new_tokens=gen_len,
                      seed=cfg.seed + 13, device=device)
        return {"gold_score": r["gold_score"]}

    if cfg.resume and _stage_done(ppo_dir):
        policy = C.load_causal_lm(str(ppo_dir / "model"), device=device)
        ppo_result = json.loads((ppo_dir / "result.json").read_text())
    else:
        ppo = PPOTrainer(stage_cfg(cfg.ppo, "ppo"), policy=C.load_causal_lm(str(sft_dir / "model")),
                         reward_model=C.load_scalar_model(str(rm_dir / "model"), pad_token_id=tokenizer.pad_token_id),
                         tokenizer=tokenizer, prompts=data["ppo_prompts"], ptx_data=data["ptx"], evaluator=evaluator,
                         progress=progress)
        ppo_result = ppo.train()
        write(ppo_dir / "result.json", json.dumps(ppo_result))
        policy = plain(ppo.actor, ppo_dir / "model", C.load_causal_lm, cfg.ppo)
    policy.eval()
    ppo_eval = gold_eval(policy, tokenizer, encoder, task, data["eval_prompts"], num_samples=ev.eval_samples,
                         max_new_tokens=gen_len, seed=cfg.seed + 7, device=device, ref=sft_model)
    ptx_loss_ppo = eval_nll(policy, encoder, data["ptx_eval"], device)
    times["ppo_s"] = time.time() - t0

    # -- summary ---------------------------------------------------------------------------
    gold_max = sum(task.gold_max(p) for p in data["eval_prompts"]) / len(data["eval_prompts"])
    g_sft, g_ppo = sft_eval["gold_score"], ppo_eval["gold_score"]
    gap_closed = (g_ppo - g_sft) / (gold_max - g_sft) if gold_max > g_sft else 0.0
    summary = {
        "rm_accuracy": rm_eval["rm_accuracy"], "rm_eval_pairs": rm_eval["rm_eval_pairs"],
        "rm_eval_accuracy_vs_labels": rm_result.get("eval_accuracy"), "labeler_agreement": agreement,
        "rm_packing": rm_result.get("packing"),
        "gold_score_sft": g_sft, "gold_score_ppo": g_ppo, "gold_score_max": gold_max, "gap_closed": gap_closed,
        "kl_per_token": ppo_eval["kl_per_token"], "kl_bound": cfg.ppo.kl_bound,
        "ptx_loss_sft": ptx_loss_sft, "ptx_loss_ppo": ptx_loss_ppo, "sft_eval_loss": sft_result.get("eval_loss"),
        "answer_words_sft": sft_eval["answer_words"], "answer_words_ppo": ppo_eval["answer_words"],
        "final_beta": ppo_result.get("beta"),
        "time_sft_s": times["sft_s"], "time_rm_s": times["rm_s"], "time_ppo_s": times["ppo_s"],
        "time_total_s": time.time() - t_start, "cpu_time_s": time.process_time() - cpu_start,
    }
    summary["targets"] = {
        "rm_accuracy>=0.75": summary["rm_accuracy"] >= 0.75,
        "gap_closed>=0.30": gap_closed >= 0.30,
        "kl_per_token<=kl_bound": summary["kl_per_token"] <= cfg.ppo.kl_bound,
        "ptx_loss_ppo<=1.1*ptx_loss_sft": ptx_loss_ppo <= 1.1 * ptx_loss_sft,
    }
    write(out / "summary.json", json.dumps(summary, indent=2))
    samples = {"sft": sft_eval["samples"], "ppo": ppo_eval["samples"]}
    write(out / "samples.json", json.dumps(samples, indent=1))
    if d.is_main:
        from rlhf_fast.pipeline import report

        report.write_report(out, summary, samples, cfg, plots=cfg.plots)
    d.barrier()
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"reward model   pairwise accuracy vs gold {s['rm_accuracy']:.3f} ({s['rm_eval_pairs']} held-out pairs; "
        f"labeler agreement with gold {s['labeler_agreement']:.3f}; packing {s['rm_packing']})",
        f"gold score     SFT {s['gold_score_sft']:.3f} -> PPO-ptx {s['gold_score_ppo']:.3f} (max "
        f"{s['gold_score_max']:.3f}; gap closed {100 * s['gap_closed']:.1f}%)",
        f"KL to SFT      {s['kl_per_token']:.4f} nats/token (bound {s['kl_bound']})",
        f"ptx loss       SFT {s['ptx_loss_sft']:.4f} -> PPO-ptx {s['ptx_loss_ppo']:.4f}",
        f"wall time      SFT {s['time_sft_s']:.0f}s, RM {s['time_rm_s']:.0f}s, PPO {s['time_ppo_s']:.0f}s, "
        f"total {s['time_total_s']:.0f}s (process CPU time {s['cpu_time_s']:.0f}s)",
        "targets        " + ", ".join(f"{k}: {'ok' if v else 'MISSED'}" for k, v in s["targets"].items()),
    ]
    return "\n".join(lines)
