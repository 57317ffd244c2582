"""fast_sample against transformers' generate and a teacher-forced forward, on a tiny random Llama
(tied embeddings, grouped-query attention)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_fast.pipeline.rollout import SHARED_PREFIX_MIN_SAVED, Rollout, _sample, _shared_prefix, fast_sample

VOCAB, PAD = 61, 0


def _model(**kw):
    torch.manual_seed(0)
    # a wide init so that greedy answers vary and stop tokens come up
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=PAD,
                      eos_token_id=PAD, bos_token_id=1, initializer_range=0.3, **kw)
    return LlamaForCausalLM(cfg).eval()


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), p), generator=g)
    mask = torch.zeros(len(lengths), p, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, p - n:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def _teacher_forced_logprobs(model, ids, mask, tokens, lengths, temperature):
    seq = torch.cat([ids.repeat_interleave(tokens.shape[0] // ids.shape[0], 0), tokens], 1)
    ans = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    seq_mask = torch.cat([mask.repeat_interleave(tokens.shape[0] // ids.shape[0], 0), ans], 1)
    pos = (seq_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=seq_mask, position_ids=pos).logits.float()
    p = ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1: -1] / temperature, -1).gather(2, tokens[..., None])[..., 0]
    return logp.masked_fill(ans == 0, 0.0)


@pytest.mark.parametrize("stop_ids", [[PAD], [PAD, 7, 11]])
def test_greedy_equals_generate(stop_ids):
    model = _model()
    ids, mask = _prompts([5, 9, 2, 7])
    r = fast_sample(model, ids, mask, num_samples=1, max_new_tokens=16, temperature=0, top_p=1.0,
                    stop_ids=stop_ids, pad_id=PAD)
    assert r.engine == "decoder_loop" and r.fallback_reason is None
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                         eos_token_id=stop_ids, pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(r.tokens, ref)
    assert len(set(r.tokens.flatten().tolist())) > 3  # the answers are not one repeated token


def test_greedy_generate_engine_agrees():
    model = _model()
    ids, mask = _prompts([3, 8, 6])
    kw = dict(num_samples=1, max_new_tokens=12, temperature=0, top_p=1.0, stop_ids=[PAD, 5], pad_id=PAD)
    a = fast_sample(model, ids, mask, **kw)
    b = fast_sample(model, ids, mask, engine="generate", **kw)
    assert b.engine == "generate" and b.fallback_reason
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,num_samples", [(1.0, 0, 1), (0.7, 0, 3), (1.3, 10, 2)])
def test_sampled_logprobs_match_teacher_forcing(temperature, top_k, num_samples):
    model = _model()
    ids, mask = _prompts([4, 10, 1])
    r = fast_sample(model, ids, mask, num_samples=num_samples, max_new_tokens=20, temperature=temperature,
                    top_p=1.0, top_k=top_k, stop_ids=[PAD, 3], pad_id=PAD,
                    generator=torch.Generator().manual_seed(0))
    assert r.tokens.shape[0] == 3 * num_samples and r.logprobs.dtype == torch.float32
    ref = _teacher_forced_logprobs(model, ids, mask, r.tokens, r.lengths, temperature)
    torch.testing.assert_close(r.logprobs, ref, rtol=1e-5, atol=1e-5)  # logits of ~10: fp32 order
    assert not r.tokens.is_inference() and not r.logprobs.is_inference()


def _shared_prompts(lengths, shared, seed=2):
    """Left-padded prompts whose first `shared` real tokens are the same in every row."""
    ids, mask = _prompts(lengths, seed)
    lead = torch.randint(1, VOCAB, (shared,), generator=torch.Generator().manual_seed(seed + 1))
    for i, n in enumerate(lengths):
        start = ids.shape[1] - n
        ids[i, start: start + shared] = lead
    return ids, mask


def test_shared_prefix_length():
    ids, mask = _shared_prompts([12, 20, 15], 9)
    assert _shared_prefix(ids, mask.bool()) == 9
    # every row keeps a token of its own: identical prompts share all but their last token
    same = ids[1:2].repeat(4, 1), mask[1:2].repeat(4, 1)
    assert _shared_prefix(*same[:1], same[1].bool()) == 19
    # a prefix that saves too few positions is not worth the extra pass; one row shares with no one
    short = _shared_prompts([20, 24], SHARED_PREFIX_MIN_SAVED - 1)
    assert _shared_prefix(short[0], short[1].bool()) == 0
    assert _shared_prefix(ids[:1], mask[:1].bool()) == 0
    # rows that differ from the first token share nothing
    ids2, mask2 = _prompts([12, 20, 15], seed=4)
    for i, n in enumerate([12, 20, 15]):
        ids2[i, 20 - n] = i + 1
    assert _shared_prefix(ids2, mask2.bool()) == 0


@pytest.mark.parametrize("lengths,shared", [([12, 20, 15, 30], 10), ([18, 18, 18], 17)])
def test_shared_prefix_prefill_equals_generate_and_teacher_forcing(lengths, shared):
    # prompts that share their first tokens (a chat template's header) at different left paddings: the prefix
    # runs once, the rest of each row after it; greedy answers equal generate's, sampled log-probs a forward's
    model = _model()
    ids, mask = _shared_prompts(lengths, shared)
    if len(set(lengths)) == 1:  # identical prompts: all but the last token is shared
        ids[:] = ids[0]
    assert _shared_prefix(ids, mask.bool()) == shared
    r = fast_sample(model, ids, mask, num_samples=1, max_new_tokens=12, temperature=0, top_p=1.0,
                    stop_ids=[PAD], pad_id=PAD)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         eos_token_id=PAD, pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(r.tokens, ref)
    r = fast_sample(model, ids, mask, num_samples=2, max_new_tokens=16, temperature=1.0, top_p=1.0,
                    stop_ids=[PAD, 3], pad_id=PAD, generator=torch.Generator().manual_seed(0))
    want = _teacher_forced_logprobs(model, ids, mask, r.tokens, r.lengths, 1.0)
    torch.testing.assert_close(r.logprobs, want, rtol=1e-5, atol=1e-5)


def test_rows_stop_at_first_stop_and_are_padded():
    model = _model()
    ids, mask = _prompts([6, 3, 8, 5])
    stops = [PAD, 4, 9, 13, 21]
    r = fast_sample(model, ids, mask, num_samples=4, max_new_tokens=24, temperature=1.5, top_p=1.0,
                    stop_ids=stops, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    assert r.finished.any() and (r.lengths < 24).any()
    for row, n, fin in zip(r.tokens.tolist(), r.lengths.tolist(), r.finished.tolist(), strict=True):
        first = next((i for i, t in enumerate(row) if t in stops), None)
        if fin:
            assert first == n - 1                      # the first stop ends the answer and is kept
        else:
            assert first is None and n == 24 == len(row)
        assert all(t == PAD for t in row[n:])
    assert (r.logprobs[torch.arange(r.tokens.shape[1])[None] >= r.lengths[:, None]] == 0).all()
    assert r.tokens.shape[1] == int(r.lengths.max())


def test_pad_equal_to_stop_is_not_finished_early():
    # pad == eos; a prompt that ends in the pad id must not count as finished
    model = _model()
    ids, mask = _prompts([4, 6])
    ids[:, -1] = PAD
    r = fast_sample(model, ids, mask, num_samples=1, max_new_tokens=10, temperature=0, top_p=1.0, stop_ids=[PAD],
                    pad_id=PAD)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                         eos_token_id=PAD, pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(r.tokens, ref)


@pytest.mark.parametrize("top_p,top_k,kept", [(0.7, 0, {5, 17}), (0.81, 0, {5, 17, 30}), (0.4, 0, {5}),
                                               (1.0, 2, {5, 17}), (0.9, 2, {5, 17})])
def test_top_p_top_k_keep_only_the_nucleus(top_p, top_k, kept):
    # crafted distribution: 0.5, 0.3, 0.15 on three tokens, the rest spread thin over the tail
    probs = torch.full((VOCAB,), 0.05 / (VOCAB - 3))
    probs[[5, 17, 30]] = torch.tensor([0.5, 0.3, 0.15])
    logits = (probs.log() + 3.0).repeat(4000, 1)  # (rows, V), shifted: logits, not log-probs
    tok, lp = _sample(logits, 1.0, top_k, top_p, torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == kept
    # the log-probs are the untruncated distribution's
    torch.testing.assert_close(lp, probs.log()[tok], rtol=0, atol=1e-5)
    # and the kept tokens are drawn in proportion to their renormalised probabilities
    share = (tok == 5).float().mean().item()
    assert abs(share - 0.5 / probs[sorted(kept)].sum().item()) < 0.03


def test_samples_grouped_by_prompt():
    # greedy: rows i*3 .. i*3+2 must be the answer prompt i alone gets
    model = _model()
    ids, mask = _prompts([4, 4])
    r = fast_sample(model, ids, mask, num_samples=3, max_new_tokens=6, temperature=0, top_p=1.0, stop_ids=[],
                    pad_id=PAD)
    single = [fast_sample(model, ids[i: i + 1], mask[i: i + 1], num_samples=1, max_new_tokens=6, temperature=0,
                          top_p=1.0, stop_ids=[], pad_id=PAD).tokens for i in range(2)]
    assert not torch.equal(single[0], single[1])
    assert torch.equal(r.tokens, torch.cat([single[0]] * 3 + [single[1]] * 3))


def test_fallback_for_other_models_warns_with_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    ids, mask = _prompts([3, 5])
    with pytest.warns(UserWarning, match="model_type 'gpt2'"):
        r = fast_sample(model, ids, mask, num_samples=2, max_new_tokens=5, temperature=1.0, top_p=1.0,
                        stop_ids=[PAD], pad_id=PAD, generator=torch.Generator().manual_seed(0))
    assert isinstance(r, Rollout) and r.engine == "generate" and "gpt2" in r.fallback_reason
    with pytest.raises(ValueError, match="engine"):
        fast_sample(model, ids, mask, num_samples=1, max_new_tokens=5, temperature=1.0, top_p=1.0, stop_ids=[PAD],
                    pad_id=PAD, engine="decoder_loop")


def test_inputs_not_modified():
    model = _model()
    ids, mask = _prompts([2, 6])
    ids0, mask0 = ids.clone(), mask.clone()
    fast_sample(model, ids, mask, num_samples=2, max_new_tokens=5, temperature=1.0, top_p=0.9, stop_ids=[PAD],
                pad_id=PAD)
    assert torch.equal(ids, ids0) and torch.equal(mask, mask0)


@pytest.mark.parametrize("change,match", [
    (dict(attention_mask="right"), "attention_mask: expected left padding"),
    (dict(num_samples=0), "num_samples: expected an int >= 1, got 0"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p: expected a float in"),
    (dict(top_k=-2), "top_k"),
    (dict(stop_ids=[VOCAB]), "stop_ids"),
    (dict(input_ids="float"), "input_ids: expected a 2-dim int64"),
])
def test_bad_input_raises(change, match):
    model = _model()
    ids, mask = _prompts([2, 6])
    kw = dict(num_samples=1, max_new_tokens=4, temperature=1.0, top_p=1.0, stop_ids=[PAD], pad_id=PAD)
    if change.pop("attention_mask", None) == "right":
        mask = mask.flip(1)
    if change.pop("input_ids", None) == "float":
        ids = ids.float()
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        fast_sample(model, ids, mask, **kw)


@pytest.mark.parametrize("disabled", [False, True])
def test_lora_model_packed_base_equals_generate_and_teacher_forcing(disabled):
    # peft LoRA on every projection with non-zero adapters: the decode loop packs each base weight and adds
    # the adapters' output; with the adapters disabled the layers run as they are
    import contextlib

    from peft import LoraConfig, get_peft_model

    from rlhf_fast.pipeline.rollout import _lora_parts

    model = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    layer = model.base_model.model.model.layers[0]
    assert _lora_parts(layer.self_attn.q_proj) is not None
    ids, mask = _shared_prompts([12, 20, 15, 30], 10)
    ctx = model.disable_adapter() if disabled else contextlib.nullcontext()
    with ctx:
        assert (_lora_parts(layer.mlp.down_proj) is None) == disabled
        r = fast_sample(model, ids, mask, num_samples=1, max_new_tokens=12, temperature=0, top_p=1.0,
                        stop_ids=[PAD], pad_id=PAD)
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                             eos_token_id=PAD, pad_token_id=PAD)[:, ids.shape[1]:]
        assert torch.equal(r.tokens, ref)
        greedy = r.tokens
        r = fast_sample(model, ids, mask, num_samples=2, max_new_tokens=16, temperature=1.0, top_p=1.0,
                        stop_ids=[PAD, 3], pad_id=PAD, generator=torch.Generator().manual_seed(0))
        want = _teacher_forced_logprobs(model, ids, mask, r.tokens, r.lengths, 1.0)
        torch.testing.assert_close(r.logprobs, want, rtol=1e-5, atol=1e-5)
    # the adapters change the answers; disabled, the answers are the base model's
    plain = fast_sample(_model(), ids, mask, num_samples=1, max_new_tokens=12, temperature=0, top_p=1.0,
                        stop_ids=[PAD], pad_id=PAD)
    assert torch.equal(plain.tokens, greedy) == disabled
