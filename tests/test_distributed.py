"""Scale-out: the pipeline's trainers under real ``torchrun --nproc_per_node=2`` (gloo, CPU) against one
process, gradient accumulation, FSDP2 sharded checkpoints and the gathered export, LoRA.

Two torchrun launches (module fixtures) run this file as a worker script: ``ddp`` (SFT, RM with
grad_accum=2, PPO, a LoRA PPO iteration, DPO and GRPO with grad_accum=2, the CLI) and ``fsdp`` (SFT with grad_accum=2
and activation checkpointing, a killed-and-resumed SFT run, RM, PPO, DPO with grad_accum=2, GRPO with GSPO's ratio).
The tests compare what the ranks wrote with world-size-1 runs of the
same global batches in the pytest process.

Tolerances (fp32): world size 2 and world size 1 differ only in summation order (each rank sums its share
of the batch, the all-reduce adds the shares; fp32 GEMMs on 1 vs 2 threads). Measured on this CPU over 3
SFT / RM steps of a tiny Llama (DDP, and FSDP2 with 2 micro-batches): loss curves within 4.2e-7 and
parameters within 3.1e-5 after AdamW (whose normalisation magnifies rounding in near-zero gradients);
whitened advantages within 1.2e-7. The assertions allow LOSS_ATOL / PARAM_ATOL / WHITEN_ATOL.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from rlhf_fast.pipeline import common as C  # noqa: E402
from rlhf_fast.pipeline import distributed as D  # noqa: E402
from rlhf_fast.pipeline.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig  # noqa: E402
from rlhf_fast.pipeline.dpo import DPOTrainer  # noqa: E402
from rlhf_fast.pipeline.grpo import GRPOTrainer  # noqa: E402
from rlhf_fast.pipeline.ppo import PPOTrainer  # noqa: E402
from rlhf_fast.pipeline.reward import RewardTrainer  # noqa: E402
from rlhf_fast.pipeline.sft import SFTTrainer  # noqa: E402
from rlhf_fast.pipeline.task import TopicTask, build_tokenizer, sft_examples  # noqa: E402

LOSS_ATOL = 5e-6     # loss curves, world size 2 vs 1 (measured <= 4.2e-7)
PARAM_ATOL = 1e-4    # parameters after 3 AdamW steps, world size 2 vs 1 (measured <= 2.3e-5)
WHITEN_ATOL = 1e-5   # whitened advantages, all-reduced statistics vs rlhf_fast.gae(whiten=True) on one process
SFT_STEPS, RM_STEPS, DPO_STEPS = 3, 3, 3


# ---------------------------------------------------------------------------------------------
# The runs (the same functions run in the pytest process and on every torchrun rank)
# ---------------------------------------------------------------------------------------------

def tiny(tok, seed=0):
    """Tied embeddings, as most small open models have them (SmolLM2, Qwen2.5, Llama-3.2, Gemma): DDP,
    FSDP2 sharding, sharded checkpoints and the gathered export all see one shared weight."""
    return C.build_tiny_llama(tok, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              seed=seed, tie_word_embeddings=True)


def sft_data():
    return sft_examples(TopicTask(), 8 * SFT_STEPS, torch.Generator().manual_seed(0))


def rm_data():
    task, g = TopicTask(), torch.Generator().manual_seed(1)
    answers = [r["response"] for r in sft_examples(task, 64, g)]
    rows = []
    for i, p in enumerate(task.prompts(8 * RM_STEPS, g)):
        ans = answers[(5 * i) % 60: (5 * i) % 60 + 3 + i % 3]
        rows.append({"prompt": p, "responses": ans, "ranking": task.rank(p, ans, g)})
    return rows


def ppo_data():
    task, g = TopicTask(), torch.Generator().manual_seed(0)
    return [{"prompt": p} for p in task.prompts(16, g)], sft_examples(task, 16, g)


def save_base_models(root: Path) -> None:
    """The policy and the reward model every run starts from (the reward model's head is initialised from
    the seed when loaded, the same in every process)."""
    tok = build_tokenizer()
    C.save_model(tiny(tok, 0), tok, root / "base0")
    C.save_model(tiny(tok, 2), tok, root / "base2")


def run_sft(out: Path, **kw):
    tok = build_tokenizer()
    cfg = SFTConfig(output_dir=str(out), batch_size=8, epochs=1, lr=1e-2, warmup_steps=1, device="cpu",
                    eval_fraction=0.0, log_every=1, **kw)
    tr = SFTTrainer(cfg, model=tiny(tok), tokenizer=tok, train_data=sft_data(), progress=False)
    tr.train()
    return tr


def run_rm(out: Path, base: Path, **kw):
    tok = build_tokenizer()
    cfg = RMConfig(output_dir=str(out), batch_size=8, epochs=1, lr=1e-2, warmup_steps=1, device="cpu",
                   eval_fraction=0.0, log_every=1, **kw)
    model = C.load_scalar_model(str(base / "base0"), pad_token_id=tok.pad_token_id, seed=0)
    tr = RewardTrainer(cfg, model=model, tokenizer=tok, train_data=rm_data(), progress=False)
    tr.train()
    return tr


def run_dpo(out: Path, base: Path, **kw):
    tok = build_tokenizer()
    cfg = DPOConfig(output_dir=str(out), batch_size=8, max_steps=DPO_STEPS, lr=1e-2, warmup_steps=1, device="cpu",
                    eval_fraction=0.0, log_every=1, **kw)
    tr = DPOTrainer(cfg, model=C.load_causal_lm(str(base / "base0")), tokenizer=tok, train_data=rm_data(),
                    progress=False)
    tr.train()
    return tr


def answer_words(prompt: str, response: str) -> float:
    """A rule reward for the GRPO runs: the answer's word count."""
    return float(len(response.split()))


