"""Public rlhf_fast ops; each module defines one op family end to end (see its docstring)."""

from rlhf_fast.ops.gather_logprobs import gather_logprobs
from rlhf_fast.ops.linear_logprobs import linear_logprobs

__all__ = ["gather_logprobs", "linear_logprobs"]
