"""``rlhf-fast pipeline|sft|rm|ppo``: the command line of the pipeline, generated from the config
dataclasses (every field is an option; ``--config run.yaml`` sets fields first). Imports of torch and
transformers happen only when a command runs.

Each command also runs under ``torchrun --nproc_per_node=N rlhf-fast <command> --distributed ddp|fsdp``:
every rank runs the command, rank 0 prints and writes."""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlhf_fast.pipeline.config import PipelineConfig, PPOConfig, RMConfig, SFTConfig, add_arguments, from_args


def _say(*lines) -> None:
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(*lines, sep="\n")


def _default_task_data(seed: int):
    from rlhf_fast.pipeline.pipeline import make_task, task_data

    cfg = PipelineConfig(seed=seed)
    task = make_task(cfg)
    return cfg, task, task_data(cfg, task)


def _pipeline(args) -> int:
    from rlhf_fast.pipeline.pipeline import format_summary, run_pipeline

    cfg = from_args(PipelineConfig, args)
    if args.model_path:
        cfg.model.model = args.model_path
    summary = run_pipeline(cfg, progress=not args.quiet)
    _say(format_summary(summary), f"summary: {cfg.output_dir}/summary.json  report: {cfg.output_dir}/report.md")
    return 0


def _sft(args) -> int:
    from rlhf_fast.pipeline import common as C
    from rlhf_fast.pipeline.sft import SFTTrainer

    cfg = from_args(SFTConfig, args)
    model = tokenizer = train = None
    if not cfg.model:
        from rlhf_fast.pipeline.task import build_tokenizer

        tokenizer = build_tokenizer()
        model = C.build_tiny_llama(tokenizer, seed=cfg.seed)
    if not cfg.data:
        _, _, data = _default_task_data(cfg.seed)
        train = data["sft"]
    result = SFTTrainer(cfg, model=model, tokenizer=tokenizer, train_data=train, progress=not args.quiet).train()
    _say(json.dumps(result, indent=2), f"model: {cfg.output_dir}/model")
    return 0


def _rm(args) -> int:
    from rlhf_fast.pipeline import common as C
    from rlhf_fast.pipeline import distributed as D
    from rlhf_fast.pipeline.reward import RewardTrainer

    cfg = from_args(RMConfig, args)
    if not cfg.model:
        raise ValueError("--model: the SFT model's path (or hub id) is required")
    train = None
    if not cfg.data:  # default task: sample K answers from the SFT model and rank them with the labeler
        from rlhf_fast.pipeline.data import Encoder
        from rlhf_fast.pipeline.pipeline import label_comparisons

        pcfg, task, data = _default_task_data(cfg.seed)
        tok = C.load_tokenizer(cfg.model, cfg.trust_remote_code)
        device = D.setup(cfg.distributed, cfg.device, cfg.precision).device  # every rank samples the same
        policy = C.load_causal_lm(cfg.model, cfg.trust_remote_code, device=device)
        train = label_comparisons(policy, tok, Encoder(tok, cfg.max_prompt_len, cfg.max_response_len), task,
                                  data["rm_prompts"], k_min=cfg.k_min, k_max=cfg.k_max,
                                  max_new_tokens=pcfg.ppo.max_new_tokens, temperature=cfg.sample_temperature,
                                  seed=cfg.seed, device=device)
    result = RewardTrainer(cfg, train_data=train, progress=not args.quiet).train()
    _say(json.dumps(result, indent=2), f"reward model: {cfg.output_dir}/model")
    return 0


def _ppo(args) -> int:
    from rlhf_fast.pipeline.ppo import PPOTrainer

    cfg = from_args(PPOConfig, args)
    prompts = ptx = None
    if not cfg.prompts:
        _, _, data = _default_task_data(cfg.seed)
        prompts = data["ppo_prompts"]
        ptx = None if cfg.ptx_data else data["ptx"]
    result = PPOTrainer(cfg, prompts=prompts, ptx_data=ptx, progress=not args.quiet).train()
    _say(json.dumps(result, indent=2), f"policy: {cfg.output_dir}/model")
    return 0


def _run(fn):
    def wrapped(args) -> int:
        from rlhf_fast.pipeline import distributed as D
        from rlhf_fast.pipeline.data import DataError

        try:
            return fn(args)
        except (DataError, ValueError) as e:
            print(f"rlhf-fast {args.command}: error: {e}", file=sys.stderr)
            return 2
        finally:
            D.shutdown()  # the process group of a torchrun (or of --distributed without one)
    return wrapped


def add_subcommands(sub) -> None:
    """Register ``pipeline``, ``sft``, ``rm`` and ``ppo`` on an argparse sub-parser collection."""
    specs = [
        ("pipeline", PipelineConfig, _pipeline, "SFT -> reward model -> PPO-ptx end to end (default: embedded task)"),
        ("sft", SFTConfig, _sft, "supervised fine-tuning on {prompt, response} JSONL"),
        ("rm", RMConfig, _rm, "reward model from the SFT model and ranked answers"),
        ("ppo", PPOConfig, _ppo, "PPO-ptx from the SFT policy and the reward model"),
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
