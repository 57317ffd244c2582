"""Pipeline: each trainer's step against a hand-computed small case, resume-after-kill equality, and a
smoke run of the whole pipeline (SFT -> RM -> PPO-ptx) on the embedded task."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import Killed, kill_after

pytest.importorskip("transformers")

from rlhf_fast.pipeline import common as C  # noqa: E402
from rlhf_fast.pipeline.chat import Encoder  # noqa: E402
from rlhf_fast.pipeline.config import PipelineConfig, PPOConfig, RMConfig, SFTConfig, from_preset  # noqa: E402
from rlhf_fast.pipeline.data import lm_batch  # noqa: E402
from rlhf_fast.pipeline.ppo import PPOTrainer  # noqa: E402
from rlhf_fast.pipeline.reward import RewardTrainer, encode_ranked  # noqa: E402
from rlhf_fast.pipeline.sft import SFTTrainer  # noqa: E402
from rlhf_fast.pipeline.task import TopicTask, build_tokenizer, sft_examples  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok, seed=0):
    return C.build_tiny_llama(tok, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              seed=seed)


def tiny_rm(tok, tmp_path, seed=0):
    path = tmp_path / f"base{seed}"
    C.save_model(tiny(tok, seed), tok, path)
    return C.load_scalar_model(str(path), pad_token_id=tok.pad_token_id)


def hand_grads(model, loss_fn):
    """Loss and gradients of `loss_fn(model)` by plain autograd over full logits."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return float(loss.detach())


def assert_same_grads(trained, ref):
    """The trainer's step left its gradients in .grad (computed at the parameters `ref` still holds)."""
    for (n, a), (_, b) in zip(trained.named_parameters(), ref.named_parameters(), strict=True):
        assert a.grad is not None, n
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_sft_step_matches_hand_computed(tok, tmp_path):
    model = tiny(tok)
    ref = copy.deepcopy(model)
    rows = [{"prompt": "write about food with cat rain :", "response": "bread soup ."},
            {"prompt": "write about music :", "response": "song drum piano harp"}]
    cfg = SFTConfig(output_dir=str(tmp_path), lr=1e-2, warmup_steps=0, max_grad_norm=0.0, device="cpu",
                    eval_fraction=0.0)
    tr = SFTTrainer(cfg, model=model, tokenizer=tok, train_data=rows, progress=False)
    batch = lm_batch([tr.encoder.prompt(r["prompt"]) for r in rows], [tr.encoder.response(r["response"]) for r in rows],
                     tok.pad_token_id)
    stats = tr.step(batch)

    def hand_loss(m):  # full logits, log_softmax, mean NLL over the response tokens (eos included)
        total, n = 0.0, 0
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            a = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logits = m(torch.tensor([p + a])).logits[0]
            lp = F.log_softmax(logits.float(), -1)
            for j, t in enumerate(a):
                total = total - lp[len(p) + j - 1, t]
                n += 1
        return total / n

    expected = hand_grads(ref, hand_loss)
    assert stats["tokens"] == 9
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert_same_grads(tr.model, ref)


@pytest.mark.parametrize("packing", ["shared_prefix", "padded"])
def test_reward_step_matches_hand_computed(tok, tmp_path, packing):
    model = tiny_rm(tok, tmp_path)
    ref = copy.deepcopy(model)
    rows = [{"prompt": "write about food with cat rain :", "responses": ["bread soup .", "cat", "rice egg cake ."],
             "ranking": [1, 2, 0]},
            {"prompt": "write about sports :", "responses": ["ball .", "ugh meh"], "ranking": [0, 1]}]
    cfg = RMConfig(output_dir=str(tmp_path), lr=1e-2, warmup_steps=0, max_grad_norm=0.0, device="cpu",
                   eval_fraction=0.0, packing=packing)
    tr = RewardTrainer(cfg, model=model, tokenizer=tok, train_data=rows, progress=False)
    assert tr.packing == packing
    stats = tr.step(encode_ranked(tr.encoder, rows))

    def hand_loss(m):  # each [prompt, answer] alone; scalar head at the last answer token; mean over pairs
        per_prompt = []
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            scores = []
            for a in r["responses"]:
                ids = p + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                h = m.base_model(torch.tensor([ids])).last_hidden_state[0, -1]
                scores.append(m.score(h)[0])
            pairs = [(w, l) for w in range(len(scores)) for l in range(len(scores))
                     if r["ranking"][w] < r["ranking"][l]]
            per_prompt.append(sum(-F.logsigmoid(scores[w] - scores[l]) for w, l in pairs) / len(pairs))
        return sum(per_prompt) / len(per_prompt)

    expected = hand_grads(ref, hand_loss)
    assert stats["pairs"] == 4
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert_same_grads(tr.model, ref)


