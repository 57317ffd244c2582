"""GRPO / RLOO and DPO trainers on the chat model of tests/test_real_models.py (SmolLM2's real tokenizer and
chat template, tied embeddings): the shared-prefix packed training forward equals the padded one (loss and
every gradient), runs from files, resume, LoRA references, the command line and bad options."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from helpers import Killed, assert_close, kill_after  # noqa: E402
from test_real_models import ASSETS, chat_model, rows, saved_chat_model  # noqa: E402

from rlhf_fast.pipeline import common as C  # noqa: E402
from rlhf_fast.pipeline.cli import main  # noqa: E402
from rlhf_fast.pipeline.config import DPOConfig, GRPOConfig  # noqa: E402
from rlhf_fast.pipeline.dpo import DPOTrainer, pair_logprobs  # noqa: E402
from rlhf_fast.pipeline.grpo import GRPOTrainer  # noqa: E402
from rlhf_fast.pipeline.rl import without_adapter  # noqa: E402


def length_rule(prompt: str, response: str) -> float:
    """A verifiable reward that varies between answers: the number of words, capped."""
    return min(len(response.split()), 6) / 6.0


@pytest.fixture(scope="module")
def tok():
    return C.load_tokenizer(str(ASSETS))


def prompts(n=4):
    return [{"prompt": r["prompt"]} for r in rows(n)]


def grpo(tok, tmp_path, **over):
    cfg = dict(model="given", output_dir=str(tmp_path / "grpo"), device="cpu", iterations=2,
               prompts_per_iteration=2, num_generations=4, max_new_tokens=6, seed=0, lr=1e-3)
    cfg.update(over)
    return GRPOTrainer(GRPOConfig(**cfg), policy=chat_model(tok), tokenizer=tok, prompts=prompts(),
                       rules=[length_rule], progress=False)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grpo_losses_by_packing(tr, ro) -> dict:
    """packing -> (loss, stats, gradients) of the update's loss on groups [0, 1] of rollout `ro`, after the
    policy is moved off the sampler (so that ratios and clipping are exercised)."""
    with torch.no_grad():
        for p in tr.actor_run.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = {}
    for packing in ("shared_prefix", "padded"):
        tr.packing = packing
        tr.actor.zero_grad(set_to_none=True)
        n_tok, n_seq = float(ro["lengths"].sum()), float(ro["lengths"].numel())
        loss, st = tr.actor_run(tr._loss, ro, [0, 1], n_tok, n_seq)
        loss.backward()
        out[packing] = (loss.detach(), st, grads(tr.actor))
    tr.packing = "shared_prefix"
    return out


def assert_packings_agree(out: dict, stats: tuple[str, ...]) -> None:
    (l1, s1, g1), (l2, s2, g2) = out["shared_prefix"], out["padded"]
    assert_close(l1, l2, "loss", atol=1e-5, rtol=1e-4)
    for key in stats:
        assert_close(s1[key], s2[key], key, atol=1e-5, rtol=1e-4)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        assert_close(g1[n], g2[n], f"grad {n}", atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("loss_type, beta, lora, extra", [
    ("dapo", 0.0, 0, {}), ("grpo", 0.1, 0, {}), ("dr_grpo", 0.1, 8, {}),
    ("cispo", 0.1, 0, dict(epsilon_high=1.5)), ("grpo", 0.1, 0, dict(importance_sampling_level="sequence")),
    ("dapo", 0.0, 0, dict(delta=1.3, rollout_is="token_truncate", rollout_is_max=1.01, old_logprobs="recompute"))],
    ids=["dapo", "grpo+kl", "dr_grpo+lora", "cispo", "gspo", "delta+rollout_is"])
def test_grpo_packed_loss_and_gradients_equal_padded(tok, tmp_path, loss_type, beta, lora, extra):
    tr = grpo(tok, tmp_path, loss_type=loss_type, beta=beta, lora_r=lora, packing="shared_prefix",
              num_iterations=2, **extra)
    assert tr.packing == "shared_prefix"
    ro = tr.rollout(0)
    assert sum(len(a) for ans in ro["answers"] for a in ans) == ro["old"].numel() == int(ro["lengths"].sum())
    out = grpo_losses_by_packing(tr, ro)
    s1 = out["shared_prefix"][1]
    assert float(s1["clip_frac"]) > 0 or float(s1["ratio_max"]) != 1.0
    assert_packings_agree(out, ("clip_frac", "ratio_mean", "kl"))


def test_grpo_shared_trunk_equals_full_forwards(tok, tmp_path):
    """LoRA in the top layer only: policy and reference share the frozen layer below it, run once per rollout;
    the reference log-probs and the update's loss and gradients equal those of full (padded) forwards."""
    tr = grpo(tok, tmp_path, loss_type="grpo", beta=0.1, lora_r=4, lora_layers=1, num_iterations=2,
              old_logprobs="recompute")
    assert tr.trunk_depth == 1
    assert grpo(tok, tmp_path / "off", lora_r=4, lora_layers=1, shared_trunk=False).trunk_depth == 0
    ro = tr.rollout(0)
    assert ro["trunk"] is not None
    for key, off in (("old", False), ("ref", True)):
        full = tr._logprobs(tr.actor_run, dict(ro, trunk=None), adapter_off=off)
        assert_close(ro[key], full, key, atol=1e-5, rtol=1e-5)
    assert_packings_agree(grpo_losses_by_packing(tr, ro), ("kl",))
    tr.train()


