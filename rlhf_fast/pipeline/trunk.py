"""The frozen trunk an RL stage's networks share.

With LoRA confined to the top decoder layers (``--lora_layers N``), the layers below the first adapted one
and the token embedding are frozen, and in PPO-ptx they are the same weights in every network: the actor
(SFT + adapters on top), the reference (the actor without its adapters), the critic (the reward model +
adapters on top) and the reward model itself (the SFT model with its own adapters merged into the same top
layers). A packed batch of prompts and answers is then run through those layers once, and each network runs
only its own top layers on the result: the rollout's reference log-probs, values and reward scores cost one
trunk pass plus three top passes instead of three full forwards, and the update's actor and critic forwards
start from the rollout's trunk output, which no update changes.

The shared depth is measured, never assumed: the leading layers (and the embedding) that hold no adapter
and no trainable parameter in every network and are equal tensor for tensor (:func:`shared_depth`); 0
disables the sharing. Served: the decoder loop's architectures (Llama, Mistral, Qwen2: no embedding scaling,
so the top layers can start from ``inputs_embeds``) with the rlhf_fast attention, outside FSDP.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline import distributed as D

# the architectures whose decoder forward is embed -> rotary -> layers -> norm with no scaling of the embedding
TRUNK_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _decoder(model) -> nn.Module:
    """The decoder stack (``LlamaModel`` ...) of a transformers model, peft-wrapped or not."""
    return D.unwrap_peft(model).base_model


def frozen_depth(model) -> int:
    """How many leading decoder layers of `model` hold no adapter and no trainable parameter, with a frozen
    token embedding (0 when the model is not one the trunk serves)."""
    base = D.unwrap_peft(model)
    if getattr(base.config, "model_type", None) not in TRUNK_MODEL_TYPES or D.is_fsdp(model):
        return 0
    if getattr(base.config, "_attn_implementation", None) != C.ATTN:
        return 0
    dec = base.base_model
    if any(p.requires_grad for p in dec.embed_tokens.parameters()):
        return 0
    depth = 0
    for layer in dec.layers:
        if any(p.requires_grad for p in layer.parameters()) or any(hasattr(m, "lora_A") for m in layer.modules()):
            break
        depth += 1
    return depth


def _same(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold equal tensors under the same names (parameters and buffers, the
    non-persistent ones such as rotary frequencies included)."""
    sa, sb = dict(a.named_buffers()) | a.state_dict(), dict(b.named_buffers()) | b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and
        (sa[k].data_ptr() == sb[k].data_ptr() or torch.equal(sa[k], sb[k])) for k in sa)


def shared_depth(models: list) -> int:
    """The depth of the trunk every one of `models` shares: the leading decoder layers frozen in all of
    them whose weights (and the token embedding, and the rotary frequencies) are equal; 0 when none is."""
    depth = min(frozen_depth(m) for m in models)
    if depth == 0:
        return 0
    decs = [_decoder(m) for m in models]
    first = decs[0]
    for dec in decs[1:]:
        if dec is first:
            continue
        scaling = [getattr(x.rotary_emb, "attention_scaling", 1.0) for x in (first, dec)]
        if not _same(first.embed_tokens, dec.embed_tokens) or not _same(first.rotary_emb, dec.rotary_emb) or \
                scaling[0] != scaling[1]:
            return 0
        same = 0
        while same < depth and _same(first.layers[same], dec.layers[same]):
            same += 1
        depth = same
    return depth


@contextlib.contextmanager
def _span(dec: nn.Module, lo: int, hi: int, final_norm: bool):
    """`dec` with only its decoder layers [lo, hi) (and without its final norm unless `final_norm`)."""
    layers, norm = dec.layers, dec.norm
    dec.layers = layers[lo:hi]
    if not final_norm:
        dec.norm = nn.Identity()
    try:
        yield dec
    finally:
        dec.layers, dec.norm = layers, norm


def packed_inputs(prompts: list[list[int]], answers: list[list[list[int]]], device):
    """(input ids (1, total), position ids (1, total), SharedPrefixLayout) of token-id lists packed as
    ``[prompt_1, answers_1..., prompt_2, ...]``."""
    from rlhf_fast.integrations.transformers import shared_prefix_inputs

    return shared_prefix_inputs([torch.tensor(p) for p in prompts],
                                [[torch.tensor(a) for a in ans] for ans in answers], device)


@dataclass
class Trunk:
    """The trunk's output on a packed batch of G prompts with their answers ``[prompt_1, answers_1...,
    prompt_2, ...]``: input ids and position ids ``(1, total)``, the SharedPrefixLayout, the hidden states
    after the first `depth` layers ``(1, total, H)`` (no gradient) and each group's length."""

    ids: Tensor
    pos: Tensor
    layout: object
    hidden: Tensor
    depth: int
    group_lens: list[int]

    def select(self, groups: list[int], prompts: list[list[int]], answers: list[list[list[int]]]) -> Trunk:
        """The trunk of the packed batch of `groups` (indices into this batch; `prompts` / `answers`: theirs,
        in that order): their slices of the hidden states, concatenated (attention never crosses groups)."""
        starts = [0]
        for n in self.group_lens:
            starts.append(starts[-1] + n)
        hidden = torch.cat([self.hidden[:, starts[g]:starts[g + 1]] for g in groups], 1)
        ids, pos, layout = packed_inputs(prompts, answers, self.ids.device)
        if ids.shape[1] != hidden.shape[1]:
            raise ValueError(f"groups: their packed length {ids.shape[1]} is not that of their trunk slices "
                             f"{hidden.shape[1]}")
        return Trunk(ids, pos, layout, hidden, self.depth, [self.group_lens[g] for g in groups])


@torch.no_grad()
def packed_trunk(model, prompts: list[list[int]], answers: list[list[list[int]]], depth: int, device) -> Trunk:
    """Run the first `depth` decoder layers of `model` over the prompts packed with their answers."""
    from rlhf_fast.integrations.transformers import LAYOUT_KWARG

    ids, pos, layout = packed_inputs(prompts, answers, device)
    dec = _decoder(model)
    with _span(dec, 0, depth, final_norm=False):
        hidden = dec(input_ids=ids, position_ids=pos, use_cache=False, **{LAYOUT_KWARG: layout}).last_hidden_state
    lens = [len(p) + sum(len(a) for a in ans) for p, ans in zip(prompts, answers, strict=True)]
    return Trunk(ids, pos, layout, hidden, depth, lens)


def top_hidden(model, trunk: Trunk) -> Tensor:
    """(total, H) last hidden states (final norm applied) of `model` from the trunk's output through its own
    layers from ``trunk.depth`` on (its adapters apply; gradients flow when enabled)."""
    from rlhf_fast.integrations.transformers import LAYOUT_KWARG

    dec = _decoder(model)
    with _span(dec, trunk.depth, len(dec.layers), final_norm=True):
        out = dec(inputs_embeds=trunk.hidden, position_ids=trunk.pos, use_cache=False,
                  **{LAYOUT_KWARG: trunk.layout})
    return out.last_hidden_state[0]
