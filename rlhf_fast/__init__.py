"""rlhf_fast: fused RLHF ops (Triton, CUDA, native CPU) behind one function each."""

from rlhf_fast._native import (
    cpu_capability,
    cpu_gemm_engine,
    has_native,
    release_cpu_buffers,
    set_cpu_buffer_cache,
)
from rlhf_fast.backends import BACKENDS, backends_available, select_backend
from rlhf_fast.ops import (
    DPOStats,
    RankingStats,
    SharedPrefixLayout,
    attention,
    dpo_loss,
    gae,
    gather_logprobs,
    group_advantages,
    kl_penalty,
    linear,
    linear_logprobs,
    linear_ppo_loss,
    pairwise_loss,
    ppo_policy_loss,
    ranking_loss,
    shared_prefix_attention,
    shared_prefix_layout,
    value_loss,
    varlen_attention,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DPOStats",
    "RankingStats",
    "SharedPrefixLayout",
    "attention",
    "backends_available",
    "cpu_capability",
    "cpu_gemm_engine",
    "dpo_loss",
    "gae",
    "gather_logprobs",
    "group_advantages",
    "has_native",
    "kl_penalty",
    "linear",
    "linear_logprobs",
    "linear_ppo_loss",
    "pairwise_loss",
    "ppo_policy_loss",
    "ranking_loss",
    "release_cpu_buffers",
    "select_backend",
    "set_cpu_buffer_cache",
    "shared_prefix_attention",
    "shared_prefix_layout",
    "value_loss",
    "varlen_attention",
]