def run_grpo(out: Path, base: Path, **kw):
    tok = build_tokenizer()
    prompts, _ = ppo_data()
    cfg = GRPOConfig(output_dir=str(out), iterations=2, prompts_per_iteration=4, num_generations=2, max_new_tokens=6,
                     beta=0.05, lr=5e-4, device="cpu", temperature=1.0, **kw)
    tr = GRPOTrainer(cfg, policy=C.load_causal_lm(str(base / "base0")), tokenizer=tok, prompts=prompts,
                     rules=[answer_words], progress=False)
    tr.train()
    return tr


def make_ppo(out: Path, base: Path, **kw):
    tok = build_tokenizer()
    prompts, ptx = ppo_data()
    cfg = dict(output_dir=str(out), iterations=1, prompts_per_iteration=4, samples_per_prompt=2, max_new_tokens=6,
               ppo_epochs=1, minibatch_size=4, ptx_batch_size=4, device="cpu", eval_every=0, lr=5e-4, critic_lr=1e-3,
               temperature=1.0)
    cfg.update(kw)
    rm = C.load_scalar_model(str(base / "base2"), pad_token_id=tok.pad_token_id, seed=0)
    return PPOTrainer(PPOConfig(**cfg), policy=C.load_causal_lm(str(base / "base0")), reward_model=rm,
                      tokenizer=tok, prompts=prompts, ptx_data=ptx, progress=False)


def dump_params(model, d: D.Dist, path: Path) -> None:
    from safetensors.torch import save_file

    state = D.full_state_dict(model, d)
    if d.is_main:
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))  # tied: 2 keys


