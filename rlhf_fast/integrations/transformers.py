"""Hugging Face transformers integration: ``attn_implementation="rlhf_fast"``, linear layers through
:func:`rlhf_fast.linear` (:func:`use_rlhf_fast_linear`), and shared-prefix forwards.

Importing this module registers the name ``"rlhf_fast"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask it is handed: the 2-D key-padding mask, or
None), so that any model whose attention layers dispatch through ``ALL_ATTENTION_FUNCTIONS`` (Llama,
Qwen2, GPT-NeoX, Mistral, ... in transformers 5) runs :func:`rlhf_fast.attention`::

    import rlhf_fast.integrations.transformers  # registers "rlhf_fast"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="rlhf_fast")

What the attention function does with what the model passes:
  * ``shared_prefix_layout=<SharedPrefixLayout>`` in the forward kwargs (batch of 1): the shared-prefix
    pattern of :func:`rlhf_fast.shared_prefix_attention`; :func:`shared_prefix_forward` sets it up.
  * ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k`` (flash-attention kwargs):
    :func:`rlhf_fast.varlen_attention` over the packed batch of 1.
  * batch of 1, no padding mask, ``position_ids`` that restart (packed documents, as transformers' sdpa
    and flash paths detect them): varlen over the runs of consecutive positions (one small host copy of
    the position ids per layer, as transformers' flash path).
  * otherwise :func:`rlhf_fast.attention` with the 2-D key-padding mask, causal as the module says,
    bottom-right aligned (decoding with a dynamic KV cache).
Not supported (ValueError): attention dropout > 0, sliding windows, logit soft-capping, a custom 4-D mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.ops.attention import SharedPrefixLayout, shared_prefix_layout

ATTN_IMPLEMENTATION = "rlhf_fast"
LAYOUT_KWARG = "shared_prefix_layout"


# ---------------------------------------------------------------------------------------------
# Attention function and mask function for transformers' interfaces
# ---------------------------------------------------------------------------------------------

def rlhf_fast_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                             mask_function=None, attention_mask: Tensor | None = None, **kwargs):
    """Mask builder for ``AttentionMaskInterface``: the (B, kv_length) bool key-padding mask, or None when
    nothing is padded (the causal pattern is the attention function's own)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def _packed_cu_seqlens(position_ids: Tensor | None, length: int) -> tuple[Tensor, int] | None:
    """cu_seqlens of the runs of consecutive positions (+1 steps) of a batch-of-1 packed input, or None."""
    if position_ids is None or length <= 1:
        return None
    pos = position_ids.reshape(-1)
    if pos.shape[0] != length:
        return None
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), length)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def rlhf_fast_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                                is_causal: bool | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: query (B, Hq, T, D), key/value (B, Hkv, S, D) (RoPE applied, cache
    updated) -> (attn_output (B, T, Hq, D), None). See the module docstring for the cases."""
    if dropout:
        raise ValueError(f"dropout: rlhf_fast attention has no attention dropout, got {dropout}; use "
                         "attention_dropout=0 in the config (the default of Llama, Qwen2, GPT-NeoX)")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"sliding_window: rlhf_fast attention has no sliding window, got {kwargs['sliding_window']}")
    if kwargs.get("softcap") is not None:
        raise ValueError("softcap: rlhf_fast attention has no logit soft-capping")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: rlhf_fast attention takes a 2-D key-padding mask (B, S), got shape "
                         f"{tuple(attention_mask.shape)} (a custom 4-D mask is not supported)")
    backend = kwargs.get("rlhf_fast_backend")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    b, hq, t, d = query.shape

    layout = kwargs.get(LAYOUT_KWARG)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    packed = None
    if layout is None and cu_q is None and attention_mask is None and b == 1:
        packed = _packed_cu_seqlens(kwargs.get("position_ids"), t)
    if layout is not None or cu_q is not None or packed is not None:
        if b != 1:
            raise ValueError(f"query: packed inputs (shared prefix, cu_seq_lens, packed position_ids) need a batch of "
                             f"1, got batch {b}")
        q3, k3, v3 = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, H, D) views
        if layout is not None:
            out = rlhf_fast.shared_prefix_attention(q3, k3, v3, layout, scale=scaling, backend=backend)
        elif cu_q is not None:
            cu_k = cu_q if cu_k is None else cu_k
            max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
            max_k = kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max())
            out = rlhf_fast.varlen_attention(q3, k3, v3, cu_q, cu_k, int(max_q), int(max_k), causal=causal,
                                             scale=scaling, backend=backend)
        else:
            cu, longest = packed
            out = rlhf_fast.varlen_attention(q3, k3, v3, cu, cu, longest, longest, causal=causal, scale=scaling,
                                             backend=backend)
        return out.unsqueeze(0), None  # (1, T, Hq, D)
    out = rlhf_fast.attention(query, key, value, causal=causal, attention_mask=attention_mask, scale=scaling,
                              backend=backend)
    return out.transpose(1, 2), None  # (B, T, Hq, D), contiguous: out is stored that way


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention and mask functions under `name` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, rlhf_fast_attention_forward)
    AttentionMaskInterface.register(name, rlhf_fast_attention_mask)
    return name


register()


# ---------------------------------------------------------------------------------------------
# Linear layers through rlhf_fast.linear
# ---------------------------------------------------------------------------------------------

class RlhfFastLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward is :func:`rlhf_fast.linear` (same parameters, same state dict)."""

    def forward(self, input: Tensor) -> Tensor:
        return rlhf_fast.linear(input, self.weight, self.bias)