def _ppo(tok, tmp_path, name="ppo", **kw):
    torch.manual_seed(0)
    task = TopicTask()
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt": p} for p in task.prompts(16, g)]
    ptx = sft_examples(task, 16, g)
    base = dict(output_dir=str(tmp_path / name), iterations=3, prompts_per_iteration=3, samples_per_prompt=2,
                max_new_tokens=6, ppo_epochs=1, minibatch_size=6, ptx_batch_size=2, device="cpu", eval_every=0,
                temperature=1.0, lr=5e-4, critic_lr=1e-3,
                max_grad_norm=0.0)
    base.update(kw)
    return PPOTrainer(PPOConfig(**base), policy=tiny(tok, 1), reward_model=tiny_rm(tok, tmp_path, 2), tokenizer=tok,
                      prompts=prompts, ptx_data=ptx, progress=False)


def test_ppo_rollout_and_step_match_hand_computed(tok, tmp_path):
    tr = _ppo(tok, tmp_path, kl_coef=0.1, adaptive_kl=False, whiten_advantages=False, gamma=0.9, lam=0.8,
              entropy_coef=0.01, ptx_coef=0.5, temperature=0.9)
    ro = tr.rollout(0)
    s = ro["samples"]
    T = 0.9

    def hand_lp(m, ids, attn):
        logits = m(input_ids=ids, attention_mask=attn, position_ids=C.position_ids_from_mask(attn)).logits[:, :-1]
        logp = F.log_softmax(logits.float() / T, -1)
        lab = ids[:, 1:]
        return logp.gather(-1, lab[..., None])[..., 0], -(logp.exp() * logp).sum(-1)

    with torch.no_grad():
        lp_ref, _ = hand_lp(tr.ref, s.input_ids, s.attention_mask)
        h_rm = tr.reward_model.base_model(input_ids=s.input_ids, attention_mask=s.attention_mask,
                                          position_ids=C.position_ids_from_mask(s.attention_mask)).last_hidden_state
        score = tr.reward_model.score(h_rm)[torch.arange(len(s.responses)), s.last_index, 0]
    mask = s.response_mask
    torch.testing.assert_close(ro["ref_lp"] * mask, lp_ref * mask, atol=1e-5, rtol=1e-5)
    mean, std = score.mean(), score.std()
    # rewards: -beta * (log pi - log ref) per answer token, the normalised score on the last; GAE by a loop
    adv_hand = torch.zeros_like(ro["adv"])
    for b in range(mask.shape[0]):
        pos = mask[b].nonzero().flatten().tolist()
        r = [-0.1 * float(ro["old_lp"][b, t] - ro["ref_lp"][b, t]) for t in pos]
        r[-1] += float((score[b] - mean) / std)
        a_next = v_next = 0.0
        for j in reversed(range(len(pos))):
            v = float(ro["values"][b, pos[j]])
            delta = r[j] + 0.9 * v_next - v
            a_next = delta + 0.9 * 0.8 * a_next
            v_next = v
            adv_hand[b, pos[j]] = a_next
    torch.testing.assert_close(ro["adv"], adv_hand, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ro["ret"], (adv_hand + ro["values"]) * mask, atol=1e-4, rtol=1e-4)

    # the actor's minibatch loss: clipped ratio (token mean) - entropy bonus + 0.5 * ptx NLL (mean)
    rows = torch.arange(len(s.responses))
    ptx = tr.ptx_batch(0, 0, 0)
    actor_before = copy.deepcopy(tr.actor)
    with torch.no_grad():
        lp, ent = hand_lp(actor_before, s.input_ids, s.attention_mask)
        ratio = torch.exp(lp - ro["old_lp"])
        A = ro["adv"]
        pg = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2))
        n = mask.sum()
        pol = ((pg - 0.01 * ent) * mask).sum() / n
        lpp, _ = hand_lp(actor_before, ptx.input_ids, ptx.attention_mask)
        ptx_mask = ptx.labels != -100
        ptx_nll = -(lpp * ptx_mask).sum() / ptx_mask.sum()
        expected = pol + 0.5 * ptx_nll
        v = tr.critic.score(tr.critic.base_model(input_ids=s.input_ids, attention_mask=s.attention_mask,
                                                 position_ids=C.position_ids_from_mask(s.attention_mask)
                                                 ).last_hidden_state[:, :-1])[..., 0]
        vc = ro["values"] + (v - ro["values"]).clamp(-0.2, 0.2)
        vl = 0.5 * (torch.maximum((v - ro["ret"]) ** 2, (vc - ro["ret"]) ** 2) * mask).sum() / n
    st = tr.update_minibatch(ro, rows, ptx)
    assert st["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert st["ptx_loss"] == pytest.approx(float(ptx_nll), rel=1e-4)
    assert st["value_loss"] == pytest.approx(float(vl), rel=1e-4, abs=1e-6)


def test_ppo_actor_with_an_lm_head_bias(tok, tmp_path):
    """An lm_head with a bias (Phi-2, GPT-J): the fused actor loss includes it and trains it."""
    tr = _ppo(tok, tmp_path, whiten_advantages=False, ptx_coef=0.0, entropy_coef=0.0, lr=1e-2)
    head = tr.actor.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.randn(head.out_features, generator=torch.Generator().manual_seed(3)))
    tr.actor.lm_head = biased
    tr.actor_opt = torch.optim.AdamW(tr.actor.parameters(), lr=1e-2)
    ro = tr.rollout(0)
    s = ro["samples"]
    with torch.no_grad():
        attn = s.attention_mask
        logits = tr.actor(input_ids=s.input_ids, attention_mask=attn,
                          position_ids=C.position_ids_from_mask(attn)).logits[:, :-1]
        lp = F.log_softmax(logits.float(), -1).gather(-1, s.input_ids[:, 1:, None])[..., 0]
        ratio = torch.exp(lp - ro["old_lp"])
        pg = torch.maximum(-ro["adv"] * ratio, -ro["adv"] * ratio.clamp(0.8, 1.2))
        expected = (pg * s.response_mask).sum() / s.response_mask.sum()
    bias_before = biased.bias.detach().clone()
    st = tr.update_minibatch(ro, torch.arange(len(s.responses)), None)
    assert st["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert not torch.equal(biased.bias.detach(), bias_before)  # the bias got a gradient and moved




def test_sft_resume_after_kill_equals_uninterrupted(tok, tmp_path):
    rows = sft_examples(TopicTask(), 40, torch.Generator().manual_seed(0))

    def make(out, resume=False):
        cfg = SFTConfig(output_dir=str(tmp_path / out), batch_size=8, epochs=2, lr=1e-2, device="cpu",
                        eval_fraction=0.0, checkpoint_every=2, resume=resume, warmup_steps=2)
        return SFTTrainer(cfg, model=tiny(tok), tokenizer=tok, train_data=rows, progress=False)

    full = make("full")
    full.train()
    killed = make("killed")
    kill_after(killed, 5)  # checkpoints after steps 2 and 4, killed during step 6
    with pytest.raises(Killed):
        killed.train()
    resumed = make("killed", resume=True)
    resumed.train()
    assert resumed.step_count == full.step_count == 10
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    logged = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged)


