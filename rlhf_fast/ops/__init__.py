"""Public rlhf_fast ops; each module defines one op family end to end (see its docstring)."""

from rlhf_fast.ops.attention import (
    SharedPrefixLayout,
    attention,
    shared_prefix_attention,
    shared_prefix_layout,
    varlen_attention,
)
from rlhf_fast.ops.dpo_loss import DPOStats, dpo_loss
from rlhf_fast.ops.gae import gae
from rlhf_fast.ops.gather_logprobs import gather_logprobs
from rlhf_fast.ops.group_advantages import group_advantages
from rlhf_fast.ops.kl_penalty import kl_penalty
from rlhf_fast.ops.linear import linear
from rlhf_fast.ops.linear_logprobs import linear_logprobs
from rlhf_fast.ops.linear_ppo_loss import linear_ppo_loss
from rlhf_fast.ops.ppo_policy_loss import ppo_policy_loss
from rlhf_fast.ops.ranking_loss import RankingStats, pairwise_loss, ranking_loss
from rlhf_fast.ops.rollout_correction import rollout_importance_weights
from rlhf_fast.ops.value_loss import value_loss

__all__ = ["DPOStats", "RankingStats", "SharedPrefixLayout", "attention", "shared_prefix_attention",
           "shared_prefix_layout", "varlen_attention", "dpo_loss", "gae", "gather_logprobs", "group_advantages",
           "kl_penalty", "linear", "linear_logprobs", "linear_ppo_loss", "pairwise_loss", "ppo_policy_loss",
           "ranking_loss", "rollout_importance_weights", "value_loss"]
