"""Every data format through every stage that takes it, on the chat model of tests/test_real_models.py
(SmolLM2's real tokenizer and chat template, tied embeddings): a JSONL file per format, read by the stage
from its config, one optimizer step (one PPO iteration), the model exported."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from test_formats import CASES  # noqa: E402
from test_real_models import ASSETS, saved_chat_model  # noqa: E402

from rlhf_fast.pipeline import common as C  # noqa: E402
from rlhf_fast.pipeline.config import PPOConfig, RMConfig, SFTConfig  # noqa: E402
from rlhf_fast.pipeline.ppo import PPOTrainer  # noqa: E402
from rlhf_fast.pipeline.reward import RewardTrainer  # noqa: E402
from rlhf_fast.pipeline.sft import SFTTrainer  # noqa: E402

STAGE_CASES = [(stage, case) for case, (_, by_stage) in CASES.items() for stage in ("sft", "rm", "ppo")
               if stage in by_stage]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return saved_chat_model(C.load_tokenizer(str(ASSETS)), tmp_path_factory.mktemp("chat") / "base")


@pytest.mark.parametrize("stage, case", STAGE_CASES, ids=[f"{s}-{c}" for s, c in STAGE_CASES])
def test_format_through_stage(tmp_path, base, stage, case):
    row = CASES[case][0]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(4)))
    out = tmp_path / stage
    common = dict(output_dir=str(out), device="cpu", seed=0)
    if stage == "sft":
        res = SFTTrainer(SFTConfig(model=base, data=str(data), batch_size=2, max_steps=1, eval_fraction=0.0,
                                   max_response_len=16, **common), progress=False).train()
        assert res["steps"] == 1
    elif stage == "rm":
        res = RewardTrainer(RMConfig(model=base, data=str(data), batch_size=2, max_steps=1, eval_fraction=0.0,
                                     max_response_len=16, **common), progress=False).train()
        assert res["steps"] == 1
    else:
        res = PPOTrainer(PPOConfig(policy=base, reward_model=base, prompts=str(data), iterations=1,
                                   prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=4, minibatch_size=4,
                                   ppo_epochs=1, eval_every=0, **common), progress=False).train()
        assert res["iterations"] == 1
    assert (out / "model" / "model.safetensors").exists()


def test_rm_merges_consistent_pairs_from_its_config(tmp_path, base):
    """--merge_pairs: a > b and b > c of one prompt train as one K = 3 ranking; without it, as two pairs."""
    rows = [{"prompt": "sky?", "chosen": "blue", "rejected": "grey"},
            {"prompt": "sky?", "chosen": "grey", "rejected": "green"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for merge, want in ((True, [3]), (False, [2, 2])):
        cfg = RMConfig(model=base, data=str(data), batch_size=1, max_steps=1, eval_fraction=0.0, device="cpu",
                       merge_pairs=merge, output_dir=str(tmp_path / f"rm{merge}"))
        tr = RewardTrainer(cfg, progress=False)
        assert sorted(len(answers) for _, answers, _ in tr.train_rows) == want


def test_sft_and_grpo_read_their_data_on_demand(tmp_path, base):
    """--data.lazy: SFT indexes rows read from the JSONL file at their offsets (and the held-out split is a view)
    and trains exactly as with the rows in memory; GRPO draws prompts from a memory-mapped Arrow folder."""
    import datasets
    import torch

    from rlhf_fast.pipeline.config import GRPOConfig
    from rlhf_fast.pipeline.formats import IndexedRows
    from rlhf_fast.pipeline.grpo import GRPOTrainer

    rows = [{"prompt": f"Name a colour, {i}.", "completion": f" colour {i}"} for i in range(12)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    weights = {}
    for lazy in (False, True):
        tr = SFTTrainer(SFTConfig(model=base, data=str(data), batch_size=4, max_steps=2, eval_fraction=0.25,
                                  max_response_len=16, output_dir=str(tmp_path / f"sft{lazy}"), device="cpu", seed=0,
                                  data_lazy=lazy), progress=False)
        assert isinstance(tr.train_data, IndexedRows) == lazy and len(tr.train_data) == 9
        res = tr.train()
        weights[lazy] = (res["eval_loss"], {k: v.clone() for k, v in tr.model.state_dict().items()})
    assert weights[True][0] == weights[False][0]
    for k, v in weights[False][1].items():
        assert torch.equal(v, weights[True][1][k]), k

    datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows]).save_to_disk(str(tmp_path / "prompts"))
    tr = GRPOTrainer(GRPOConfig(model=base, prompts=str(tmp_path / "prompts"), data_lazy=True, iterations=1,
                                prompts_per_iteration=2, num_generations=2, max_new_tokens=4, device="cpu",
                                output_dir=str(tmp_path / "grpo")), rules=[lambda p, r: float(len(r.split()))],
                     progress=False)
    assert isinstance(tr.prompts, IndexedRows) and len(tr.prompt_ids) == 12
    assert tr.train()["iterations"] == 1