def test_ppo_resume_after_kill_equals_uninterrupted(tok, tmp_path):
    full = _ppo(tok, tmp_path, "full", checkpoint_every=1)
    full.train()
    killed = _ppo(tok, tmp_path, "killed", checkpoint_every=1)
    kill_after(killed, 2)
    with pytest.raises(Killed):
        killed.train()
    resumed = _ppo(tok, tmp_path, "killed", checkpoint_every=1, resume=True)
    # a fresh process: the global RNG is wherever it is; the checkpoint restores it
    torch.manual_seed(1234)
    resumed.train()
    assert resumed.iteration == full.iteration == 3
    assert resumed.kl_ctl.beta == full.kl_ctl.beta
    for m_full, m_res in ((full.actor, resumed.actor), (full.critic, resumed.critic)):
        for (n, a), (_, b) in zip(m_full.named_parameters(), m_res.named_parameters(), strict=True):
            assert torch.equal(a, b), n


def smoke_config(out) -> PipelineConfig:
    cfg = from_preset(PipelineConfig, "tiny", output_dir=str(out), device="cpu", plots=False)
    cfg.model.hidden_size, cfg.model.intermediate_size = 32, 64
    t = cfg.task
    t.num_sft, t.num_rm_prompts, t.num_ppo_prompts, t.num_ptx = 256, 24, 32, 32
    t.num_eval_prompts, t.eval_samples = 8, 2
    cfg.sft.epochs, cfg.sft.batch_size = 1, 32
    cfg.rm.epochs, cfg.rm.batch_size, cfg.rm.k_max = 1, 8, 5
    p = cfg.ppo
    p.iterations, p.prompts_per_iteration, p.samples_per_prompt, p.minibatch_size, p.ppo_epochs = 2, 4, 2, 8, 1
    p.eval_every, p.max_new_tokens = 1, 12
    return cfg