def losses(directory: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in C.read_metrics(Path(directory) / "metrics.jsonl") if key in r]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def torchrun(mode: str, out: Path) -> None:
    """This file as the worker of a 2-process torchrun on gloo/CPU (a free port: --standalone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, mode,
           str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RLHF_FAST_BACKEND", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun {mode} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def prepare(root: Path) -> Path:
    (root / "base").mkdir(parents=True)
    save_base_models(root / "base")
    (root / "base" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_data()))
    return root


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = prepare(tmp_path_factory.mktemp("ddp"))
    torchrun("ddp", out)
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = prepare(tmp_path_factory.mktemp("fsdp"))
    torchrun("fsdp", out)
    proc = subprocess.run([sys.executable, __file__, "fsdp1", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fsdp1 failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """World size 1, no torchrun: the same global batches in one process."""
    out = prepare(tmp_path_factory.mktemp("single"))
    sft = run_sft(out / "sft")
    rm = run_rm(out / "rm", out / "base")
    dpo = run_dpo(out / "dpo", out / "base")
    return {"root": out, "dpo_loss": losses(out / "dpo"),
            "dpo_params": {k: v.detach().clone() for k, v in dpo.model.state_dict().items()},
            "sft_loss": losses(out / "sft"), "rm_loss": losses(out / "rm"),
            "rm_accuracy": losses(out / "rm", "accuracy"),
            "sft_params": {k: v.detach().clone() for k, v in sft.model.state_dict().items()},
            "rm_params": {k: v.detach().clone() for k, v in rm.model.state_dict().items()}}


def max_param_diff(path: Path, ref: dict) -> float:
    from safetensors.torch import load_file

    got = load_file(str(path))
    assert set(got) == set(ref)
    return max(float((got[k] - ref[k]).abs().max()) for k in ref)


def assert_curve(got: list[float], ref: list[float], steps: int) -> float:
    assert len(got) == len(ref) == steps  # rank 0 alone logs: one row per step
    diff = max(abs(a - b) for a, b in zip(got, ref, strict=True))
    assert diff <= LOSS_ATOL, (got, ref)
    return diff


def test_sft_and_rm_ddp_world_size_2_equal_world_size_1(ddp_run, single):
    d_sft = assert_curve(losses(ddp_run / "sft"), single["sft_loss"], SFT_STEPS)
    d_rm = assert_curve(losses(ddp_run / "rm"), single["rm_loss"], RM_STEPS)
    assert losses(ddp_run / "rm", "accuracy") == pytest.approx(single["rm_accuracy"], abs=1e-6)
    p_sft = max_param_diff(ddp_run / "sft_params.safetensors", single["sft_params"])
    p_rm = max_param_diff(ddp_run / "rm_params.safetensors", single["rm_params"])
    print(f"ddp vs world size 1: loss {d_sft:.2e} / {d_rm:.2e}, params {p_sft:.2e} / {p_rm:.2e} (SFT / RM)")
    assert p_sft <= PARAM_ATOL and p_rm <= PARAM_ATOL
    # the parameters moved: the comparison is not between two untouched models
    from safetensors.torch import load_file

    start = load_file(str(single["root"] / "base" / "base0" / "model.safetensors"))
    moved = max(float((single["sft_params"][k] - start[k]).abs().max()) for k in start)
    assert moved > 100 * PARAM_ATOL


def test_dpo_ddp_world_size_2_equals_world_size_1_and_grpo_runs(ddp_run, single):
    """DPO: 2 ranks x 2 micro-batches give the loss curve and weights of one process (each rank computes the
    reference log-probs of every pair). GRPO under DDP: two iterations with batch-scaled advantages (every
    rank's scores) and the KL term, exported."""
    d = assert_curve(losses(ddp_run / "dpo"), single["dpo_loss"], DPO_STEPS)
    p = max_param_diff(ddp_run / "dpo_params.safetensors", single["dpo_params"])
    print(f"ddp vs world size 1 (DPO): loss {d:.2e}, params {p:.2e}")
    assert p <= PARAM_ATOL
    rows = C.read_metrics(ddp_run / "grpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (ddp_run / "grpo" / "model" / "model.safetensors").exists()


def test_fsdp_grad_accum_and_checkpointing_equal_world_size_1(fsdp_run, single):
    """FSDP2, 2 ranks x 2 micro-batches, activation checkpointing: the curve and weights of one process."""
    d_sft = assert_curve(losses(fsdp_run / "sft"), single["sft_loss"], SFT_STEPS)
    d_rm = assert_curve(losses(fsdp_run / "rm"), single["rm_loss"], RM_STEPS)
    p_sft = max_param_diff(fsdp_run / "sft_params.safetensors", single["sft_params"])
    p_rm = max_param_diff(fsdp_run / "rm_params.safetensors", single["rm_params"])
    print(f"fsdp vs world size 1: loss {d_sft:.2e} / {d_rm:.2e}, params {p_sft:.2e} / {p_rm:.2e} (SFT / RM)")
    assert p_sft <= PARAM_ATOL and p_rm <= PARAM_ATOL


def test_dpo_fsdp_equals_world_size_1_and_grpo_runs(fsdp_run, single):
    """FSDP2 (2 ranks x 2 micro-batches, the packed [prompt, chosen, rejected] forward through the sharded
    model): DPO's curve and weights are one process's; GRPO (GSPO's ratio, the log-prob path) trains and exports."""
    d = assert_curve(losses(fsdp_run / "dpo"), single["dpo_loss"], DPO_STEPS)
    p = max_param_diff(fsdp_run / "dpo_params.safetensors", single["dpo_params"])
    print(f"fsdp vs world size 1 (DPO): loss {d:.2e}, params {p:.2e}")
    assert p <= PARAM_ATOL
    rows = C.read_metrics(fsdp_run / "grpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (fsdp_run / "grpo" / "model" / "model.safetensors").exists()


def test_fsdp_sharded_checkpoint_resume_and_export(fsdp_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ck = fsdp_run / "sft_killed" / "checkpoint"
    shards = sorted(p.name for p in (ck / "sharded").iterdir())
    assert len(shards) == 2 and all(n.endswith(".safetensors") for n in shards)   # one file per rank
    assert not [p for p in ck.rglob("*") if p.suffix in (".pt", ".pkl", ".bin", ".metadata", ".distcp")]
    # killed after step 2's checkpoint, resumed from the shards: the weights of the uninterrupted run
    resumed = load_file(str(fsdp_run / "sft_resumed_params.safetensors"))
    full = load_file(str(fsdp_run / "sft_params.safetensors"))
    assert max(float((resumed[k] - full[k]).abs().max()) for k in full) <= 1e-6
    steps = [r["step"] for r in C.read_metrics(fsdp_run / "sft_killed" / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    # the same shards resumed by one process (an FSDP group of one, no torchrun): DCP reshards them
    w1 = load_file(str(fsdp_run / "sft_w1_params.safetensors"))
    assert max(float((w1[k] - full[k]).abs().max()) for k in full) <= PARAM_ATOL
    # the gathered export loads with plain transformers and holds the trained weights
    model = AutoModelForCausalLM.from_pretrained(fsdp_run / "sft" / "model")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0, msg=k)
    # tied embeddings stay one weight through sharding, the sharded checkpoint and the gathered export
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(full["lm_head.weight"], full["model.embed_tokens.weight"], rtol=0, atol=0)


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    t = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, t - p.shape[1])) for p in parts])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ppo_world_size_2_whitens_with_global_statistics(mode, request):
    """One PPO iteration on 2 ranks completes; the advantages each rank whitened with all-reduced
    statistics are what rlhf_fast.gae(whiten=True) gives on one process for all ranks' rollouts."""
    from safetensors.torch import load_file

    import rlhf_fast

    root = request.getfixturevalue(f"{mode}_run")
    rows = [json.loads(x) for x in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and all(v == v for v in rows[0].values() if isinstance(v, float))
    parts = [load_file(str(root / f"rollout_rank{r}.safetensors")) for r in (0, 1)]
    cat = {k: _cat_rows([p[k] for p in parts]) for k in parts[0]}
    mask = cat["mask"].bool()
    cfg = PPOConfig()
    adv1, ret1 = rlhf_fast.gae(cat["rewards"], cat["values"], mask, gamma=cfg.gamma, lam=cfg.lam, whiten=True)
    torch.testing.assert_close(cat["adv"], adv1, atol=WHITEN_ATOL, rtol=0)
    torch.testing.assert_close(cat["ret"], ret1, atol=1e-6, rtol=0)
    # per-rank whitening would give other numbers: the test can tell
    local = rlhf_fast.gae(parts[0]["rewards"], parts[0]["values"], parts[0]["mask"].bool(), whiten=True)[0]
    assert float((local - parts[0]["adv"]).abs().max()) > 10 * WHITEN_ATOL
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(root / "ppo" / "model")


def test_ddp_lora_ppo_and_cli_under_torchrun(ddp_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    rows = C.read_metrics(ddp_run / "ppo_lora" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]
    AutoModelForCausalLM.from_pretrained(ddp_run / "ppo_lora" / "model")        # LoRA merged into the weights
    AutoModelForSequenceClassification.from_pretrained(ddp_run / "ppo_lora" / "critic")
    cli = C.read_metrics(ddp_run / "cli" / "metrics.jsonl")
    assert [r["step"] for r in cli] == [1, 2] and cli[0]["tokens"] > 0
    assert (ddp_run / "cli" / "model" / "model.safetensors").exists()


def test_grad_accum_in_one_process_equals_one_batch(tmp_path, single):
    """4 micro-batches normalised by the batch's token count: the same steps as one batch."""
    tr = run_sft(tmp_path / "sft", grad_accum=4)
    assert_curve(losses(tmp_path / "sft"), single["sft_loss"], SFT_STEPS)
    diff = max(float((v - single["sft_params"][k]).abs().max()) for k, v in tr.model.state_dict().items())
    assert diff <= PARAM_ATOL


def test_lora_ppo_holds_one_copy_and_reference_is_the_base_model(tmp_path):
    """LoRA actor and critic: no reference copy and no reward-model copy; the reference log-probs (adapter
    disabled) equal the untouched SFT model's, while the trained actor has moved away from them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaModel

    root = prepare(tmp_path)
    base = C.load_causal_lm(str(root / "base" / "base0"))
    rm = C.load_scalar_model(str(root / "base" / "base2"), pad_token_id=build_tokenizer().pad_token_id, seed=0)
    tr = make_ppo(root / "ppo", root / "base", lora_r=4, lora_alpha=8, lr=5e-2)
    assert isinstance(tr.actor, PeftModel) and isinstance(tr.critic, PeftModel)
    assert tr.ref is None and tr.reward_model is None
    modules = [v for v in vars(tr).values() if isinstance(v, torch.nn.Module)]
    networks = {id(m) for top in modules for m in top.modules() if isinstance(m, LlamaModel)}
    assert len(networks) == 2                          # the policy network and the reward-model network, once each
    # bytes held: the two networks once, plus the adapters and the critic's trained copy of the head
    extra = sum(p.numel() * p.element_size() for m in (tr.actor, tr.critic) for n, p in m.named_parameters()
                if "lora_" in n or "modules_to_save" in n)
    assert D.storage_bytes(modules) == D.storage_bytes([base, rm]) + extra
    trainable = sum(p.numel() for p in tr.actor.parameters() if p.requires_grad)
    assert 0 < trainable < 0.25 * sum(p.numel() for p in base.parameters())  # (tied: the embedding once)

    tr.train()
    s = tr.rollout(1)["samples"]
    ids, attn, labels, mask = s.input_ids, s.attention_mask, s.labels, s.response_mask
    with torch.no_grad():
        want = C.token_logprobs(base, ids, attn, labels)
        actor = C.token_logprobs(tr.actor, ids, attn, labels)
        h = C.hidden_states(rm, ids, attn)
        rm_want = rm.score(h[torch.arange(len(ids)), s.last_index]).squeeze(-1)
    ref = tr.ref_logprobs(ids, attn, labels)
    torch.testing.assert_close(ref * mask, want * mask, atol=1e-6, rtol=0)
    assert float(((actor - want) * mask).abs().max()) > 1e-3
    torch.testing.assert_close(tr.scores(s, [""] * 16)[1], rm_want, atol=1e-6, rtol=0)
    # the export has the adapter merged: plain transformers gives the trained actor's log-probs
    merged = AutoModelForCausalLM.from_pretrained(root / "ppo" / "model")
    with torch.no_grad():
        torch.testing.assert_close(C.token_logprobs(merged, ids, attn, labels) * mask, actor * mask, atol=1e-5,
                                   rtol=0)


def test_none_refuses_a_multi_process_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="pass --distributed ddp or --distributed fsdp"):
        D.setup("none", "cpu")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="distributed: expected one of"):
        D.setup("zero3", "cpu")
    d = D.Dist()
    with pytest.raises(ValueError, match=r"world_size x grad_accum = 1 x 4"):
        D.check_batch("batch_size", 3, d, 4)
    assert [(s.start, s.stop) for s in D.micro_splits(7, 3)] == [(0, 3), (3, 5), (5, 7)]
    assert D.shard(list(range(7)), D.Dist(rank=1, world_size=2)) == [1, 3, 5]


# ---------------------------------------------------------------------------------------------
# Worker: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/test_distributed.py MODE OUT
# ---------------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def _ppo_rollout_dump(tr: PPOTrainer, out: Path) -> None:
    """Run one iteration, keeping this rank's rollout tensors for the whitening comparison."""
    from safetensors.torch import save_file

    rollout = tr.rollout
    kept = {}

    def keep(it):
        ro = rollout(it)
        kept.update({k: ro[k].contiguous() for k in ("rewards", "values", "adv", "ret")})
        kept["mask"] = ro["samples"].response_mask.contiguous()
        return ro
    tr.rollout = keep
    tr.train()
    save_file(kept, str(out / f"rollout_rank{tr.dist.rank}.safetensors"))


def killed_and_resumed_sft(out: Path, keep: Path | None = None, **kw):
    """An SFT run killed after its checkpoint of step 2 (copied to `keep`), then resumed (from a model with
    other weights)."""
    tok = build_tokenizer()
    cfg = SFTConfig(output_dir=str(out), batch_size=8, epochs=1, lr=1e-2, warmup_steps=1, device="cpu",
                    eval_fraction=0.0, log_every=1, checkpoint_every=2, **kw)
    tr = SFTTrainer(cfg, model=tiny(tok), tokenizer=tok, train_data=sft_data(), progress=False)
    step = tr.step

    def dying(batch):
        if tr.step_count == 2:
            raise Killed
        return step(batch)
    tr.step = dying
    with pytest.raises(Killed):
        tr.train()
    if keep is not None and tr.dist.is_main:
        shutil.copytree(out / "checkpoint", keep / "checkpoint")
    tr.dist.barrier()
    cfg.resume = True
    tr = SFTTrainer(cfg, model=tiny(tok, seed=5), tokenizer=tok, train_data=sft_data(), progress=False)
    tr.train()
    return tr


def worker(mode: str, out: Path) -> None:
    base = out / "base"
    if mode == "ddp":
        tr = run_sft(out / "sft", distributed="ddp")
        dump_params(tr.model, tr.dist, out / "sft_params.safetensors")
        tr = run_rm(out / "rm", base, distributed="ddp", grad_accum=2)
        dump_params(tr.model, tr.dist, out / "rm_params.safetensors")
        _ppo_rollout_dump(make_ppo(out / "ppo", base, distributed="ddp"), out)
        make_ppo(out / "ppo_lora", base, distributed="ddp", lora_r=4, lora_alpha=8).train()
        tr = run_dpo(out / "dpo", base, distributed="ddp", grad_accum=2)
        dump_params(tr.model, tr.dist, out / "dpo_params.safetensors")
        run_grpo(out / "grpo", base, distributed="ddp", grad_accum=2, scale_rewards="batch")
        from rlhf_fast.pipeline.cli import main as cli_main  # last: the command ends the process group

        rc = cli_main(["sft", "--preset", "tiny", "--distributed", "ddp", "--data", str(base / "sft.jsonl"),
                       "--output_dir", str(out / "cli"), "--max-steps", "2", "--batch_size", "4", "--grad-accum", "2",
                       "--eval_fraction", "0", "--log_every", "1", "--device", "cpu", "--quiet"])
        assert rc == 0
    elif mode == "fsdp":
        tr = run_sft(out / "sft", distributed="fsdp", grad_accum=2, gradient_checkpointing=True)
        dump_params(tr.model, tr.dist, out / "sft_params.safetensors")
        tr = killed_and_resumed_sft(out / "sft_killed", out / "sft_w1", distributed="fsdp", grad_accum=2)
        dump_params(tr.model, tr.dist, out / "sft_resumed_params.safetensors")
        tr = run_rm(out / "rm", base, distributed="fsdp")
        dump_params(tr.model, tr.dist, out / "rm_params.safetensors")
        _ppo_rollout_dump(make_ppo(out / "ppo", base, distributed="fsdp"), out)
        tr = run_dpo(out / "dpo", base, distributed="fsdp", grad_accum=2)
        dump_params(tr.model, tr.dist, out / "dpo_params.safetensors")
        run_grpo(out / "grpo", base, distributed="fsdp", grad_accum=2, scale_rewards="batch",
                 importance_sampling_level="sequence")
    elif mode == "fsdp1":  # no torchrun: a one-process FSDP group resumes the 2-rank shards of step 2
        tok = build_tokenizer()
        cfg = SFTConfig(output_dir=str(out / "sft_w1"), batch_size=8, epochs=1, lr=1e-2, warmup_steps=1,
                        device="cpu", eval_fraction=0.0, log_every=1, checkpoint_every=2, distributed="fsdp",
                        resume=True)
        tr = SFTTrainer(cfg, model=tiny(tok, seed=5), tokenizer=tok, train_data=sft_data(), progress=False)
        assert tr.dist.world_size == 1
        tr.train()
        dump_params(tr.model, tr.dist, out / "sft_w1_params.safetensors")
    D.shutdown()


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
    sys.exit(0)
