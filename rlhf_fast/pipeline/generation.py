"""Sampling answers with transformers' ``generate`` (sampling, temperature, top-p, KV cache), and the
padded rollout tensors the PPO step and evaluation read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_fast.pipeline.data import IGNORE, pad_left


@dataclass
class Samples:
    """Generated answers, one row per (prompt, sample), prompts left-padded, answers right-padded.

    input_ids       (B, P + N) prompt then answer tokens (pad after the answer's eos)
    attention_mask  (B, P + N) 1 on prompt and answer tokens (the eos included)
    response_mask   (B, P + N - 1) bool, True where position t predicts an answer token
                    (labels[:, t] = input_ids[:, t+1])
    labels          (B, P + N - 1) next tokens on the answer, -100 elsewhere
    last_index      (B,) index of each answer's last token in input_ids
    prompt_index    (B,) which prompt each row answers
    responses       answer token ids (eos included when generated) per row
    logprobs        (B, P + N - 1) fp32 or None: with ``return_logprobs``, the sampler's log-prob of each answer
                    token at the sampling temperature (``log_softmax(logits / T)``, before top-p), where
                    response_mask is True, 0 elsewhere
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    labels: Tensor
    last_index: Tensor
    prompt_index: Tensor
    responses: list[list[int]]
    logprobs: Tensor | None = None

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(r, skip_special_tokens=True) for r in self.responses]


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, pad_id: int, eos_id: int | list[int], device, return_logprobs: bool = False
           ) -> Samples:
    """`num_samples` answers per prompt (rows grouped by prompt), sampled by :func:`rollout.fast_sample`
    (``model.generate`` for the models its decode loop cannot serve, and for FSDP). An answer ends at
    its first stop token (`eos_id`: one id or several, e.g. the chat template's end of turn and eos), which
    it keeps; what follows is padding. The pad id may equal a stop id: the answer's length, not the pad id,
    decides what is padding.

    An FSDP2-sharded model gathers each layer's weights at every decoding step, a collective: then
    ``generate(synced_gpus=True)`` keeps every rank stepping until all ranks' answers are finished (ranks
    that finished early run dummy steps), as transformers does for DeepSpeed ZeRO-3; that path returns no
    log-probs (``Samples.logprobs`` None whatever `return_logprobs` says)."""
    from rlhf_fast.pipeline.distributed import is_fsdp

    synced = is_fsdp(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    stops = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    was = model.training
    model.eval()
    ids, mask = pad_left(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    if synced:
        from transformers import GenerationConfig

        # an explicit config: the model's own generation_config.json (repetition penalty, top-k ...) would
        # change the sampling distribution away from the one the log-probs are taken under
        gen_cfg = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                   max_new_tokens=max_new_tokens, num_return_sequences=num_samples, use_cache=True,
                                   pad_token_id=pad_id, eos_token_id=stops)
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                             synced_gpus=True)[:, ids.shape[1]:]
        sampled_lp = None
    else:  # the static-cache decode loop (rlhf_fast/pipeline/rollout.py); generate for models it cannot serve
        from rlhf_fast.pipeline.rollout import fast_sample

        ro = fast_sample(model, ids, mask, num_samples=num_samples, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, stop_ids=stops, pad_id=pad_id,
                         return_logprobs=return_logprobs)
        gen, sampled_lp = ro.tokens, ro.logprobs
    model.train(was)
    p = ids.shape[1]
    is_eos = torch.isin(gen, torch.tensor(stops, device=gen.device))
    # answer length: through the first eos, or all N tokens
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], gen.shape[1] - 1,
                                                                                      dtype=torch.long))
    n = gen.shape[1]
    ans_mask = (torch.arange(n, device=device)[None] <= first_eos[:, None]).long()
    gen = torch.where(ans_mask.bool(), gen, torch.full_like(gen, pad_id))
    prompt_mask = mask.repeat_interleave(num_samples, 0)
    attn = torch.cat([prompt_mask, ans_mask], 1)
    input_ids = torch.cat([ids.repeat_interleave(num_samples, 0), gen], 1)
    resp_mask = torch.cat([torch.zeros_like(prompt_mask), ans_mask], 1)[:, 1:].bool()
    labels = torch.where(resp_mask.bool(), input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE))
    last = p + first_eos
    responses = [gen[i, : int(first_eos[i]) + 1].tolist() for i in range(gen.shape[0])]
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(num_samples)
    logprobs = None
    if sampled_lp is not None:  # answer token j sits at p + j and is predicted at position p + j - 1
        logprobs = torch.zeros(labels.shape, dtype=torch.float32, device=device)
        logprobs[:, p - 1: p - 1 + n] = sampled_lp[:, :n].float() * ans_mask
    return Samples(input_ids, attn, resp_mask, labels, last, prompt_index, responses, logprobs)