def test_gspo_equals_token_level_on_policy_and_its_log_prob_path_the_fused_head(tok, tmp_path):
    """On policy (ratio 1) GSPO's gradient is the token-level one: GSPO through the log-prob path
    (linear_logprobs + ppo_policy_loss + kl_penalty) equals GRPO through the fused head (linear_ppo_loss), loss,
    KL and every gradient, with a KL term that is not 0."""
    out = {}
    for level in ("token", "sequence"):
        tr = grpo(tok, tmp_path / level, loss_type="grpo", beta=0.2, importance_sampling_level=level)
        ro = tr.rollout(0)
        ro["old"] = tr._logprobs(tr.actor_run, ro)                 # the trainer's own: the ratio is exactly 1
        ro["ref"] = ro["old"] + 0.3 * torch.randn(ro["old"].shape, generator=torch.Generator().manual_seed(0))
        tr.actor.zero_grad(set_to_none=True)
        loss, st = tr.actor_run(tr._loss, ro, [0, 1], float(ro["lengths"].sum()), float(ro["lengths"].numel()))
        loss.backward()
        out[level] = (loss.detach(), st, grads(tr.actor))
    (l1, s1, g1), (l2, s2, g2) = out["token"], out["sequence"]
    assert float(s1["kl"]) > 1e-3 and float(s1["ratio_max"]) == pytest.approx(1.0, abs=1e-5)
    assert_close(l1, l2, "loss", atol=1e-5, rtol=1e-4)
    for key in ("kl", "entropy", "ratio_mean", "approx_kl"):
        assert_close(s1[key], s2[key], key, atol=1e-5, rtol=1e-4)
    for n in g1:
        assert_close(g1[n], g2[n], f"grad {n}", atol=1e-5, rtol=1e-3)


def test_rollout_importance_weights_scale_the_policy_term(tok, tmp_path):
    """rollout_is: the sampler's log-probs are the weights' (the ratio's old log-probs are recomputed); with the
    sampler in fp32 they agree, so the weights are ~1; doubled weights double a KL-free loss and its gradient."""
    tr = grpo(tok, tmp_path, rollout_is="sequence_truncate", rollout_is_max=2.0, beta=0.0)
    assert not tr.sampler_logprobs
    ro = tr.rollout(0)
    assert ro["is_w"].shape == ro["old"].shape
    assert_close(ro["is_w"], torch.ones_like(ro["is_w"]), "weights", atol=1e-3, rtol=0)
    assert abs(ro["stats"]["rollout_is_weight"] - 1.0) < 1e-3 and ro["stats"]["rollout_is_log_diff"] < 1e-3
    with torch.no_grad():
        for p in tr.actor_run.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = []
    for scale in (1.0, 2.0):
        ro2 = dict(ro, is_w=ro["is_w"] * scale)
        tr.actor.zero_grad(set_to_none=True)
        loss, _ = tr.actor_run(tr._loss, ro2, [0, 1], float(ro["lengths"].sum()), float(ro["lengths"].numel()))
        loss.backward()
        out.append((loss.detach(), grads(tr.actor)))
    assert_close(out[1][0], 2 * out[0][0], "loss", atol=1e-6, rtol=1e-5)
    for n in out[0][1]:
        assert_close(out[1][1][n], 2 * out[0][1][n], f"grad {n}", atol=1e-6, rtol=1e-4)
    tr.train()


