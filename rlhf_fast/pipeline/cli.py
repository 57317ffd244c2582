"""``rlhf-fast pipeline|sft|rm|ppo|grpo|dpo``: the command line of the pipeline, generated from the config
dataclasses (every field is an option; ``--config run.yaml`` sets fields first). Imports of torch and
transformers happen only when a command runs.

Each command also runs under ``torchrun --nproc_per_node=N rlhf-fast <command> --distributed ddp|fsdp``:
every rank runs the command, rank 0 prints and writes."""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlhf_fast.pipeline.config import (
    DPOConfig,
    GRPOConfig,
    PipelineConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    add_arguments,
    from_args,
)


def _say(*lines) -> None:
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(*lines, sep="\n")


def _default_task_data(cfg):
    """The embedded task's data for a stage command run without data: the topics task for the tiny preset,
    the constraints task otherwise (its SFT demonstrations are the best of K samples of the base model)."""
    from rlhf_fast.pipeline.config import apply_preset
    from rlhf_fast.pipeline.pipeline import make_task, task_data

    pcfg = apply_preset(PipelineConfig(seed=cfg.seed), cfg.preset or "")
    task = make_task(pcfg)
    return pcfg, task, task_data(pcfg, task)


def _tiny_or_loaded(name: str, seed: int):
    """(model, tokenizer) of the toy Llama for name 'tiny', else (None, None): the trainer loads `name`."""
    if name != "tiny":
        return None, None
    from rlhf_fast.pipeline import common as C
    from rlhf_fast.pipeline.task import build_tokenizer

    tokenizer = build_tokenizer()
    return C.build_tiny_llama(tokenizer, seed=seed), tokenizer


def _pipeline(args) -> int:
    from rlhf_fast.pipeline.pipeline import format_summary, run_pipeline

    cfg = from_args(PipelineConfig, args)
    if args.model_path:
        cfg.model.model = args.model_path
    summary = run_pipeline(cfg, progress=not args.quiet)
    _say(format_summary(summary), f"summary: {cfg.output_dir}/summary.json  report: {cfg.output_dir}/report.md")
    return 0


def _sft(args) -> int:
    from rlhf_fast.pipeline import distributed as D
    from rlhf_fast.pipeline.sft import SFTTrainer

    cfg = from_args(SFTConfig, args)
    model, tokenizer = _tiny_or_loaded(cfg.model, cfg.seed)
    train = None
    if not cfg.data:
        pcfg, task, data = _default_task_data(cfg)
        if "sft" in data:
            train = data["sft"]
        else:  # the constraints task: best-of-K demonstrations of the model being fine-tuned
            from rlhf_fast.pipeline import common as C
            from rlhf_fast.pipeline.chat import Encoder
            from rlhf_fast.pipeline.pipeline import best_of_k_demonstrations

            device = D.setup(cfg.distributed, cfg.device, cfg.precision).device
            tokenizer = tokenizer or C.load_tokenizer(cfg.model, cfg.trust_remote_code, not args.quiet)
            model = model or C.load_causal_lm(cfg.model, cfg.trust_remote_code, progress=not args.quiet)
            enc = Encoder(tokenizer, cfg.max_prompt_len, cfg.max_response_len, cfg.chat_template)
            train = best_of_k_demonstrations(model.to(device), tokenizer, enc, task, data["sft_prompts"],
                                             k=pcfg.task.sft_candidates, max_new_tokens=pcfg.ppo.max_new_tokens,
                                             temperature=pcfg.ppo.temperature, seed=cfg.seed, device=device,
                                             progress=not args.quiet)
    result = SFTTrainer(cfg, model=model, tokenizer=tokenizer, train_data=train, progress=not args.quiet).train()
    _say(json.dumps(result, indent=2), f"model: {cfg.output_dir}/model")
    return 0


