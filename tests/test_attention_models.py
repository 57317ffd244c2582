"""attn_implementation="rlhf_fast" in transformers models built from tiny configs (no downloads): the same
logits and gradients as "sdpa" (Llama, Qwen2, GPT-NeoX; left/right padding, packed documents), and a
shared-prefix packed forward of [prompt, a_1..a_K] that gives the same per-answer log-probs and reward
scores (a scalar head at each answer's last token), and the same gradients, as K separate padded forwards."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS

transformers = pytest.importorskip("transformers")

from rlhf_fast.integrations import transformers as RT  # noqa: E402  (registers "rlhf_fast")

VOCAB = 101


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, attention_dropout=0.0)
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=1, use_sliding_window=False, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_dropout=0.0, **common)
    raise ValueError(family)


def _pair(family: str):
    """The same randomly initialised causal LM twice: with sdpa and with rlhf_fast attention."""
    models = []
    for impl in ("sdpa", RT.ATTN_IMPLEMENTATION):
        torch.manual_seed(0)
        models.append(transformers.AutoModelForCausalLM.from_config(_config(family), attn_implementation=impl))
    assert models[1].config._attn_implementation == RT.ATTN_IMPLEMENTATION
    return models


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_grads(a, b, atol=2e-5):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=1e-4, msg=name)


FAMILIES = ["llama", "qwen2", "gpt_neox"]


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_and_grads_as_sdpa(family, padding):
    sdpa, ours = _pair(family)
    ids = torch.randint(1, VOCAB, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    pad = [0, 4, 9]
    for i, n in enumerate(pad):
        if n and padding == "right":
            mask[i, -n:] = 0
        elif n:
            mask[i, :n] = 0
    weights = torch.randn(3, 21, VOCAB)
    outs = []
    for model in (sdpa, ours):
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * weights * mask[..., None]).sum().backward()  # loss on the real tokens only
        outs.append((logits.detach(), _grads(model)))
    (l_sdpa, g_sdpa), (l_ours, g_ours) = outs
    real = mask.bool()
    torch.testing.assert_close(l_ours[real], l_sdpa[real], atol=1e-5, rtol=1e-5)
    _compare_grads(g_sdpa, g_ours)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_llama_every_backend(backend, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    sdpa, ours = _pair("llama")
    ids = torch.randint(1, VOCAB, (2, 17))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :6] = 0
    outs = []
    for model in (sdpa, ours):
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()] ** 2).sum().backward()
        outs.append((logits.detach(), _grads(model)))
    torch.testing.assert_close(outs[1][0][mask.bool()], outs[0][0][mask.bool()], atol=1e-5, rtol=1e-5)
    _compare_grads(outs[0][1], outs[1][1], atol=5e-5)


def test_packed_documents_and_kv_cache_decoding():
    """position_ids that restart mark packed documents (varlen); a KV-cache step is bottom-right causal."""
    sdpa, ours = _pair("llama")
    a, b = torch.randint(1, VOCAB, (9,)), torch.randint(1, VOCAB, (14,))
    packed = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(9), torch.arange(14)])[None]
    with torch.no_grad():
        got = ours(input_ids=packed, position_ids=position_ids).logits[0]
        for doc, rows in ((a, slice(0, 9)), (b, slice(9, 23))):
            torch.testing.assert_close(got[rows], sdpa(input_ids=doc[None]).logits[0], atol=1e-5, rtol=1e-5)
        # prefill 10 tokens, then 3 single-token steps with the cache: same logits as one full forward
        ids = torch.randint(1, VOCAB, (1, 13))
        full = sdpa(input_ids=ids).logits[0]
        out = ours(input_ids=ids[:, :10], use_cache=True)
        steps = [out.logits[0]]
        cache = out.past_key_values
        for i in range(10, 13):
            out = ours(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0])
        torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Shared prefix: one packed pass vs K separate padded sequences (what trainers do today)
# ---------------------------------------------------------------------------------------------

def _separate(model, head, prompt, answers):
    """K separate [prompt, answer_j] sequences, right-padded into one batch: token log-probs of each
    answer and the reward at its last token."""
    p = prompt.shape[0]
    seqs = [torch.cat([prompt, a]) for a in answers]
    width = max(s.shape[0] for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :s.shape[0]] = s
        mask[i, :s.shape[0]] = 1
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden)
    logprobs, rewards = [], []
    for i, a in enumerate(answers):
        n = a.shape[0]
        lp = torch.log_softmax(logits[i, p - 1:p - 1 + n].float(), dim=-1).gather(-1, a[:, None]).squeeze(-1)
        logprobs.append(lp)
        rewards.append(head(hidden[i, p + n - 1]).squeeze(-1))
    return logprobs, torch.stack(rewards)


GROUPS = [  # (prompt length, answer lengths)
    (7, [3, 5, 1, 4]),                 # K = 4
    (12, [2, 6, 3, 1, 5, 2, 4, 3, 2]),  # K = 9
    (5, [6]),                          # K = 1
]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_forward_matches_separate_sequences(family):
    sdpa, ours = _pair(family)
    torch.manual_seed(1)
    head = torch.nn.Linear(64, 1)
    prompts = [torch.randint(1, VOCAB, (p,)) for p, _ in GROUPS]
    answers = [[torch.randint(1, VOCAB, (n,)) for n in lens] for _, lens in GROUPS]
    w_lp = [[torch.randn(a.shape[0]) for a in ans] for ans in answers]
    w_r = torch.randn(sum(len(a) for a in answers))

    out = RT.shared_prefix_forward(ours, prompts, answers, reward_head=head)
    flat_w = torch.cat([w for ws in w_lp for w in ws])
    (out.token_logprobs * flat_w).sum().add((out.rewards * w_r).sum()).backward()
    g_shared, gh_shared = _grads(ours), head.weight.grad.clone()
    head.weight.grad = None

    sep_lp, sep_r, loss = [], [], 0.0
    for g, (prompt, ans) in enumerate(zip(prompts, answers, strict=True)):
        lps, rs = _separate(sdpa, head, prompt, ans)
        sep_lp += lps
        sep_r.append(rs)
        loss = loss + sum((lp * w).sum() for lp, w in zip(lps, w_lp[g], strict=True))
    sep_r = torch.cat(sep_r)
    (loss + (sep_r * w_r).sum()).backward()

    torch.testing.assert_close(out.rewards.detach(), sep_r.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(out.answer_logprobs(), sep_lp, strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sequence_logprobs().detach(), torch.stack([x.sum() for x in sep_lp]).detach(),
                               atol=1e-4, rtol=1e-5)
    assert out.last_token_index.tolist() == (out.layout.answer_ends - 1).tolist()
    _compare_grads(_grads(sdpa), g_shared, atol=5e-5)
    torch.testing.assert_close(gh_shared, head.weight.grad, atol=5e-5, rtol=1e-4)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton does not run here")
def test_shared_prefix_forward_triton():
    sdpa, ours = _pair("llama")
    head = torch.nn.Linear(64, 1)
    prompt, answers = torch.randint(1, VOCAB, (9,)), [torch.randint(1, VOCAB, (n,)) for n in (4, 1, 6)]
    out = RT.shared_prefix_forward(ours, [prompt], [answers], reward_head=head, backend="triton")
    lps, rewards = _separate(sdpa, head, prompt, answers)
    torch.testing.assert_close(out.rewards, rewards, atol=1e-5, rtol=1e-5)
    for got, want in zip(out.answer_logprobs(), lps, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shared_prefix_needs_rlhf_fast_attention():
    sdpa, _ = _pair("llama")
    with pytest.raises(ValueError, match="^model: expected a model built with attn_implementation='rlhf_fast'"):
        RT.shared_prefix_forward(sdpa, [torch.tensor([1, 2])], [[torch.tensor([3])]])


def test_unsupported_features_raise():
    _, ours = _pair("llama")
    q = torch.randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match="^dropout"):
        RT.rlhf_fast_attention_forward(ours.model.layers[0].self_attn, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="^sliding_window"):
        RT.rlhf_fast_attention_forward(ours.model.layers[0].self_attn, q, q, q, None, sliding_window=4)
    with pytest.raises(ValueError, match="^attention_mask: rlhf_fast attention takes a 2-D"):
        RT.rlhf_fast_attention_forward(ours.model.layers[0].self_attn, q, q, q, torch.zeros(1, 1, 3, 3))
