"""Evaluation on held-out prompts: gold score of a policy's samples (default task), reward-model pairwise
accuracy against the noise-free gold preference, per-token KL to the SFT policy, ptx loss."""

from __future__ import annotations

import itertools
import math

import torch

from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline.generation import sample


@torch.no_grad()
def policy_samples(policy, tokenizer, encoder, prompts: list[str], *, num_samples: int, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int, device, return_logprobs: bool = False):
    """Samples of `policy` for `prompts` with a fixed seed (the caller's RNG state is left as it was),
    stopping at the chat template's end of turn or eos."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return sample(policy, [encoder.prompt(p) for p in prompts], num_samples=num_samples,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      pad_id=tokenizer.pad_token_id, eos_id=encoder.stop_ids, device=device,
                      return_logprobs=return_logprobs)


@torch.no_grad()
def gold_eval(policy, tokenizer, encoder, task, prompts: list[str], *, num_samples: int, max_new_tokens: int,
              temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, device, ref=None, batch: int = 32,
              progress: bool = False, desc: str = "eval") -> dict:
    """Mean gold score of the policy's answers to `prompts`, its standard error over the prompts (each
    prompt's mean over its samples is one observation), the answers (``answer_ids``: token ids, prompt-major,
    `num_samples` per prompt) and, with `ref`, the mean per-token KL log pi - log ref over those answers (a
    Monte-Carlo estimate of KL(pi || ref); log pi is the sampler's own log-prob of each sampled token in
    fp32, a forward of `policy` otherwise)."""
    gold, texts_all, rows, answer_ids, kl_sum, kl_n = [], [], [], [], 0.0, 0.0
    fp32 = next(policy.parameters()).dtype == torch.float32
    for start in C.progress_range(len(prompts), batch, desc, progress):
        chunk = prompts[start: start + batch]
        s = policy_samples(policy, tokenizer, encoder, chunk, num_samples=num_samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=C.step_seed(seed, start), device=device,
                           return_logprobs=ref is not None and fp32)
        texts = s.texts(tokenizer)
        answer_ids += s.responses
        for i, t in zip(s.prompt_index.tolist(), texts, strict=True):
            g = task.gold_score(chunk[i], t)
            gold.append(g)
            texts_all.append(t)
            rows.append({"prompt": chunk[i], "response": t, "gold": g})
        if ref is not None:
            lp = s.logprobs if s.logprobs is not None else \
                C.token_logprobs(policy, s.input_ids, s.attention_mask, s.labels, temperature)
            lr = C.token_logprobs(ref, s.input_ids, s.attention_mask, s.labels, temperature)
            kl_sum += float(((lp - lr) * s.response_mask).sum())
            kl_n += float(s.response_mask.sum())
    per_prompt = [sum(gold[i * num_samples:(i + 1) * num_samples]) / num_samples for i in range(len(prompts))]
    n = len(per_prompt)
    mean = sum(per_prompt) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / (n - 1) / n) if n > 1 else 0.0
    out = {"gold_score": sum(gold) / len(gold), "gold_score_se": se, "per_prompt": per_prompt,
           "answer_words": sum(len(t.split()) for t in texts_all) / len(texts_all), "samples": rows,
           "answer_ids": answer_ids}
    if ref is not None:
        out["kl_per_token"] = kl_sum / max(1.0, kl_n)
    return out


@torch.no_grad()
def rm_gold_accuracy(reward_model, tokenizer, encoder, task, prompts: list[str], answer_ids: list[list[int]], *,
                     k: int, seed: int, device, packing: str = "shared_prefix") -> dict:
    """Pairwise accuracy of the reward model on `k` answers per held-out prompt (`answer_ids`: token ids,
    prompt-major, e.g. the SFT policy's answers that :func:`gold_eval` scored): against the noise-free gold
    preference (pairs with equal gold scores are left out) and against the simulated labeler's noisy
    ranking of the same answers (every pair)."""
    from rlhf_fast.pipeline.reward import score_answers

    if k < 2 or len(answer_ids) != k * len(prompts):
        raise ValueError(f"answer_ids: expected k >= 2 answers for each of the {len(prompts)} prompts, got "
                         f"{len(answer_ids)} answers for k = {k}")
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answer_ids]
    was = reward_model.training
    reward_model.eval()
    prompt_ids = [encoder.prompt(p) for p in prompts]
    answers = [answer_ids[i * k:(i + 1) * k] for i in range(len(prompts))]
    scores = score_answers(reward_model, prompt_ids, answers, packing, tokenizer.pad_token_id, device).tolist()
    reward_model.train(was)
    correct = pairs = agree = 0
    g = torch.Generator().manual_seed(C.step_seed(seed, 400))
    for i, p in enumerate(prompts):
        gold = [task.gold_score(p, texts[i * k + j]) for j in range(k)]
        ranks = task.rank(p, texts[i * k:(i + 1) * k], g)
        for a, b in itertools.combinations(range(k), 2):
            agree += (scores[i * k + a] > scores[i * k + b]) == (ranks[a] < ranks[b])
        for a, b in itertools.combinations(range(k), 2):
            if abs(gold[a] - gold[b]) < 1e-9:
                continue
            pairs += 1
            correct += (scores[i * k + a] > scores[i * k + b]) == (gold[a] > gold[b])
    n_all = len(prompts) * k * (k - 1) // 2
    return {"rm_accuracy": correct / max(1, pairs), "rm_eval_pairs": pairs,
            "rm_accuracy_vs_labeler": agree / max(1, n_all)}


def labeler_agreement(task, rows: list[dict]) -> float:
    """Fraction of the labeler's ranked pairs that agree with the noise-free gold preference."""
    agree = pairs = 0
    for r in rows:
        gold = [task.gold_score(r["prompt"], a) for a in r["responses"]]
        for a, b in itertools.combinations(range(len(gold)), 2):
            if abs(gold[a] - gold[b]) < 1e-9:
                continue
            pairs += 1
            agree += (r["ranking"][a] < r["ranking"][b]) == (gold[a] > gold[b])
    return agree / max(1, pairs)
