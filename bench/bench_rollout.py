"""Rollout speed on a real model: ``model.generate`` vs :func:`rlhf_fast.pipeline.rollout.fast_sample`.

    python bench/bench_rollout.py [--model DIR_OR_HUB_ID] [--batch 16] [--new-tokens 32] [--runs 5]

The model defaults to the pipeline's (SmolLM2-135M-Instruct, resolved as the pipeline does: local, cache,
hub, or the package index's GGUF copy converted once).

B chat-templated prompts of ~30-60 tokens, left-padded, `--new-tokens` sampled at temperature 1
(top_p 1, top_k 0), one answer per prompt. Each run times generate, then fast_sample, then fast_sample
with the shared-prompt-prefix prefill switched off (the chat template's header and system prompt, which
every prompt begins with, then runs once per row as in generate), then one teacher-forced forward over
the same tokens fast_sample produced (for scale); they alternate run by run, so a slow spell on a shared
machine hits all of them. Prints medians and the ratio of
the per-run medians. Tokens/s counts B x new tokens (both paths run all N steps unless every row stops).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

QUESTIONS = [
    "What is the capital of France, and why did it become the capital?",
    "Explain in two sentences how a rainbow forms after a summer storm.",
    "Write a short poem about a cat sleeping in the sun on a windowsill.",
    "Give me three tips for learning to play the guitar as an adult beginner.",
    "Why is the sky blue during the day but red at sunset?",
    "Summarize the plot of a story where a robot learns to paint landscapes.",
    "How do vaccines train the immune system to recognize a virus?",
    "List some healthy breakfast ideas that take less than five minutes.",
    "What are the main differences between a crocodile and an alligator?",
    "Describe the water cycle to a ten year old child in simple words.",
    "Suggest a name for a small bakery that specializes in sourdough bread and pastries.",
    "How can I politely decline an invitation to a party this weekend?",
    "Explain what a black hole is and how scientists detect them from Earth.",
    "What should I pack for a three day hiking trip in the mountains in autumn?",
    "Translate 'good morning, how are you today?' into Spanish and French.",
    "Why do leaves change color in the fall, and which trees turn red?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the pipeline's default model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.pipeline import rollout
    from rlhf_fast.pipeline.models import DEFAULT_MODEL, resolve_model
    from rlhf_fast.pipeline.rollout import _shared_prefix, fast_sample

    args.model = resolve_model(args.model or DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop_ids = sorted({tok.eos_token_id, *([tok.convert_tokens_to_ids("<|im_end|>")]
                                           if "<|im_end|>" in tok.get_vocab() else [])})
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                       add_generation_prompt=True, tokenize=True) for i in range(args.batch)]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    p_len = max(len(p) for p in prompts)
    ids = torch.full((args.batch, p_len), pad_id, dtype=torch.long)
    mask = torch.zeros(args.batch, p_len, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p):] = torch.tensor(p)
        mask[i, p_len - len(p):] = 1
    n_new = args.new_tokens
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params; batch {args.batch}, "
          f"prompt tokens {min(map(len, prompts))}-{p_len} (padded {p_len}), {n_new} new tokens, "
          f"{torch.get_num_threads()} threads")

    gen = torch.Generator().manual_seed(args.seed)

    def run_generate():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad_id,
                                 eos_token_id=stop_ids, use_cache=True)
        return out.shape[1] - p_len

    def run_fast():
        r = fast_sample(model, ids, mask, num_samples=1, max_new_tokens=n_new, temperature=1.0, top_p=1.0,
                        stop_ids=[], pad_id=pad_id, generator=gen)
        assert r.engine == "decoder_loop", r.fallback_reason
        return r

    def run_unshared():
        saved = rollout.SHARED_PREFIX_MIN_SAVED
        rollout.SHARED_PREFIX_MIN_SAVED = 1 << 62
        try:
            return run_fast()
        finally:
            rollout.SHARED_PREFIX_MIN_SAVED = saved

    def run_forward(seq, seq_mask):
        with torch.inference_mode():
            model(input_ids=seq, attention_mask=seq_mask, position_ids=(seq_mask.cumsum(-1) - 1).clamp_min(0))

    # stop tokens are switched off on both sides (min_new_tokens / stop_ids=[]) so that both run N steps
    # and the comparison does not depend on which samples happen to end early
    run_generate()
    r = run_fast()
    print(f"shared prompt prefix (run once): {_shared_prefix(ids, mask.bool())} tokens")
    times = {"generate": [], "fast_sample": [], "no_shared_prefix": [], "forward": []}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        n_gen = run_generate()
        times["generate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = run_fast()
        times["fast_sample"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_unshared()
        times["no_shared_prefix"].append(time.perf_counter() - t0)
        seq = torch.cat([ids, r.tokens], 1)
        seq_mask = torch.cat([mask, torch.ones_like(r.tokens)], 1)
        t0 = time.perf_counter()
        run_forward(seq, seq_mask)
        times["forward"].append(time.perf_counter() - t0)
        assert n_gen == n_new and r.tokens.shape[1] == n_new
    total = args.batch * n_new
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [g / f for g, f in zip(times["generate"], times["fast_sample"], strict=True)]
    for k in ("generate", "fast_sample", "no_shared_prefix"):
        print(f"{k:16s} median {med[k]:.3f} s ({total / med[k]:.0f} tokens/s)  runs {[round(t, 3) for t in times[k]]}")
    print(f"{'forward':16s} median {med['forward']:.3f} s  (one teacher-forced forward over "
          f"{args.batch} x {p_len + n_new} tokens)  runs {[round(t, 3) for t in times['forward']]}")
    print(f"speed-up over generate: {med['generate'] / med['fast_sample']:.2f}x (median of per-run ratios "
          f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x); without the shared "
          f"prefix {med['generate'] / med['no_shared_prefix']:.2f}x")


if __name__ == "__main__":
    main()
