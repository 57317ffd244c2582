"""PPO step time of the pipeline with rlhf_fast's ops vs the same pipeline forced to the ``torch``
reference backend (RLHF_FAST_BACKEND=torch), on a tiny Llama and the embedded task.

    python bench/bench_pipeline.py [--steps 5] [--hidden 256] [--layers 4] [--vocab 32000] [--batch 16] [--samples 4]

Each backend runs in a fresh process (the environment variable is read at dispatch) with the same seed;
one warm-up step, then the median of --steps PPO iterations (rollout + update). Not run in CI.
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
        tr.step()  # warm-up
        times, updates = [], []
        for _ in range(args.steps):
            st = tr.step()
            times.append(st["step_s"])
            updates.append(st["step_s"] - st["rollout_s"])
    print(json.dumps({"step_s": statistics.median(times), "update_s": statistics.median(updates)}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=0,
                    help="grow the task's word-level vocabulary to this size with extra tokens (0: as built)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per iteration")
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    rows = {}
    for name, env in (("rlhf_fast", {}), ("torch", {"RLHF_FAST_BACKEND": "torch"})):
        e = {k: v for k, v in os.environ.items() if k != "RLHF_FAST_BACKEND"} | env
        out = subprocess.run([sys.executable, __file__, "--worker", *(argv or sys.argv[1:])], env=e, check=True,
                             capture_output=True, text=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    print("| backend | PPO step ms | update ms |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {1e3 * r['step_s']:.0f} | {1e3 * r['update_s']:.0f} |")
    print(f"step speed-up vs torch backend: {rows['torch']['step_s'] / rows['rlhf_fast']['step_s']:.2f}x "
          f"(update only: {rows['torch']['update_s'] / rows['rlhf_fast']['update_s']:.2f}x)")


if __name__ == "__main__":
    main()