def test_pipeline_smoke(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_fast.pipeline import run_pipeline

    summary = run_pipeline(smoke_config(tmp_path), progress=False)
    keys = ["rm_accuracy", "gold_score_sft", "gold_score_ppo", "gold_score_max", "kl_per_token", "ptx_loss_sft",
            "ptx_loss_ppo", "time_sft_s", "time_rm_s", "time_ppo_s", "time_total_s"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for k in keys:
        assert math.isfinite(summary[k]) and on_disk[k] == pytest.approx(summary[k]), k
    assert 0.0 <= summary["rm_accuracy"] <= 1.0
    assert summary["gold_score_max"] == pytest.approx(1.0)
    assert summary["rm_packing"] == "shared_prefix"
    assert "## Sample generations" in (tmp_path / "report.md").read_text()
    ppo_rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ppo_rows] == [1, 2] and "gold_score" in ppo_rows[0]
    # saved stages load with the plain transformers auto classes (safetensors, no rlhf_fast import needed)
    for stage in ("sft", "ppo"):
        assert (tmp_path / stage / "model" / "model.safetensors").exists()
        m = AutoModelForCausalLM.from_pretrained(tmp_path / stage / "model")
        assert m.config.vocab_size == len(build_tokenizer())
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert rm.config.num_labels == 1
    assert len((tmp_path / "rm" / "comparisons.jsonl").read_text().splitlines()) == 24


@pytest.mark.parametrize("algorithm", ["grpo", "dpo"])
def test_pipeline_other_algorithms(tmp_path, algorithm):
    """--algorithm grpo: SFT then GRPO on the gold rubric, no reward model; dpo: SFT then DPO on the labeler's
    comparisons. The summary has the same gold-score / KL / ptx fields, no reward-model accuracy."""
    from rlhf_fast.pipeline import run_pipeline

    cfg = smoke_config(tmp_path)
    cfg.algorithm = algorithm
    cfg.grpo.iterations, cfg.grpo.prompts_per_iteration, cfg.grpo.num_generations = 2, 4, 2
    cfg.grpo.eval_every, cfg.grpo.max_new_tokens = 1, 12
    cfg.dpo.batch_size = 8
    summary = run_pipeline(cfg, progress=False)
    assert summary["algorithm"] == algorithm and summary["rm_accuracy"] is None
    for k in ("gold_score_sft", "gold_score_ppo", "kl_per_token", "ptx_loss_ppo", "time_ppo_s"):
        assert math.isfinite(summary[k]), k
    assert "rm_accuracy_vs_labeler>=0.70" not in summary["targets"]
    assert (tmp_path / algorithm / "model" / "model.safetensors").exists() and not (tmp_path / "ppo").exists()
    assert (tmp_path / "rm" / "model").exists() is False
    rows = [json.loads(x) for x in (tmp_path / algorithm / "metrics.jsonl").read_text().splitlines()]
    assert rows and ("gold_score" in rows[0]) == (algorithm == "grpo")
    assert "## Sample generations" in (tmp_path / "report.md").read_text()


def test_reward_model_head_init_depends_on_the_seed_only(tok, tmp_path):
    """The scalar head a causal LM checkpoint lacks is drawn from `seed`, not from the global RNG state (which
    differs between a fresh and a resumed run, or between the ranks of a torchrun)."""
    path = tmp_path / "base"
    C.save_model(tiny(tok), tok, path)
    torch.manual_seed(1)
    a = C.load_scalar_model(str(path), pad_token_id=tok.pad_token_id, seed=3)
    torch.manual_seed(2)
    torch.rand(5)
    b = C.load_scalar_model(str(path), pad_token_id=tok.pad_token_id, seed=3)
    c = C.load_scalar_model(str(path), pad_token_id=tok.pad_token_id, seed=4)
    assert torch.equal(a.score.weight, b.score.weight)
    assert not torch.equal(a.score.weight, c.score.weight)


def test_encoder_truncates_long_prompts_with_warning(tok):
    enc = Encoder(tok, max_prompt_len=4, max_response_len=3)
    with pytest.warns(UserWarning, match="x.jsonl:3: prompt of 8 tokens truncated to the last 4"):
        ids = enc.prompt("write about food with cat rain :", "x.jsonl:3")
    assert ids == tok("write about food with cat rain :")["input_ids"][-4:]
    # a response longer than max_response_len is cut (its eos too: the answer does not end there)
    assert enc.response("bread soup rice egg") == tok("bread soup rice", add_special_tokens=False)["input_ids"]
    assert enc.response("bread soup") == tok("bread soup", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
