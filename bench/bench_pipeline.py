"""PPO step time of the pipeline with rlhf_fast's ops vs the same pipeline forced to the ``torch``
reference backend (RLHF_FAST_BACKEND=torch), on a tiny Llama and the topics task, or (--model) on a real
model with the embedded run's PPO-ptx settings (LoRA r16 in the last 10 layers, 8 prompts x 4 answers of
up to 32 tokens, minibatch 16, ptx batch 4) on the constraints task's prompts.

    python bench/bench_pipeline.py [--steps 5] [--hidden 256] [--layers 4] [--vocab 32000] [--batch 16] [--samples 4]
    python bench/bench_pipeline.py --model default [--steps 3]

Each backend runs in a fresh process (the environment variable is read at dispatch) with the same seed;
one warm-up step, then the median of --steps PPO iterations, split into sampling, scoring (log-probs of
the policy and the reference, values, reward model, GAE) and the update, with answer tokens per second.
With --model the reward model is the policy's own weights under a fresh scalar head (its cost is what
counts here). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def worker(args) -> None:
    import torch

    from rlhf_fast.pipeline import common as C
    from rlhf_fast.pipeline.config import PPOConfig
    from rlhf_fast.pipeline.ppo import PPOTrainer
    from rlhf_fast.pipeline.task import TopicTask, build_tokenizer, sft_examples

    if args.model:
        return real_model_worker(args)
    tok = build_tokenizer()
    if args.vocab > len(tok):  # a real LM's vocabulary size: the lm_head's share of the step grows with it
        tok.add_tokens([f"<extra_{i}>" for i in range(args.vocab - len(tok))])
    policy = C.build_tiny_llama(tok, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                num_layers=args.layers, num_heads=4, num_kv_heads=2, seed=0)
    with tempfile.TemporaryDirectory() as d:
        C.save_model(policy, tok, f"{d}/base")
        rm = C.load_scalar_model(f"{d}/base", pad_token_id=tok.pad_token_id)
        g = torch.Generator().manual_seed(0)
        task = TopicTask()
        cfg = PPOConfig(output_dir=f"{d}/ppo", prompts_per_iteration=args.batch, samples_per_prompt=args.samples,
                        minibatch_size=args.batch * args.samples // 2, device="cpu", eval_every=0)
        tr = PPOTrainer(cfg, policy=policy, reward_model=rm, tokenizer=tok,
                        prompts=[{"prompt": p} for p in task.prompts(256, g)], ptx_data=sft_examples(task, 256, g),
                        progress=False)
        print(json.dumps(timed_steps(tr, args.steps)))


def timed_steps(tr, steps: int) -> dict:
    """Medians over `steps` PPO iterations (after one warm-up) of the step, its parts, and answer tokens/s."""
    tr.step()  # warm-up
    rows = {k: [] for k in ("step_s", "sample_s", "score_s", "update_s", "tokens_per_s")}
    for _ in range(steps):
        st = tr.step()
        rows["step_s"].append(st["step_s"])
        rows["sample_s"].append(st["sample_s"])
        rows["score_s"].append(st["rollout_s"] - st["sample_s"])
        rows["update_s"].append(st["step_s"] - st["rollout_s"])
        n_tokens = st["answer_len"] * tr.config.prompts_per_iteration * tr.config.samples_per_prompt
        rows["tokens_per_s"].append(n_tokens / st["step_s"])
    return {k: statistics.median(v) for k, v in rows.items()}


def real_model_worker(args) -> None:
    import torch

    from rlhf_fast.pipeline import common as C
    from rlhf_fast.pipeline.config import DEMO, PPOConfig
    from rlhf_fast.pipeline.constraints import ConstraintTask
    from rlhf_fast.pipeline.models import DEFAULT_MODEL, resolve_model
    from rlhf_fast.pipeline.ppo import PPOTrainer
    from rlhf_fast.pipeline.task import TopicTask

    path = resolve_model(DEFAULT_MODEL if args.model == "default" else args.model, progress=False)
    tok = C.load_tokenizer(path, progress=False)
    policy = C.load_causal_lm(path, progress=False)
    rm = C.load_scalar_model(path, pad_token_id=tok.pad_token_id, progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt": p} for p in ConstraintTask().prompts(256, g)]
    with tempfile.TemporaryDirectory() as d:
        cfg = PPOConfig(**(DEMO["ppo"] | {"output_dir": f"{d}/ppo", "device": "cpu",
                                          "shared_trunk": bool(args.shared_trunk)}))
        tr = PPOTrainer(cfg, policy=policy, reward_model=rm, tokenizer=tok, prompts=prompts,
                        ptx_data=TopicTask().ptx_texts(256, g), progress=False)
        print(json.dumps(timed_steps(tr, args.steps)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=0,
                    help="grow the task's word-level vocabulary to this size with extra tokens (0: as built)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per iteration")
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--model", default="",
                    help="a real model (path, hub id or 'default': the embedded SmolLM2-135M-Instruct) with the "
                         "embedded run's PPO-ptx settings; the tiny-Llama options are then unused")
    ap.add_argument("--shared-trunk", type=int, default=1,
                    help="--model: 1 to run the frozen layers below the LoRA layers once per rollout for every "
                         "network (PPOConfig.shared_trunk), 0 for full forwards; both are measured when 1")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    rows = {}
    variants = [("rlhf_fast", {}, []), ("torch", {"RLHF_FAST_BACKEND": "torch"}, [])]
    if args.model and args.shared_trunk:
        variants.insert(1, ("rlhf_fast, no shared trunk", {}, ["--shared-trunk", "0"]))
    for name, env, extra in variants:
        e = {k: v for k, v in os.environ.items() if k != "RLHF_FAST_BACKEND"} | env
        out = subprocess.run([sys.executable, __file__, "--worker", *(argv or sys.argv[1:]), *extra], env=e,
                             check=True, capture_output=True, text=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    print("| backend | PPO step ms | sampling ms | scoring ms | update ms | answer tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {1e3 * r['step_s']:.0f} | {1e3 * r['sample_s']:.0f} | {1e3 * r['score_s']:.0f} | "
              f"{1e3 * r['update_s']:.0f} | {r['tokens_per_s']:.1f} |")
    ours = rows["rlhf_fast"]
    for name in (n for n in rows if n != "rlhf_fast"):
        print(f"speed-up vs {name}: " + ", ".join(
            f"{part} {rows[name][k] / ours[k]:.2f}x" for part, k in
            (("step", "step_s"), ("sampling", "sample_s"), ("scoring", "score_s"), ("update", "update_s"))))

if __name__ == "__main__":
    main()
