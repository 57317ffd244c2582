"""The InstructGPT pipeline (SFT -> reward model -> PPO-ptx) on transformers models, with rlhf_fast ops, and
the other alignment stages people run after SFT (GRPO / RLOO, DPO).

    from rlhf_fast.pipeline import PipelineConfig, run_pipeline
    summary = run_pipeline(PipelineConfig(output_dir="runs/demo"))

or stage by stage with :class:`SFTTrainer`, :class:`RewardTrainer`, :class:`PPOTrainer`, :class:`GRPOTrainer`,
:class:`DPOTrainer` and their configs. The command line is ``rlhf-fast pipeline|sft|rm|ppo|grpo|dpo``.
"""

from rlhf_fast.pipeline.config import (
    DPOConfig,
    GRPOConfig,
    PipelineConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    TaskConfig,
)
from rlhf_fast.pipeline.data import DataError
from rlhf_fast.pipeline.dpo import DPOTrainer
from rlhf_fast.pipeline.grpo import GRPOTrainer
from rlhf_fast.pipeline.pipeline import run_pipeline
from rlhf_fast.pipeline.ppo import PPOTrainer
from rlhf_fast.pipeline.reward import RewardTrainer
from rlhf_fast.pipeline.sft import SFTTrainer
from rlhf_fast.pipeline.task import TopicTask, build_tokenizer

__all__ = ["DPOConfig", "DPOTrainer", "DataError", "GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer",
           "PipelineConfig", "RMConfig", "RewardTrainer", "SFTConfig", "SFTTrainer", "TaskConfig", "TopicTask",
           "build_tokenizer", "run_pipeline"]