def test_grpo_trains_saves_and_resumes(tok, tmp_path):
    full = grpo(tok, tmp_path / "a", checkpoint_every=1, iterations=3)
    res = full.train()
    assert res["iterations"] == 3 and res["packing"] == "shared_prefix"
    log = [json.loads(x) for x in (tmp_path / "a" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(0.0 <= r["reward"] <= 1.0 and r["frac_reward_zero_std"] <= 1.0 for r in log)
    assert (tmp_path / "a" / "grpo" / "model" / "model.safetensors").exists()

    killed = grpo(tok, tmp_path / "b", checkpoint_every=1, iterations=3)
    kill_after(killed, 2)
    with pytest.raises(Killed):
        killed.train()
    resumed = grpo(tok, tmp_path / "b", checkpoint_every=1, iterations=3, resume=True)
    resumed.train()
    assert resumed.iteration == full.iteration == 3
    for (n, a), b in zip(full.actor.state_dict().items(), resumed.actor.state_dict().values(), strict=True):
        assert_close(a, b, n, atol=1e-6, rtol=1e-5)


def test_rloo_with_lora_reference_is_the_base_model(tok, tmp_path):
    tr = grpo(tok, tmp_path, advantage="rloo", lora_r=4, beta=0.05, iterations=1)
    assert tr.ref is None  # the reference is the actor with its adapter disabled
    ro = tr.rollout(0)
    adv = ro["adv"].view(2, 4)
    assert torch.all(adv.sum(1).abs() < 1e-5)  # leave-one-out advantages of a group sum to 0
    assert_close(ro["ref"], ro["old"], "reference = starting policy", atol=1e-4, rtol=1e-4)
    tr.train()


def test_grpo_bad_options(tok, tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        grpo(tok, tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo(tok, tmp_path, loss_type="sapo")
    with pytest.raises(ValueError, match="epsilon_high: with loss_type 'cispo'"):
        grpo(tok, tmp_path, loss_type="cispo")
    with pytest.raises(ValueError, match="loss_type: 'cispo' takes neither"):
        grpo(tok, tmp_path, loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo(tok, tmp_path, importance_sampling_level="answer")
    with pytest.raises(ValueError, match=r"delta: expected a number > 1 \+ epsilon_high = 1.28"):
        grpo(tok, tmp_path, delta=1.2, epsilon_high=0.28)
    with pytest.raises(ValueError, match="rollout_is: expected one of"):
        grpo(tok, tmp_path, rollout_is="tis")
    with pytest.raises(ValueError, match="old_logprobs must be 'recompute' or 'auto'"):
        grpo(tok, tmp_path, rollout_is="token_mask", old_logprobs="sampler")
    with pytest.raises(ValueError, match="advantage"):
        grpo(tok, tmp_path, advantage="gae")
    with pytest.raises(ValueError, match="reward_model"):
        GRPOTrainer(GRPOConfig(model="given", device="cpu"), policy=chat_model(tok), tokenizer=tok, prompts=prompts())


def pairs_file(tmp_path, n=8):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["completion"],
                                        "rejected": "no " * (i % 3 + 1)}) + "\n" for i, r in enumerate(rows(n))))
    return data


def test_dpo_packed_loss_and_gradients_equal_padded(tok, tmp_path):
    tr = DPOTrainer(DPOConfig(model="given", data=str(pairs_file(tmp_path)), device="cpu", eval_fraction=0.0,
                              output_dir=str(tmp_path / "dpo")), model=chat_model(tok), tokenizer=tok, progress=False)
    assert tr.packing == "shared_prefix"
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = {}
    for packing in ("shared_prefix", "padded"):
        tr.packing = packing
        tr.model.zero_grad(set_to_none=True)
        loss, st = tr._loss(tr.model, tr.train_rows[:5], tr.train_ref[:5])
        loss.backward()
        out[packing] = (loss.detach(), grads(tr.model))
    assert_close(out["shared_prefix"][0], out["padded"][0], "loss", atol=1e-5, rtol=1e-4)
    for n, g in out["shared_prefix"][1].items():
        assert_close(g, out["padded"][1][n], f"grad {n}", atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_trains_from_a_preference_file(tok, tmp_path, lora):
    base = saved_chat_model(tok, tmp_path / "base")
    cfg = DPOConfig(model=base, data=str(pairs_file(tmp_path, 10)), device="cpu", eval_fraction=0.2, batch_size=4,
                    epochs=3, lr=5e-3, lora_r=lora, output_dir=str(tmp_path / "dpo"), log_every=1)
    tr = DPOTrainer(cfg, progress=False)
    start = tr.reference_logprobs(tr.train_rows)
    assert_close(start, tr.train_ref, "reference log-probs = the starting model's", atol=1e-5, rtol=1e-5)
    res = tr.train()
    assert res["pairs"] == 8 and res["rows_without_pair"] == 0 and "eval_reward_accuracy" in res
    log = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert log[-2]["loss"] < log[0]["loss"]  # the last step's loss below the first (0.693 at the start)
    assert (tmp_path / "dpo" / "model" / "model.safetensors").exists()
    if lora:  # the adapter disabled is the reference
        c, r = tr.engine.no_grad(without_adapter(tr._pair_logprobs), tr.train_rows[:4])
        assert_close(torch.stack([c, r], 1), tr.train_ref[:4], "adapter off = reference", atol=1e-5, rtol=1e-5)


def test_dpo_ranked_rows_give_every_ordered_pair(tok, tmp_path):
    from rlhf_fast.pipeline.dpo import preference_pairs

    pairs, without = preference_pairs([{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 0, 1]},
                                       {"prompt": "q", "responses": ["x", "y"], "ranking": [0, 0]}])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a"), ("b", "c")] and without == 1


def test_pair_logprobs_are_sequence_sums(tok):
    model = chat_model(tok)
    batch = [([5, 6, 7], [8, 9], [10]), ([11], [12, 13, 14], [15, 16])]
    c, r = pair_logprobs(model, batch, "padded", tok.pad_token_id, "cpu")
    for (p, ch, rj), lc, lr in zip(batch, c, r, strict=True):
        for ans, got in ((ch, lc), (rj, lr)):
            ids = torch.tensor([p + ans])
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            want = lp[torch.arange(len(p) - 1, len(p) + len(ans) - 1), torch.tensor(ans)].sum()
            assert_close(got, want, "sequence log-prob", atol=1e-4, rtol=1e-4)


def test_cli_grpo_and_dpo(tok, tmp_path, capsys):
    base = saved_chat_model(tok, tmp_path / "base")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts()))
    rc = main(["grpo", "--model", base, "--prompts", str(data), "--rule_rewards", "test_grpo_dpo:length_rule",
               "--iterations", "1", "--prompts_per_iteration", "2", "--num_generations", "2", "--max_new_tokens",
               "4", "--device", "cpu", "--output_dir", str(tmp_path / "g"), "--quiet"])
    assert rc == 0 and (tmp_path / "g" / "model" / "model.safetensors").exists()
    rc = main(["dpo", "--model", base, "--data", str(pairs_file(tmp_path)), "--max_steps", "1", "--batch_size",
               "2", "--loss_type", "ipo", "--device", "cpu", "--output_dir", str(tmp_path / "d"), "--quiet"])
    assert rc == 0 and (tmp_path / "d" / "model" / "model.safetensors").exists()
    rc = main(["grpo", "--model", base, "--prompts", str(data), "--device", "cpu", "--quiet",
               "--output_dir", str(tmp_path / "x")])
    assert rc == 2 and "reward_model" in capsys.readouterr().err