def use_rlhf_fast_linear(model: torch.nn.Module) -> int:
    """Route every plain ``nn.Linear`` of `model` (its projections, its heads) through
    :func:`rlhf_fast.linear`, in place; returns how many layers now do. Idempotent.

    Each module keeps its parameters, hooks and state-dict keys: only its class becomes
    :class:`RlhfFastLinear`, a subclass of ``nn.Linear``, so ``isinstance`` checks (peft's LoRA
    targeting, FSDP2 wrapping) and ``save_pretrained`` / ``from_pretrained`` round trips are unchanged.
    Subclasses of ``nn.Linear`` with their own forward (quantized layers, peft's LoRA layers) are left
    as they are; a LoRA layer's base layer is patched like any other. Under ``RLHF_FAST_BACKEND=torch``
    the layers compute exactly what ``nn.Linear`` does (ATen's GEMM).
    """
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RlhfFastLinear
        if type(module) is RlhfFastLinear:
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Shared-prefix forwards: one prompt, K answers, one packed pass
# ---------------------------------------------------------------------------------------------

@dataclass
class SharedPrefixOutput:
    """What :func:`shared_prefix_forward` returns (answers numbered group by group, A in all).

    layout             the SharedPrefixLayout of the packed batch
    input_ids          (total,) the packed token ids
    hidden_states      (total, hidden) last hidden states of the packed batch
    last_token_index   (A,) packed index of each answer's last token
    last_hidden        (A, hidden) hidden state there (what a reward head reads)
    rewards            (A,) fp32 reward_head(last_hidden), when a reward head was given
    token_logprobs     (N,) fp32 log p(token | prompt, earlier tokens of its answer) of every answer token,
                       in layout.target_index order, when the model has an output embedding
    """

    layout: SharedPrefixLayout
    input_ids: Tensor
    hidden_states: Tensor
    last_token_index: Tensor
    last_hidden: Tensor
    rewards: Tensor | None = None
    token_logprobs: Tensor | None = None

    def answer_hidden(self) -> list[Tensor]:
        """(L_a, hidden) hidden states of each answer's tokens."""
        return self.layout.split_answers(self.hidden_states)

    def answer_logprobs(self) -> list[Tensor]:
        """(L_a,) token log-probs of each answer."""
        if self.token_logprobs is None:
            raise ValueError("token_logprobs: not computed (the model has no output embedding, or "
                             "compute_logprobs=False)")
        return list(self.token_logprobs.split([n for a in self.layout.answer_lens for n in a]))

    def sequence_logprobs(self) -> Tensor:
        """(A,) summed log-prob of each answer."""
        return torch.stack([x.sum() for x in self.answer_logprobs()])


