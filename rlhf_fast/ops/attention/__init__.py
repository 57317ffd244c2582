"""attention, varlen_attention, shared_prefix_attention: fused softmax(q k^T * scale) v with causal masks,
key padding, grouped-query heads, packed sequences, and one prompt shared by K answers.

Flow, per entry point: public function (validates, documents shapes) -> custom op
``rlhf_fast::attention`` / ``rlhf_fast::varlen_attention`` / ``rlhf_fast::shared_prefix_attention``
(fake impl + registered autograd whose backward is a second custom op, so all three trace under
torch.compile and pass opcheck) -> the backend chosen by rlhf_fast.backends:

  triton  rlhf_fast/kernels/attention.py: flash-attention-2 (tiled online softmax, logsumexp saved, backward by
          recomputation), one kernel family for all three entry points, driven by segment tables
  cpu     PyTorch's fused flash-attention CPU kernel (the one F.scaled_dot_product_attention runs),
          composed: bottom-right causal alignment and shared prefixes are split into calls whose
          results are merged by their logsumexps; no (T, S) mask and no copy of a prompt's K/V per
          answer is ever built (registered with native=False: it needs no rlhf_fast._C kernel)
  torch   rlhf_fast/reference.py: the plain math, for tests and as the fallback of last resort

Cost model: see rlhf_fast/kernels/attention.py. In short, eager attention writes and reads (T, S) fp32 scores and
probabilities several times per head; the fused kernels keep them on chip, save one fp32 logsumexp per
query row, and recompute the probabilities in the backward.

Layouts returned by every backend (the fake impls promise them):
  attention         out (B, Hq, T, D) stored as (B, T, Hq, D) (what transformers wants next: its
                    ``transpose(1, 2).contiguous()`` is then free); lse (B, Hq, T) fp32; dq/dk/dv in the
                    same (B, T, H, D) storage
  varlen / shared   out (total_q, Hq, D) contiguous; lse (Hq, total_q) fp32; dq/dk/dv contiguous
The saved lse is +inf for query rows that see no key, so that exp(s - lse) is exactly 0 for them.

Files: dense.py (attention), varlen.py (varlen_attention), shared_prefix.py (shared_prefix_attention and
its layout), _common.py (limits, layouts, validation, the CPU kernel and the packed Triton launchers they
share). Each op file reads top to bottom: segment table, backends, custom op, public function.
"""

from rlhf_fast.ops.attention.dense import attention
from rlhf_fast.ops.attention.shared_prefix import SharedPrefixLayout, shared_prefix_attention, shared_prefix_layout
from rlhf_fast.ops.attention.varlen import varlen_attention

__all__ = ["SharedPrefixLayout", "attention", "shared_prefix_attention", "shared_prefix_layout", "varlen_attention"]