def test_ppo_packed_actor_and_critic_losses_equal_padded(tok, tmp_path):
    """PPO with samples_per_prompt > 1: the actor's linear_ppo_loss (with ptx) and the critic's value_loss on
    whole groups packed equal the padded rows' (loss and every gradient)."""
    from rlhf_fast.pipeline.config import PPOConfig
    from rlhf_fast.pipeline.ppo import PPOTrainer

    base = saved_chat_model(tok, tmp_path / "base")
    rm = C.load_scalar_model(base, pad_token_id=tok.pad_token_id)
    ptx = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows(4)]
    tr = PPOTrainer(PPOConfig(policy=base, output_dir=str(tmp_path / "ppo"), device="cpu", prompts_per_iteration=2,
                              samples_per_prompt=3, max_new_tokens=6, minibatch_size=6, ptx_batch_size=2),
                    policy=C.load_causal_lm(base), reward_model=rm, tokenizer=tok, prompts=prompts(), ptx_data=ptx,
                    progress=False)
    assert tr.packing == "shared_prefix"
    ro = tr.rollout(0)
    with torch.no_grad():
        for m in (tr.actor, tr.critic):
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    rows_ = torch.arange(6)
    n_tok = int(ro["samples"].response_mask.sum())
    ptx_batch = tr.ptx_batch(0, 0, 0)
    out = {}
    for packing in ("shared_prefix", "padded"):
        tr.packing = packing
        tr.actor.zero_grad(set_to_none=True)
        tr.critic.zero_grad(set_to_none=True)
        loss, st = tr.actor_run(tr._actor_loss, ro, rows_, ptx_batch, n_tok, 0.5)
        vloss, _ = tr.critic_run(tr._critic_loss, ro, rows_, n_tok)
        (loss + vloss).backward()
        out[packing] = (loss.detach(), vloss.detach(), st, grads(tr.actor), grads(tr.critic))
    a, b = out["shared_prefix"], out["padded"]
    assert_close(a[0], b[0], "actor loss", atol=1e-5, rtol=1e-4)
    assert_close(a[1], b[1], "value loss", atol=1e-5, rtol=1e-4)
    for key in ("clip_frac", "ratio_mean", "ptx_loss"):
        assert_close(a[2][key], b[2][key], key, atol=1e-5, rtol=1e-4)
    for ga, gb in ((a[3], b[3]), (a[4], b[4])):
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            assert_close(ga[n], gb[n], f"grad {n}", atol=1e-5, rtol=1e-3)
    tr.packing = "shared_prefix"
    st = tr.step()  # a whole packed iteration: minibatches of whole groups
    assert st["actor_grad_norm"] > 0 and st["critic_grad_norm"] > 0
