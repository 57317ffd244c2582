"""GRPO and DPO optimizer steps: rlhf_fast's trainers with shared-prefix packing, the same trainers on padded
rows, and TRL's GRPOTrainer / DPOTrainer loss computation, on the same model, the same batch and the same
optimizer, on this machine's CPU.

    python bench/bench_group_steps.py [--layers 4] [--groups 2] [--k 8] [--prompt 256] [--answer 64] [--pairs 8]
                                      [--steps 3] [--threads 0] [--who trl padded packed] [--json out.json]

Model: SmolLM2-135M-Instruct's architecture (hidden 576, 9 / 3 heads, MLP 1536, vocabulary 49152, tied embeddings)
with ``--layers`` decoder layers, random init, fp32, the real SmolLM2 tokenizer of the tests; rlhf_fast loads it
with ``attn_implementation="rlhf_fast"``, TRL with ``sdpa`` and gradient checkpointing off (TRL's default is on;
neither side recomputes activations here). One optimizer step = loss, backward, clipping at 1.0
and ``torch.optim.AdamW``:

- GRPO: a fixed rollout of ``--groups`` prompts of ``--prompt`` tokens with ``--k`` answers of ``--answer``
  tokens (random tokens, random advantages and reference log-probs, beta 0.04, loss_type "dapo",
  num_iterations 1). TRL: ``GRPOTrainer._compute_loss(model, inputs)`` on the padded
  ``prompt_ids / completion_ids`` batch it builds itself; ours: :meth:`GRPOTrainer.update`
  (``linear_ppo_loss``), packed (each prompt and its K answers as one sequence, P + K R tokens) or padded
  (K rows ``[prompt, answer_k]``, K (P + R) tokens).
- DPO: ``--pairs`` pairs (prompt ``--prompt``, chosen / rejected ``--answer`` tokens), reference log-probs
  precomputed for both. TRL: ``DPOTrainer._compute_loss`` on its ``[chosen rows; rejected rows]`` batch with
  ``precompute_ref_log_probs``; ours: :meth:`DPOTrainer.step`, packed (``[prompt, chosen, rejected]``) or
  padded.

The first step's losses are printed side by side (same inputs, same weights: they agree). Each (algorithm,
trainer) runs in a fresh process: one warm-up step, then the median wall time of ``--steps`` steps; peak
memory = VmHWM minus VmRSS before the first step. Not run in CI.
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
PACKING = {"packed": "shared_prefix", "padded": "padded"}
WHO = ("trl", "padded", "packed")


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _data(args, tok):
    import torch

    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(100, len(tok), (n,), generator=g).tolist()

    prompts = [toks(args.prompt) for _ in range(args.groups)]
    answers = [[toks(args.answer) for _ in range(args.k)] for _ in range(args.groups)]
    n = args.groups * args.k
    ref_noise = 0.1 * torch.randn(n, args.answer, generator=g)  # the reference: the model's log-probs + noise
    adv = torch.randn(n, generator=g)
    pairs = [(toks(args.prompt), toks(args.answer), toks(args.answer)) for _ in range(args.pairs)]
    pair_ref = -torch.rand(args.pairs, 2, generator=g) * 100
    return prompts, answers, ref_noise, adv, pairs, pair_ref


def _reference(model, prompts, answers, ref_noise):
    """(n, answer) the model's own log-probs of the answers (plain forward, no grad) + ref_noise."""
    import torch

    ids = torch.tensor([p + a for p, ans in zip(prompts, answers, strict=True) for a in ans])
    plen = len(prompts[0])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, plen - 1:-1].float(), -1)
    return lp.gather(-1, ids[:, plen:, None])[..., 0] + ref_noise


def _model(args, tok, attn):
    from rlhf_fast.pipeline import common as C

    m = C.build_tiny_llama(tok, hidden_size=576, intermediate_size=1536, num_layers=args.layers, num_heads=9,
                           num_kv_heads=3, seed=0, tie_word_embeddings=True)
    if attn != C.ATTN:
        m.set_attn_implementation(attn)
    return m


def ours(args, tok, d):
    import torch

    from rlhf_fast.pipeline.config import DPOConfig, GRPOConfig
    from rlhf_fast.pipeline.dpo import DPOTrainer
    from rlhf_fast.pipeline.grpo import GRPOTrainer

    prompts, answers, ref, adv, pairs, pair_ref = _data(args, tok)
    model = _model(args, tok, "rlhf_fast")
    ref = _reference(model, prompts, answers, ref)
    if args.algo == "grpo":
        tr = GRPOTrainer(GRPOConfig(model="given", output_dir=d, device="cpu", beta=0.04, num_generations=args.k,
                                    packing=PACKING[args.who],
                                    prompts_per_iteration=args.groups, lr=1e-5, loss_type="dapo"),
                         policy=model, tokenizer=tok, prompts=[{"prompt": "x"}], rules=[lambda p, r: 0.0],
                         progress=False)
        lengths = torch.full((args.groups * args.k,), args.answer)
        with torch.no_grad():
            from rlhf_fast.pipeline.rl import answer_logprobs
            old = answer_logprobs(tr.actor, prompts, answers, tr.packing, tok.pad_token_id, "cpu", 1.0)
        ro = {"prompts": prompts, "answers": answers, "lengths": lengths,
              "offsets": torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]), "old": old, "ref": ref.reshape(-1),
              "adv": adv}

        def step():
            return tr.update(ro, list(range(args.groups)))["loss"]
    else:
        data = [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}]
        tr = DPOTrainer(DPOConfig(model="given", output_dir=d, device="cpu", eval_fraction=0.0, batch_size=1,
                                  lr=1e-5, packing=PACKING[args.who]),
                        model=model, tokenizer=tok, train_data=data, progress=False)
        tr.train_rows, tr.train_ref = pairs, pair_ref

        def step():
            return tr.step(list(range(args.pairs)))["loss"]
    return step