def shared_prefix_inputs(prompts: Sequence[Tensor], answers: Sequence[Sequence[Tensor]], device=None):
    """(input_ids (1, total), position_ids (1, total), layout) of G prompts with their answers
    (1-D token-id tensors), packed as [prompt_1, answers_1..., prompt_2, answers_2..., ...]."""
    layout = shared_prefix_layout([p.shape[0] for p in prompts], [[a.shape[0] for a in ans] for ans in answers],
                                  device=device if device is not None else prompts[0].device)
    input_ids = layout.pack([p.to(layout.device) for p in prompts],
                            [[a.to(layout.device) for a in ans] for ans in answers])
    return input_ids[None], layout.position_ids[None], layout


def shared_prefix_forward(model, prompts: Sequence[Tensor], answers: Sequence[Sequence[Tensor]], *,
                          reward_head: torch.nn.Module | None = None, compute_logprobs: bool | None = None,
                          backend: str | None = None) -> SharedPrefixOutput:
    """Run a transformers model once over G prompts, each followed by its K answers, packed as
    ``[prompt, answer_1, ..., answer_K]``: each answer sees its prompt and itself exactly as in a separate
    ``[prompt, answer_j]`` forward (same hidden states, log-probs and reward), while the prompt's tokens
    are computed once instead of K times.

    Args:
        model: a transformers model built with ``attn_implementation="rlhf_fast"`` (a ``*ForCausalLM``, or a
            base model such as ``LlamaModel``), using rotary or no position embeddings indexed by position_ids.
        prompts: G 1-D LongTensors of token ids.
        answers: G sequences of 1-D LongTensors (K may differ per prompt; every answer >= 1 token).
        reward_head: optional module mapping (A, hidden) to (A, 1) or (A,): the reward model's scalar head,
            read at each answer's last token.
        compute_logprobs: token log-probs of the answers from the model's output embedding (default: when it
            has one). Only the rows that predict answer tokens are projected to the vocabulary.
        backend: rlhf_fast backend of the attention (default: automatic).

    The model receives ``position_ids`` from the layout (each answer continues at the prompt length) and the
    layout itself through the forward kwargs, which the "rlhf_fast" attention function reads.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION:
        raise ValueError(f"model: expected a model built with attn_implementation={ATTN_IMPLEMENTATION!r} (the "
                         f"shared-prefix pattern needs it), got {impl!r}")
    device = next(model.parameters()).device
    input_ids, position_ids, layout = shared_prefix_inputs(prompts, answers, device)
    base = model.base_model
    kwargs = {LAYOUT_KWARG: layout}
    if backend is not None:
        kwargs["rlhf_fast_backend"] = backend
    out = base(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
    hidden = out.last_hidden_state[0]  # (total, hidden)
    last_hidden = hidden[layout.last_token_index]
    rewards = None
    if reward_head is not None:
        r = reward_head(last_hidden)
        rewards = (r.squeeze(-1) if r.dim() == 2 else r).float()
    lm_head = model.get_output_embeddings() if base is not model else None
    if compute_logprobs is None:
        compute_logprobs = lm_head is not None
    token_logprobs = None
    if compute_logprobs:
        if lm_head is None:
            raise ValueError("compute_logprobs: the model has no output embedding (lm_head)")
        logits = lm_head(hidden[layout.source_index])  # (N, V): only rows that predict an answer token
        token_logprobs = rlhf_fast.gather_logprobs(logits, input_ids[0][layout.target_index])
    return SharedPrefixOutput(layout=layout, input_ids=input_ids[0], hidden_states=hidden,
                              last_token_index=layout.last_token_index, last_hidden=last_hidden, rewards=rewards,
                              token_logprobs=token_logprobs)