def _rm(args) -> int:
    from rlhf_fast.pipeline import common as C
    from rlhf_fast.pipeline import distributed as D
    from rlhf_fast.pipeline.reward import RewardTrainer

    cfg = from_args(RMConfig, args)
    if not cfg.model or cfg.model == "tiny":
        raise ValueError("--model: the SFT model's path (or hub id) is required")
    train = None
    if not cfg.data:  # default task: sample K answers from the SFT model and rank them with the labeler
        from rlhf_fast.pipeline.chat import Encoder
        from rlhf_fast.pipeline.pipeline import label_comparisons

        pcfg, task, data = _default_task_data(cfg)
        tok = C.load_tokenizer(cfg.model, cfg.trust_remote_code, not args.quiet)
        device = D.setup(cfg.distributed, cfg.device, cfg.precision).device  # every rank samples the same
        policy = C.load_causal_lm(cfg.model, cfg.trust_remote_code, device=device, progress=not args.quiet)
        enc = Encoder(tok, cfg.max_prompt_len, cfg.max_response_len, cfg.chat_template)
        train = label_comparisons(policy, tok, enc, task, data["rm_prompts"], k_min=cfg.k_min, k_max=cfg.k_max,
                                  max_new_tokens=pcfg.ppo.max_new_tokens, temperature=cfg.sample_temperature,
                                  seed=cfg.seed, device=device, progress=not args.quiet)
    result = RewardTrainer(cfg, train_data=train, progress=not args.quiet).train()
    _say(json.dumps(result, indent=2), f"reward model: {cfg.output_dir}/model")
    return 0


def _ppo(args) -> int:
    from rlhf_fast.pipeline.ppo import PPOTrainer

    cfg = from_args(PPOConfig, args)
    prompts = ptx = None
    if not cfg.prompts:
        _, _, data = _default_task_data(cfg)
        prompts = data["ppo_prompts"]
        ptx = None if cfg.ptx_data else data.get("ptx")
    result = PPOTrainer(cfg, prompts=prompts, ptx_data=ptx, progress=not args.quiet).train()
    _say(json.dumps(result, indent=2), f"policy: {cfg.output_dir}/model")
    return 0


def _grpo(args) -> int:
    from rlhf_fast.pipeline.grpo import GRPOTrainer

    cfg = from_args(GRPOConfig, args)
    prompts = rules = None
    if not cfg.prompts:  # the default task's prompts, scored by its gold rubric unless told otherwise
        _, task, data = _default_task_data(cfg)
        prompts = data["ppo_prompts"]
        if not cfg.rule_rewards and not cfg.reward_model:
            rules = [task.gold_score]
    result = GRPOTrainer(cfg, prompts=prompts, rules=rules, progress=not args.quiet).train()
    _say(json.dumps(result, indent=2), f"policy: {cfg.output_dir}/model")
    return 0


def _dpo(args) -> int:
    from rlhf_fast.pipeline.dpo import DPOTrainer

    cfg = from_args(DPOConfig, args)
    if not cfg.data:
        raise ValueError("--data: preference data is required ({prompt, chosen, rejected} or ranked rows)")
    result = DPOTrainer(cfg, progress=not args.quiet).train()
    _say(json.dumps(result, indent=2), f"model: {cfg.output_dir}/model")
    return 0


def _run(fn):
    def wrapped(args) -> int:
        from rlhf_fast.pipeline import distributed as D
        from rlhf_fast.pipeline.data import DataError
        from rlhf_fast.pipeline.models import ModelFetchError

        try:
            return fn(args)
        except (DataError, ValueError, ModelFetchError) as e:
            print(f"rlhf-fast {args.command}: error: {e}", file=sys.stderr)
            return 2
        finally:
            D.shutdown()  # the process group of a torchrun (or of --distributed without one)
    return wrapped


def add_subcommands(sub) -> None:
    """Register ``pipeline``, ``sft``, ``rm``, ``ppo``, ``grpo`` and ``dpo`` on an argparse sub-parser collection."""
    specs = [
        ("pipeline", PipelineConfig, _pipeline, "SFT -> reward model -> PPO-ptx end to end (default: embedded task)"),
        ("sft", SFTConfig, _sft, "supervised fine-tuning on prompt-completion or conversation data"),
        ("rm", RMConfig, _rm, "reward model from the SFT model and ranked answers"),
        ("ppo", PPOConfig, _ppo, "PPO-ptx from the SFT policy and the reward model"),
        ("grpo", GRPOConfig, _grpo, "GRPO / RLOO / Dr. GRPO / DAPO from a policy, rule rewards and/or a reward model"),
        ("dpo", DPOConfig, _dpo, "DPO and its variants from a policy and preference pairs"),
    ]
    for name, cls, fn, help_text in specs:
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or "").strip(),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
        add_arguments(p, cls)
        if name == "pipeline":
            p.add_argument("--model", dest="model_path", default=None,
                           help="base causal LM (local path or hub id), same as --model.model")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(fn=_run(fn))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-fast")
    add_subcommands(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
