"""rlhf_fast: fused RLHF ops (Triton, CUDA, native CPU) behind one function each."""

from rlhf_fast._native import cpu_capability, has_native
from rlhf_fast.backends import BACKENDS, backends_available, select_backend
from rlhf_fast.ops import gather_logprobs, linear_logprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "backends_available",
    "cpu_capability",
    "gather_logprobs",
    "has_native",
    "linear_logprobs",
    "select_backend",
]
