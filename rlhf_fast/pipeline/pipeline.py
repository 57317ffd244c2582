"""SFT -> reward model -> PPO-ptx end to end on an embedded task, evaluated on held-out prompts; or SFT
followed by another alignment stage (``algorithm``): GRPO or RLOO with the task's gold rubric as a verifiable
reward (no reward model), or DPO on the labeler's comparisons (no reward model).

Two embedded tasks (``task.name``):

- ``constraints`` (the default, for a real chat model: SmolLM2-135M-Instruct unless ``model.model`` says
  otherwise; rlhf_fast/pipeline/constraints.py): instructions with checkable constraints. The SFT
  demonstrations are the best of ``task.sft_candidates`` answers the base model samples for each prompt
  (best under the rubric), edited by a simulated demonstrator to meet each constraint with probability
  ``task.demo_fix_prob``; the simulated labeler (rubric + noise) ranks K answers of the SFT model; the reward
  model learns from those rankings only; PPO-ptx optimises the reward model, with the held-out SFT
  demonstrations' likelihood as the ptx term; held-out prompts are scored by the rubric (the gold score).
- ``topics`` (the tiny preset's word task, rlhf_fast/pipeline/task.py) on the 0.1M-parameter toy Llama.

Under torchrun (``distributed`` "ddp"/"fsdp") every stage trains on all ranks; the evaluations, the
sampling of demonstrations and comparisons and the report run on every rank with the same seeds (so every
rank holds the same data) from unsharded models, and rank 0 writes the files."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from pathlib import Path

import torch

from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D
from rlhf_fast.pipeline.chat import Encoder
from rlhf_fast.pipeline.config import ALGORITHM_NAMES, ALGORITHMS, PipelineConfig, save_yaml
from rlhf_fast.pipeline.constraints import ConstraintTask
from rlhf_fast.pipeline.data import read_jsonl, write_jsonl
from rlhf_fast.pipeline.dpo import DPOTrainer
from rlhf_fast.pipeline.evaluate import gold_eval, labeler_agreement, policy_samples, rm_gold_accuracy
from rlhf_fast.pipeline.grpo import GRPOTrainer
from rlhf_fast.pipeline.ppo import PPOTrainer
from rlhf_fast.pipeline.reward import RewardTrainer
from rlhf_fast.pipeline.sft import SFTTrainer, eval_nll
from rlhf_fast.pipeline.task import TopicTask, build_tokenizer, sft_examples

TASKS = ("constraints", "topics")


def _stage_done(directory: Path) -> bool:
    f = directory / "checkpoint" / "trainer_state.json"
    return (directory / "model").exists() and f.exists() and json.loads(f.read_text())["state"].get("done", False)


def make_task(cfg: PipelineConfig):
    t = cfg.task
    if t.name == "constraints":
        return ConstraintTask(label_noise=t.label_noise)
    if t.name == "topics":
        return TopicTask(target_len=t.target_len, on_topic_prob=t.on_topic_prob, banned_prob=t.banned_prob,
                         end_prob=t.end_prob, label_noise=t.label_noise)
    raise ValueError(f"task.name: expected one of {TASKS}, got {t.name!r}")


def _disjoint(task, n: int, seen: set, g: torch.Generator) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        for p in task.prompts(n, g):
            if p not in seen and p not in out and len(out) < n:
                out.append(p)
    return out


def task_data(cfg: PipelineConfig, task) -> dict:
    """The task's prompt sets (and, for the topics task, its demonstrations and ptx texts), drawn from one
    seeded generator; evaluation prompts are disjoint from every training prompt. For the constraints
    task, "sft_prompts" still need their demonstrations (:func:`best_of_k_demonstrations`)."""
    g = torch.Generator().manual_seed(C.step_seed(cfg.seed, 100))
    t = cfg.task
    if isinstance(task, TopicTask):
        sft = sft_examples(task, t.num_sft, g)
        rm_prompts = task.prompts(t.num_rm_prompts, g)
        ppo_prompts = task.prompts(t.num_ppo_prompts, g)
        ptx = task.ptx_texts(t.num_ptx, g)
        ptx_eval = task.ptx_texts(max(64, t.num_ptx // 10), g)
        seen = {r["prompt"] for r in sft} | set(rm_prompts) | set(ppo_prompts) | {r["prompt"] for r in ptx}
        return {"sft": sft, "rm_prompts": rm_prompts, "ppo_prompts": [{"prompt": p} for p in ppo_prompts],
                "ptx": ptx, "ptx_eval": ptx_eval, "eval_prompts": _disjoint(task, t.num_eval_prompts, seen, g)}
    n_ptx_eval = max(8, t.num_sft // 4)
    sft_prompts = _disjoint(task, t.num_sft + n_ptx_eval, set(), g)
    rm_prompts = task.prompts(t.num_rm_prompts, g)
    ppo_prompts = task.prompts(t.num_ppo_prompts, g)
    seen = set(sft_prompts) | set(rm_prompts) | set(ppo_prompts)
    return {"sft_prompts": sft_prompts, "n_ptx_eval": n_ptx_eval, "rm_prompts": rm_prompts,
            "ppo_prompts": [{"prompt": p} for p in ppo_prompts],
            "eval_prompts": _disjoint(task, t.num_eval_prompts, seen, g)}


@torch.no_grad()
def sampled_answers(model, tokenizer, encoder, prompts: list[str], *, k: int, max_new_tokens: int,
                    temperature: float, seed: int, device, batch: int, desc: str, progress: bool):
    """(prompt, its `k` sampled answer texts) for every prompt, sampled in batches of `batch` prompts, each
    batch seeded from (`seed`, its first prompt's index)."""
    for start in C.progress_range(len(prompts), batch, desc, progress):
        chunk = prompts[start: start + batch]
        s = policy_samples(model, tokenizer, encoder, chunk, num_samples=k, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=1.0, seed=C.step_seed(seed, start), device=device)
        texts = s.texts(tokenizer)
        for i, p in enumerate(chunk):
            yield p, texts[i * k:(i + 1) * k]


def best_of_k_demonstrations(model, tokenizer, encoder, task, prompts: list[str], *, k: int, max_new_tokens: int,
                             temperature: float, seed: int, device, batch: int = 32, progress: bool = False,
                             fix_prob: float = 0.0) -> list[dict]:
    """For each prompt, the best of `k` answers `model` samples under the task's gold rubric (the ``draft``),
    edited by the task's simulated demonstrator to meet each constraint with probability `fix_prob`
    (:meth:`ConstraintTask.demonstration`; 0: the draft as it is)."""
    g = torch.Generator().manual_seed(C.step_seed(seed, 301))
    rows = []
    for p, answers in sampled_answers(model, tokenizer, encoder, prompts, k=k, max_new_tokens=max_new_tokens,
                                      temperature=temperature, seed=C.step_seed(seed, 300), device=device,
                                      batch=batch, desc="demonstrations", progress=progress):
        gold = [task.gold_score(p, a) for a in answers]
        best = max(range(k), key=gold.__getitem__)
        text = task.demonstration(p, answers[best], fix_prob, g) if fix_prob > 0 else answers[best]
        rows.append({"prompt": p, "completion": text, "gold": task.gold_score(p, text), "draft": answers[best],
                     "draft_gold": gold[best]})
    return rows


def label_comparisons(policy, tokenizer, encoder, task, prompts: list[str], *, k_min: int, k_max: int,
                      max_new_tokens: int, temperature: float, seed: int, device, decode_rows: int = 128,
                      progress: bool = False) -> list[dict]:
    """K in [k_min, k_max] answers per prompt sampled from `policy`, ranked by the simulated labeler; about
    `decode_rows` answers are sampled at a time (the decode batch, whose KV cache sets the stage's peak memory)."""
    if not 2 <= k_min <= k_max:
        raise ValueError(f"k_min/k_max: need 2 <= k_min <= k_max, got {k_min}, {k_max}")
    g = torch.Generator().manual_seed(C.step_seed(seed, 200))
    rows = []
    for p, texts in sampled_answers(policy, tokenizer, encoder, prompts, k=k_max, max_new_tokens=max_new_tokens,
                                    temperature=temperature, seed=C.step_seed(seed, 201), device=device,
                                    batch=max(1, decode_rows // k_max), desc="comparisons", progress=progress):
        answers = texts[: int(torch.randint(k_min, k_max + 1, (1,), generator=g))]
        rows.append({"prompt": p, "responses": answers, "ranking": task.rank(p, answers, g)})
    return rows


def _base_model(cfg: PipelineConfig, progress: bool):
    m = cfg.model
    if m.model == "tiny":
        tokenizer = build_tokenizer()
        base = C.build_tiny_llama(tokenizer, m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads,
                                  m.num_kv_heads, seed=cfg.seed)
        return tokenizer, base
    tokenizer = C.load_tokenizer(m.tokenizer or m.model, m.trust_remote_code, progress)
    return tokenizer, C.load_causal_lm(m.model, m.trust_remote_code, progress=progress)


def run_pipeline(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Run the three stages; returns the summary (also written to ``output_dir/summary.json``)."""
    t_start, cpu_start = time.time(), time.process_time()
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {cfg.algorithm!r}")
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
    peak_rss: dict[str, float] = {}  # the process's peak resident memory at the end of each stage
    ev = cfg.task
    gen_len = cfg.ppo.max_new_tokens
    temp = cfg.ppo.temperature

    # -- model and tokenizer ---------------------------------------------------------------
    t0 = time.time()
    tokenizer, base = _base_model(cfg, progress)
    times["load_s"] = time.time() - t0
    peak_rss["load"] = _peak_rss_gb()
    n_params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    encoder = Encoder(tokenizer, cfg.sft.max_prompt_len, cfg.sft.max_response_len, cfg.model.chat_template)
    tokenizer.chat_template = encoder.template  # the exported models carry the template the run used

    def stage_cfg(sub, name):
        return dataclasses.replace(sub, output_dir=str(out / name), seed=cfg.seed, device=cfg.device,
                                   resume=cfg.resume, trust_remote_code=cfg.model.trust_remote_code,
                                   distributed=cfg.distributed, precision=cfg.precision,
                                   chat_template=cfg.model.chat_template)

    def plain(trained, path, loader, stage):
        """The stage's model for evaluation and sampling: the trainer's own, or — when it is sharded
        (FSDP) or a LoRA model — the merged export reloaded, the same on every rank."""
        if d.mode == "fsdp" or stage.lora_r:
            return loader(str(path), device=device)
        return trained

    def write(path: Path, text: str) -> None:
        if d.is_main:
            path.write_text(text)

    def load_lm(path, device=None):
        return C.load_causal_lm(str(path), device=device, progress=False)

    def load_rm(path, device=None, seed=cfg.seed):
        return C.load_scalar_model(str(path), device=device, pad_token_id=tokenizer.pad_token_id, seed=seed,
                                   progress=False)

    # -- SFT -------------------------------------------------------------------------------
    t0 = time.time()
    sft_dir = out / "sft"
    sft_dir.mkdir(parents=True, exist_ok=True)
    if "sft" not in data:  # constraints task: best-of-K demonstrations of the base model
        demo_path = sft_dir / "demonstrations.jsonl"
        if cfg.resume and demo_path.exists():
            demos = read_jsonl(demo_path, {"prompt": str, "completion": str})
        else:
            demos = best_of_k_demonstrations(base.to(device), tokenizer, encoder, task, data["sft_prompts"],
                                             k=ev.sft_candidates, max_new_tokens=gen_len, temperature=temp,
                                             seed=cfg.seed, device=device, progress=progress,
                                             fix_prob=ev.demo_fix_prob)
            if d.is_main:
                write_jsonl(demo_path, demos)
        n_eval = data["n_ptx_eval"]
        data["sft"], data["ptx_eval"] = demos[:-n_eval], demos[-n_eval:]
        data["ptx"] = data["sft"]
    if cfg.resume and _stage_done(sft_dir):
        sft_model = load_lm(sft_dir / "model", device)
        sft_result = json.loads((sft_dir / "result.json").read_text())
    else:
        trainer = SFTTrainer(stage_cfg(cfg.sft, "sft"), model=base, tokenizer=tokenizer, train_data=data["sft"],
                             eval_data=data["ptx_eval"], progress=progress)
        sft_result = trainer.train()
        write(sft_dir / "result.json", json.dumps(sft_result))
        sft_model = plain(trainer.model, sft_dir / "model", load_lm, cfg.sft)
        del trainer
    del base  # (the SFT model is its own copy with LoRA or FSDP; otherwise the same module)
    gc.collect()
    sft_model.eval()
    sft_eval = gold_eval(sft_model, tokenizer, encoder, task, data["eval_prompts"], num_samples=ev.eval_samples,
                         max_new_tokens=gen_len, temperature=temp, seed=cfg.seed + 7, device=device,
                         progress=progress, desc="eval sft")
    ptx_loss_sft = eval_nll(sft_model, encoder, data["ptx_eval"], device)
    times["sft_s"] = time.time() - t0
    peak_rss["sft"] = _peak_rss_gb()

    # -- reward model (PPO), the labeler's comparisons (PPO, DPO) ---------------------------
    comparisons, agreement, rm_eval, rm_result = None, None, {}, {}
    if cfg.algorithm in ("ppo", "dpo"):
        t0 = time.time()
        rm_dir = out / "rm"
        rm_dir.mkdir(parents=True, exist_ok=True)
        comp_path = rm_dir / "comparisons.jsonl"
        if cfg.resume and comp_path.exists():
            comparisons = read_jsonl(comp_path, {"prompt": str, "responses": list, "ranking": list})
        else:
            comparisons = label_comparisons(sft_model, tokenizer, encoder, task, data["rm_prompts"],
                                            k_min=cfg.rm.k_min, k_max=cfg.rm.k_max, max_new_tokens=gen_len,
                                            temperature=cfg.rm.sample_temperature, seed=cfg.seed, device=device,
                                            progress=progress)
            if d.is_main:
                write_jsonl(comp_path, comparisons)
        agreement = labeler_agreement(task, comparisons)
        if cfg.algorithm == "dpo":
            pass  # DPO learns from the comparisons themselves: no reward model
        elif cfg.resume and _stage_done(rm_dir):
            rm_model = load_rm(rm_dir / "model", device)
            rm_result = json.loads((rm_dir / "result.json").read_text())
        else:
            rm_trainer = RewardTrainer(stage_cfg(cfg.rm, "rm"), model=load_rm(sft_dir / "model"),
                                       tokenizer=tokenizer, train_data=comparisons, progress=progress)
            rm_result = rm_trainer.train()
            write(rm_dir / "result.json", json.dumps(rm_result))
            rm_model = plain(rm_trainer.model, rm_dir / "model", load_rm, cfg.rm)
        # on the SFT policy's held-out answers that its gold score was measured on (sampled once, used twice)
        if cfg.algorithm == "ppo":
            rm_eval = rm_gold_accuracy(rm_model, tokenizer, encoder, task, data["eval_prompts"],
                                       sft_eval["answer_ids"], k=ev.eval_samples, seed=cfg.seed + 11, device=device,
                                       packing=rm_result.get("packing", "padded"))
        times["rm_s"] = time.time() - t0
        peak_rss["rm"] = _peak_rss_gb()
    # the aligned policy's stage holds its own models; the SFT model is reloaded when needed (peak memory)
    rm_model = rm_trainer = sft_model = None
    gc.collect()

    # -- PPO-ptx, GRPO / RLOO or DPO --------------------------------------------------------
    t0 = time.time()
    ppo_dir = out / ("ppo" if cfg.algorithm == "ppo" else "grpo" if cfg.algorithm in ("grpo", "rloo") else "dpo")
    curve_prompts = data["eval_prompts"][: max(1, len(data["eval_prompts"]) // 4)]

    def evaluator(policy):
        r = gold_eval(policy, tokenizer, encoder, task, curve_prompts, num_samples=1, max_new_tokens=gen_len,
                      temperature=temp, seed=cfg.seed + 13, device=device)
        return {"gold_score": r["gold_score"]}

    if cfg.resume and _stage_done(ppo_dir):
        policy = load_lm(ppo_dir / "model", device)
        ppo_result = json.loads((ppo_dir / "result.json").read_text())
    else:
        if cfg.algorithm == "ppo":
            ppo = PPOTrainer(stage_cfg(cfg.ppo, "ppo"), policy=load_lm(sft_dir / "model"),
                             reward_model=load_rm(rm_dir / "model"), tokenizer=tokenizer,
                             prompts=data["ppo_prompts"], ptx_data=data["ptx"], evaluator=evaluator,
                             progress=progress)
            stage, trained = cfg.ppo, "actor"
        elif cfg.algorithm in ("grpo", "rloo"):
            gcfg = stage_cfg(cfg.grpo, "grpo")
            if cfg.algorithm == "rloo":
                gcfg = dataclasses.replace(gcfg, advantage="rloo")
            ppo = GRPOTrainer(gcfg, policy=load_lm(sft_dir / "model"), tokenizer=tokenizer,
                              prompts=data["ppo_prompts"], rules=[task.gold_score], evaluator=evaluator,
                              progress=progress)
            stage, trained = cfg.grpo, "actor"
        else:
            ppo = DPOTrainer(stage_cfg(cfg.dpo, "dpo"), model=load_lm(sft_dir / "model"), tokenizer=tokenizer,
                             train_data=comparisons, progress=progress)
            stage, trained = cfg.dpo, "model"
        ppo_result = ppo.train()
        write(ppo_dir / "result.json", json.dumps(ppo_result))
        policy = plain(getattr(ppo, trained), ppo_dir / "model", load_lm, stage)
    policy.eval()
    ppo = None
    gc.collect()
    sft_model = load_lm(sft_dir / "model", device).eval()  # the reference of the KL
    ppo_eval = gold_eval(policy, tokenizer, encoder, task, data["eval_prompts"], num_samples=ev.eval_samples,
                         max_new_tokens=gen_len, temperature=temp, seed=cfg.seed + 7, device=device, ref=sft_model,
                         progress=progress, desc=f"eval {cfg.algorithm}")
    ptx_loss_ppo = eval_nll(policy, encoder, data["ptx_eval"], device)
    times["ppo_s"] = time.time() - t0
    peak_rss["ppo"] = _peak_rss_gb()

    # -- summary ---------------------------------------------------------------------------
    gold_max = sum(task.gold_max(p) for p in data["eval_prompts"]) / len(data["eval_prompts"])
    g_sft, g_ppo = sft_eval["gold_score"], ppo_eval["gold_score"]
    se_sft, se_ppo = sft_eval["gold_score_se"], ppo_eval["gold_score_se"]
    diffs = [b - a for a, b in zip(sft_eval["per_prompt"], ppo_eval["per_prompt"], strict=True)]
    gap_closed = (g_ppo - g_sft) / (gold_max - g_sft) if gold_max > g_sft else 0.0
    summary = {
        "model": cfg.model.model, "model_parameters": n_params, "task": cfg.task.name,
        "algorithm": cfg.algorithm,
        "rm_accuracy": rm_eval.get("rm_accuracy"), "rm_accuracy_vs_labeler": rm_eval.get("rm_accuracy_vs_labeler"),
        "rm_eval_pairs": rm_eval.get("rm_eval_pairs"), "rm_eval_accuracy_vs_labels": rm_result.get("eval_accuracy"),
        "labeler_agreement": agreement, "rm_packing": rm_result.get("packing"),
        "gold_score_sft": g_sft, "gold_score_ppo": g_ppo, "gold_score_sft_se": se_sft, "gold_score_ppo_se": se_ppo,
        "gold_gain": g_ppo - g_sft, "gold_gain_se": math.sqrt(se_sft ** 2 + se_ppo ** 2),
        "gold_gain_paired_se": _se(diffs), "gold_score_max": gold_max, "gap_closed": gap_closed,
        "kl_per_token": ppo_eval["kl_per_token"], "kl_bound": cfg.ppo.kl_bound,
        "ptx_loss_sft": ptx_loss_sft, "ptx_loss_ppo": ptx_loss_ppo, "sft_eval_loss": sft_result.get("eval_loss"),
        "answer_words_sft": sft_eval["answer_words"], "answer_words_ppo": ppo_eval["answer_words"],
        "final_beta": ppo_result.get("beta"), "time_load_s": times["load_s"],
        "time_sft_s": times["sft_s"], "time_rm_s": times.get("rm_s", 0.0), "time_ppo_s": times["ppo_s"],
        "time_total_s": time.time() - t_start, "cpu_time_s": time.process_time() - cpu_start,
        "peak_rss_gb": _peak_rss_gb(), "peak_rss_gb_by_stage": peak_rss,
    }
    summary["targets"] = targets(summary)
    write(out / "summary.json", json.dumps(summary, indent=2))
    samples = {"sft": sft_eval["samples"], "ppo": ppo_eval["samples"]}
    write(out / "samples.json", json.dumps(samples, indent=1))
    if d.is_main:
        from rlhf_fast.pipeline import report

        report.write_report(out, summary, samples, cfg, plots=cfg.plots)
    d.barrier()
    return summary


def _peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GiB (Linux and macOS units)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 30 if sys.platform == "darwin" else peak / 2 ** 20


def _se(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def targets(s: dict) -> dict[str, bool]:
    """The run's checks: the aligned policy (PPO-ptx, or the `algorithm` of the run) beats SFT on the held-out
    gold score by 0.10 and by 3 standard errors (of the difference of the two means), the reward model (PPO
    runs) agrees with the noisy labeler on >= 70% of held-out pairs, the KL to SFT stays within its bound and
    the ptx loss within 10% of SFT's."""
    out = {"gold_gain>=0.10": s["gold_gain"] >= 0.10, "gold_gain>=3se": s["gold_gain"] >= 3 * s["gold_gain_se"]}
    if s.get("rm_accuracy_vs_labeler") is not None:
        out["rm_accuracy_vs_labeler>=0.70"] = s["rm_accuracy_vs_labeler"] >= 0.70
    out["kl_per_token<=kl_bound"] = s["kl_per_token"] <= s["kl_bound"]
    out["ptx_loss_ppo<=1.1*ptx_loss_sft"] = s["ptx_loss_ppo"] <= 1.1 * s["ptx_loss_sft"]
    return out


def format_summary(s: dict) -> str:
    name = ALGORITHM_NAMES[s.get("algorithm", "ppo")]
    rm = (f"reward model   pairwise accuracy vs the labeler {s['rm_accuracy_vs_labeler']:.3f}, vs gold "
          f"{s['rm_accuracy']:.3f} ({s['rm_eval_pairs']} held-out pairs; labeler agreement with gold "
          f"{s['labeler_agreement']:.3f}; packing {s['rm_packing']})" if s.get("rm_accuracy") is not None else
          f"reward model   none ({name}: " + ("the labeler's comparisons as preference pairs)" if s.get("algorithm")
                                              == "dpo" else "the gold rubric as a verifiable reward)"))
    lines = [
        f"model          {s['model']} ({s['model_parameters'] / 1e6:.1f}M parameters), task {s['task']}",
        rm,
        f"gold score     SFT {s['gold_score_sft']:.3f} ± {s['gold_score_sft_se']:.3f} -> {name} "
        f"{s['gold_score_ppo']:.3f} ± {s['gold_score_ppo_se']:.3f} (gain {s['gold_gain']:+.3f} ± "
        f"{s['gold_gain_se']:.3f}; max {s['gold_score_max']:.3f})",
        f"KL to SFT      {s['kl_per_token']:.4f} nats/token (bound {s['kl_bound']})",
        f"ptx loss       SFT {s['ptx_loss_sft']:.4f} -> {name} {s['ptx_loss_ppo']:.4f}",
        f"wall time      load {s['time_load_s']:.0f}s, SFT {s['time_sft_s']:.0f}s, RM {s['time_rm_s']:.0f}s, "
        f"{name} {s['time_ppo_s']:.0f}s, total {s['time_total_s']:.0f}s (process CPU time {s['cpu_time_s']:.0f}s); "
        f"peak memory {s['peak_rss_gb']:.2f} GiB",
        "targets        " + ", ".join(f"{k}: {'ok' if v else 'MISSED'}" for k, v in s["targets"].items()),
    ]
    return "\n".join(lines)
