"""Pipeline data errors (file, line and field named), config plumbing and the CLI round trip."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from rlhf_fast.cli import main as cli_main  # noqa: E402
from rlhf_fast.pipeline.config import PPOConfig, SFTConfig, add_arguments, from_args  # noqa: E402
from rlhf_fast.pipeline.data import DataError, load_ptx, load_ranked, load_sft  # noqa: E402


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(x + "\n" for x in lines))
    return p


GOOD_SFT = json.dumps({"prompt": "write about food :", "response": "bread ."})


@pytest.mark.parametrize("lines, loader, message", [
    ([GOOD_SFT, '{"prompt": "a", "response": '], load_sft, r"sft.jsonl:2: malformed JSON"),
    ([GOOD_SFT, GOOD_SFT, '{"prompt": "a"}'], load_sft, r"sft.jsonl:3: field 'response' is missing"),
    (['{"prompt": 3, "response": "x"}'], load_sft, r"sft.jsonl:1: field 'prompt' must be str, got int"),
    (["", "  "], load_sft, r"sft.jsonl: the file is empty"),
    (['["prompt", "response"]'], load_sft, r"sft.jsonl:1: expected a JSON object, got list"),
    (['{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 2, 2]}'], load_ranked,
     r"sft.jsonl:1: field 'ranking' must be a permutation of 0..2"),
    (['{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}'], load_ranked,
     r"sft.jsonl:1: field 'ranking' must be a permutation of 0..1"),
    (['{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}',
      '{"prompt": "p", "responses": ["a"], "ranking": [0]}'], load_ranked,
     r"sft.jsonl:2: field 'responses' needs K >= 2 answers, got 1"),
    (['{"prompt": "p", "responses": ["a", 5], "ranking": [0, 1]}'], load_ranked,
     r"sft.jsonl:1: field 'responses'\[1\] must be str"),
    (['{"prompt": "p", "responses": ["a", "b"]}'], load_ranked, r"sft.jsonl:1: field 'ranking' is missing"),
    (['{"txt": "p"}'], load_ptx, r"sft.jsonl:1: field 'text' is missing"),
])
def test_bad_data_names_file_line_and_field(tmp_path, lines, loader, message):
    p = write(tmp_path, "sft.jsonl", lines)
    with pytest.raises(DataError, match=message):
        loader(p)


def test_good_data_loads(tmp_path):
    rows = load_ranked(write(tmp_path, "r.jsonl", ['{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}']))
    assert rows[0]["ranking"] == [1, 0] and rows[0]["_where"].endswith("r.jsonl:1")
    with pytest.raises(DataError, match="no such file"):
        load_sft(tmp_path / "missing.jsonl")


def test_config_yaml_then_command_line(tmp_path):
    import argparse

    (tmp_path / "c.yaml").write_text("lr: 0.5\nminibatch_size: 3\nadaptive_kl: false\nrule_rewards: [a:b]\n")
    ap = argparse.ArgumentParser()
    add_arguments(ap, PPOConfig)
    cfg = from_args(PPOConfig, ap.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.25"]))
    assert cfg.lr == 0.25 and cfg.minibatch_size == 3 and cfg.adaptive_kl is False and cfg.rule_rewards == ["a:b"]
    (tmp_path / "bad.yaml").write_text("lrr: 1\n")
    ap2 = argparse.ArgumentParser()
    add_arguments(ap2, SFTConfig)
    with pytest.raises(ValueError, match="unknown config field 'lrr'"):
        from_args(SFTConfig, ap2.parse_args(["--config", str(tmp_path / "bad.yaml")]))
    # every field of every config has a help string
    import dataclasses

    from rlhf_fast.pipeline.config import ModelConfig, PipelineConfig, RMConfig, TaskConfig

    for cls in (SFTConfig, RMConfig, PPOConfig, PipelineConfig, ModelConfig, TaskConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"


def test_cli_sft_rm_ppo_round_trip(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = write(tmp_path, "sft.jsonl", [json.dumps({"prompt": f"write about food with {w} :", "response": r})
                                        for w in ("cat", "rain", "drum", "egg") for r in ("bread soup .", "cake")])
    ranked = write(tmp_path, "ranked.jsonl", [json.dumps({"prompt": "write about food :",
                                                          "responses": ["bread .", "ugh", "cat rain"],
                                                          "ranking": [0, 2, 1]})] * 4)
    prompts = write(tmp_path, "prompts.jsonl", [json.dumps({"prompt": "write about music :"})] * 3)
    rules = tmp_path / "rules.py"
    rules.write_text("def ends(prompt, response):\n    return 1.0 if response.endswith('.') else 0.0\n")
    (tmp_path / "sft.yaml").write_text("preset: tiny\nbatch_size: 4\nepochs: 1\n")  # the toy Llama
    assert cli_main(["sft", "--config", str(tmp_path / "sft.yaml"), "--data", str(sft), "--output_dir",
                     str(tmp_path / "sft"), "--max_steps", "2", "--device", "cpu", "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert model.config.model_type == "llama"
    assert cli_main(["rm", "--model", str(tmp_path / "sft" / "model"), "--data", str(ranked), "--output_dir",
                     str(tmp_path / "rm"), "--batch_size", "2", "--epochs", "1", "--eval_fraction", "0.25",
                     "--device", "cpu", "--quiet"]) == 0
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert rm.config.num_labels == 1
    assert cli_main(["ppo", "--policy", str(tmp_path / "sft" / "model"),
                     "--reward_model", str(tmp_path / "rm" / "model"),
                     "--prompts", str(prompts), "--ptx_data", str(sft), "--output_dir", str(tmp_path / "ppo"),
                     "--iterations", "1", "--prompts_per_iteration", "2", "--samples_per_prompt", "2",
                     "--max_new_tokens", "4", "--rule_rewards", f"{rules}:ends", "--device", "cpu", "--quiet"]) == 0
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "model")
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), before.parameters(), strict=True))
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and "ptx_loss" in rows[-1]
    capsys.readouterr()
    # bad data: exit status 2 and the file, line and field on stderr
    bad = write(tmp_path, "bad.jsonl", [GOOD_SFT, '{"prompt": "x"}'])
    assert cli_main(["sft", "--preset", "tiny", "--data", str(bad), "--output_dir", str(tmp_path / "bad"),
                     "--quiet"]) == 2
    assert "bad.jsonl:2: field 'response' is missing" in capsys.readouterr().err


def test_scale_out_options_and_hyphenated_aliases():
    import argparse

    from rlhf_fast.pipeline.config import PipelineConfig

    ap = argparse.ArgumentParser()
    add_arguments(ap, PPOConfig)
    cfg = from_args(PPOConfig, ap.parse_args(["--distributed", "fsdp", "--grad-accum", "4", "--gradient-checkpointing",
                                              "true", "--lora-r", "8", "--lora_alpha", "32", "--lora-target-modules",
                                              "q_proj", "v_proj"]))
    assert (cfg.distributed, cfg.grad_accum, cfg.gradient_checkpointing, cfg.lora_r, cfg.lora_alpha) == \
        ("fsdp", 4, True, 8, 32.0)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and PPOConfig().lora_target_modules == []
    ap = argparse.ArgumentParser()
    add_arguments(ap, PipelineConfig)
    cfg = from_args(PipelineConfig, ap.parse_args(["--distributed", "ddp", "--sft.grad-accum", "2"]))
    assert cfg.distributed == "ddp" and cfg.sft.grad_accum == 2 and SFTConfig().distributed == "none"


def test_cli_help_lists_pipeline_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["pipeline", "--help"])
    out = capsys.readouterr().out
    assert "--sft.lr" in out and "--ppo.kl_bound" in out and "--model" in out and "--resume" in out


def test_rule_rewards_load_from_module_or_file(tmp_path):
    from rlhf_fast.pipeline.ppo import load_rule

    assert load_rule("operator:add")("a ", "b") == "a b"
    f = tmp_path / "r.py"
    f.write_text("def n_words(prompt, response):\n    return float(len(response.split()))\n")
    assert load_rule(f"{f}:n_words")("p", "a b c") == 3.0
    with pytest.raises(ValueError, match="rule_rewards: expected 'module:function'"):
        load_rule("nocolon")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_rule("os.path:missing")