def trl_side(args, tok, d):
    import torch
    from datasets import Dataset

    from rlhf_fast.pipeline import common as C

    prompts, answers, ref, adv, pairs, pair_ref = _data(args, tok)
    path = f"{d}/model"  # TRL builds its reference model from the policy's path: give it one
    C.save_model(_model(args, tok, "sdpa"), tok, path)
    init = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if args.algo == "grpo":
        import trl

        n = args.groups * args.k
        cfg = trl.GRPOConfig(output_dir=d, per_device_train_batch_size=n, num_generations=args.k, beta=0.04,
                             max_completion_length=args.answer, loss_type="dapo", use_cpu=True, report_to=[],
                             bf16=False, logging_steps=10 ** 6, save_strategy="no", model_init_kwargs=init,
                             gradient_checkpointing=False)
        tr = trl.GRPOTrainer(model=path, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                             args=cfg, train_dataset=Dataset.from_list([{"prompt": "x"}] * n),
                             processing_class=tok)
        model = tr.model
        tr.current_gradient_accumulation_steps = 1  # what Trainer.training_step sets: one micro-batch per step
        ref = _reference(model, prompts, answers, ref)
        pid = torch.tensor([p for p in prompts for _ in range(args.k)])
        cid = torch.tensor([a for ans in answers for a in ans])
        inputs = {"prompt_ids": pid, "prompt_mask": torch.ones_like(pid), "completion_ids": cid,
                  "completion_mask": torch.ones_like(cid), "advantages": adv, "ref_per_token_logps": ref,
                  "num_items_in_batch": torch.tensor(float(cid.numel()))}
        model.train()

        def loss_fn():
            return tr._compute_loss(model, inputs)
    else:
        import trl

        cfg = trl.DPOConfig(output_dir=d, per_device_train_batch_size=args.pairs, use_cpu=True, report_to=[],
                            bf16=False, logging_steps=10 ** 6, save_strategy="no", precompute_ref_log_probs=True,
                            model_init_kwargs=init, gradient_checkpointing=False)
        rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * args.pairs
        tr = trl.DPOTrainer(model=path, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
        model = tr.model
        seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
        ids = torch.tensor(seqs)
        comp = torch.zeros_like(ids)
        comp[:, args.prompt:] = 1
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": comp,
                  "ref_chosen_logps": pair_ref[:, 0], "ref_rejected_logps": pair_ref[:, 1]}
        tr.precompute_ref_logps = True
        model.train()

        def loss_fn():
            return tr._compute_loss(model, inputs, return_outputs=False)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)
    return step


def worker(args) -> dict:
    import torch

    from rlhf_fast.pipeline import common as C

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = C.load_tokenizer(str(ASSETS))
    with tempfile.TemporaryDirectory() as d:
        step = (trl_side if args.who == "trl" else ours)(args, tok, d)
        rss0 = _kb("VmRSS")
        first = float(step())
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"algo": args.algo, "who": args.who, "ms": 1000 * statistics.median(times),
            "peak_mib": (_kb("VmHWM") - rss0) / 1024, "first_loss": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("layers", 4), ("groups", 2), ("k", 8), ("prompt", 256), ("answer", 64), ("pairs", 8),
                          ("steps", 3), ("threads", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--who", nargs="+", default=list(WHO), choices=WHO, help="which steps to run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--algo", default="grpo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.who = args.who[0]
        print(json.dumps(worker(args)))
        return
    common = [f"--{k}={getattr(args, k)}" for k in ("layers", "groups", "k", "prompt", "answer", "pairs", "steps",
                                                     "threads")]
    rows = []
    for algo in ("grpo", "dpo"):
        for who in args.who:
            out = subprocess.run([sys.executable, __file__, "--worker", f"--algo={algo}", "--who", who, *common],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode:
                sys.exit(f"{algo}/{who} failed:\n{out.stderr[-4000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {(r["algo"], r["who"]): r for r in rows}
    print("| step | " + " | ".join(f"{w} ms | {w} peak MiB | {w} first loss" for w in args.who) + " |")
    print("|---|" + "---:|---:|---:|" * len(args.who))
    for algo, what in (("grpo", f"GRPO, {args.groups} prompts x K={args.k}, prompt {args.prompt}, answers "
                                f"{args.answer}"),
                       ("dpo", f"DPO, {args.pairs} pairs, prompt {args.prompt}, answers {args.answer}")):
        cells = [f"{by[(algo, w)]['ms']:.0f} | {by[(algo, w)]['peak_mib']:.0f} | {by[(algo, w)]['first_loss']:.5f}"
                 for w in args.who]
        print(f"| {what} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
