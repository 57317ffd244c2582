"""Shared-prefix packing vs padded rows in the GRPO and DPO training steps of rlhf_fast's trainers.

    python bench/bench_packing.py [--layers 4] [--groups 2] [--k 8] [--prompt 256] [--answer 64] [--pairs 8]
                                  [--steps 3] [--threads 0] [--json out.json]

Model: SmolLM2-135M-Instruct's architecture (hidden 576, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152, tied
embeddings) with ``--layers`` decoder layers, random init, fp32, ``attn_implementation="rlhf_fast"``; the real
SmolLM2 tokenizer of the tests. GRPO: one optimizer step of :meth:`GRPOTrainer.update` on a fixed rollout of
``--groups`` prompts of ``--prompt`` tokens with ``--k`` answers of ``--answer`` tokens each (random tokens;
beta 0.04, so the k3 KL term runs too). DPO: one :meth:`DPOTrainer.step` on ``--pairs`` pairs (prompt
``--prompt`` tokens, chosen and rejected ``--answer`` tokens). Packed: each prompt and its answers as one
sequence ``[prompt, answer_1, ..., answer_K]`` (P + K R tokens); padded: K rows ``[prompt, answer_k]``
(K (P + R) tokens).

Each (algorithm, packing) runs in a fresh process: one warm-up step, then the median wall time of ``--steps``
steps; peak memory = the process's peak resident set (VmHWM) minus its resident set before the first step.
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets" / "smollm2_tokenizer"


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(args) -> dict:
    import torch

    from rlhf_fast.pipeline import common as C
    from rlhf_fast.pipeline.config import DPOConfig, GRPOConfig
    from rlhf_fast.pipeline.dpo import DPOTrainer
    from rlhf_fast.pipeline.grpo import GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = C.load_tokenizer(str(ASSETS))
    model = C.build_tiny_llama(tok, hidden_size=576, intermediate_size=1536, num_layers=args.layers, num_heads=9,
                               num_kv_heads=3, seed=0, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(100, len(tok), (n,), generator=g).tolist()

    with tempfile.TemporaryDirectory() as d:
        if args.algo == "grpo":
            tr = GRPOTrainer(GRPOConfig(model="given", output_dir=d, device="cpu", packing=args.packing, beta=0.04,
                                        num_generations=args.k, prompts_per_iteration=args.groups, lr=1e-5),
                             policy=model, tokenizer=tok, prompts=[{"prompt": "x"}], rules=[lambda p, r: 0.0],
                             progress=False)
            n = args.groups * args.k
            lengths = torch.full((n,), args.answer)
            ro = {"prompts": [toks(args.prompt) for _ in range(args.groups)],
                  "answers": [[toks(args.answer) for _ in range(args.k)] for _ in range(args.groups)],
                  "lengths": lengths, "offsets": torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]),
                  "old": -torch.rand(n * args.answer, generator=g) * 5,
                  "ref": -torch.rand(n * args.answer, generator=g) * 5,
                  "adv": torch.randn(n, generator=g)}

            def step():
                tr.update(ro, list(range(args.groups)))
        else:
            data = [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}]
            tr = DPOTrainer(DPOConfig(model="given", output_dir=d, device="cpu", packing=args.packing,
                                      eval_fraction=0.0, batch_size=1), model=model, tokenizer=tok, train_data=data,
                            progress=False)
            tr.train_rows = [(toks(args.prompt), toks(args.answer), toks(args.answer)) for _ in range(args.pairs)]
            tr.train_ref = -torch.rand(args.pairs, 2, generator=g) * 100

            def step():
                tr.step(list(range(args.pairs)))
        assert tr.packing == args.packing
        rss0 = _kb("VmRSS")
        step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"algo": args.algo, "packing": args.packing, "ms": 1000 * statistics.median(times),
            "peak_mib": (_kb("VmHWM") - rss0) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--answer", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--algo", default="grpo", help=argparse.SUPPRESS)
    ap.add_argument("--packing", default="shared_prefix", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    common = [f"--{k}={getattr(args, k)}" for k in ("layers", "groups", "k", "prompt", "answer", "pairs", "steps",
                                                     "threads")]
    for algo in ("grpo", "dpo"):
        for packing in ("padded", "shared_prefix"):
            out = subprocess.run([sys.executable, __file__, "--worker", f"--algo={algo}", f"--packing={packing}",
                                  *common], check=True, capture_output=True, text=True, env=os.environ)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {(r["algo"], r["packing"]): r for r in rows}
    print("| step | padded ms | packed ms | speed-up | padded peak MiB | packed peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for algo, what in (("grpo", f"GRPO update, {args.groups} prompts x K={args.k}, prompt {args.prompt}, answers "
                                f"{args.answer}"),
                       ("dpo", f"DPO step, {args.pairs} pairs, prompt {args.prompt}, answers {args.answer}")):
        a, b = by[(algo, "padded")], by[(algo, "shared_prefix")]
        print(f"| {what} | {a['ms']:.0f} | {b['ms']:.0f} | {a['ms'] / b['ms']:.2f}x | {a['peak_mib']:.0f} | "
              f"{b['peak_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
