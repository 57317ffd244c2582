"""Evaluation on held-out prompts: gold score of a policy's samples (default task), reward-model pairwise
accuracy against the noise-free gold preference, per-token KL to the SFT policy, ptx loss."""

from __future__ import annotations

import itertools

import torch

from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline.generation import sample
from rlhf_fast.pipeline.task import TopicTask


@torch.no_grad()
def policy_samples(policy, tokenizer, encoder, prompts: list[str], *, num_samples: int, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int, device):
    """Samples of `policy` for `prompts` with a fixed seed (the caller's RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return sample(policy, [encoder.prompt(p) for p in prompts], num_samples=num_samples,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, device=device)


@torch.no_grad()
def gold_eval(policy, tokenizer, encoder, task: TopicTask, prompts: list[str], *, num_samples: int,
              max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, device,
              ref=None) -> dict:
    """Mean gold score of the policy's answers to `prompts` (and, with `ref`, the mean per-token KL
    log pi - log ref over those answers, a Monte-Carlo estimate of KL(pi || ref))."""
    s = policy_samples(policy, tokenizer, encoder, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed, device=device)
    texts = s.texts(tokenizer)
    gold = [task.gold_score(prompts[i], t) for i, t in zip(s.prompt_index.tolist(), texts, strict=True)]
    out = {"gold_score": sum(gold) / len(gold),
           "answer_words": sum(len(t.split()) for t in texts) / len(texts),
           "samples": [{"prompt": prompts[i], "response": t, "gold": g}
                       for i, t, g in zip(s.prompt_index.tolist(), texts, gold, strict=True)]}
    if ref is not None:
        lp = C.token_logprobs(policy, s.input_ids, s.attention_mask, s.labels, temperature)
        lr = C.token_logprobs(ref, s.input_ids, s.attention_mask, s.labels, temperature)
        out["kl_per_token"] = float(((lp - lr) * s.response_mask).sum() / s.response_mask.sum().clamp_min(1))
    return out


@torch.no_grad()
def rm_gold_accuracy(reward_model, sft_policy, tokenizer, encoder, task: TopicTask, prompts: list[str], *, k: int,
                     max_new_tokens: int, seed: int, device, packing: str = "shared_prefix") -> dict:
    """Pairwise accuracy of the reward model against the noise-free gold preference on K answers sampled
    from the SFT policy per held-out prompt (pairs with equal gold scores are left out)."""
    from rlhf_fast.pipeline.reward import score_answers

    s = policy_samples(sft_policy, tokenizer, encoder, prompts, num_samples=k, max_new_tokens=max_new_tokens,
                       temperature=1.0, top_p=1.0, seed=seed, device=device)
    texts = s.texts(tokenizer)
    was = reward_model.training
    reward_model.eval()
    prompt_ids = [encoder.prompt(p) for p in prompts]
    answers = [s.responses[i * k:(i + 1) * k] for i in range(len(prompts))]
    scores = score_answers(reward_model, prompt_ids, answers, packing, tokenizer.pad_token_id, device).tolist()
    reward_model.train(was)
    correct = pairs = 0
    for i, p in enumerate(prompts):
        gold = [task.gold_score(p, texts[i * k + j]) for j in range(k)]
        for a, b in itertools.combinations(range(k), 2):
            if abs(gold[a] - gold[b]) < 1e-9:
                continue
            pairs += 1
            correct += (scores[i * k + a] > scores[i * k + b]) == (gold[a] > gold[b])
    return {"rm_accuracy": correct / max(1, pairs), "rm_eval_pairs": pairs}


def labeler_agreement(task: TopicTask, rows: list[dict]) -> float:
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
