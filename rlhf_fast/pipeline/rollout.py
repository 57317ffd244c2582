"""Fast rollout: sampling answers from a causal LM with a preallocated KV cache and a decode loop of our
own over the decoder layers, instead of transformers' ``model.generate``.

Where ``generate``'s time goes besides the model (measured in bench/bench_rollout.py on SmolLM2-135M,
CPU): per step it builds a 4-D causal mask over the whole cache, grows a ``DynamicCache`` by
concatenation (every layer's keys and values copied once per token), runs the logits processors and
stopping criteria, and keeps stepping rows that have already finished. Here:

- one prefill over the B distinct prompts (``num_samples`` copies of a prompt share it: its keys and
  values are repeated, not recomputed), the lm_head on the last position only; the tokens all B prompts
  begin with (a chat template's header and default system prompt: 24 of SmolLM2's 42-46-token chat
  prompts) are run once for all rows;
- a static cache ``(rows, kv_heads, P + N - 1, head_dim)`` per layer, written in place one column per
  step; the decode attention reads the cache up to the current column with a key mask that hides the
  prompts' left padding, so no 4-D mask is ever built;
- the layers' own modules (projections, norms, MLP, rotary embedding) are called directly, so LoRA
  adapters, patched linears and any rope scaling apply exactly as in the model's forward;
- one query per row attends over the cache as a small matmul per key/value head (SDPA's per-call set-up
  costs more than this attention);
- rows that hit a stop token leave the batch (the cache is compacted once enough rows have finished to
  pay for the copy), and the loop ends when every row has stopped;
- sampling reads one (rows, V) fp32 logit matrix per step: temperature, top-k, top-p, then one uniform
  number per row from the caller's generator, inverted through the row's cumulative distribution;
- on CPU, a fp32 model's linear layers (LoRA layers' base weights too) run on weights packed once per call
  in oneDNN's blocked layout (a GEMM of a few rows otherwise repacks its whole weight on every step; see
  PACK_MAX_BYTES), q/k/v as one GEMM and gate/up as one.

Models the decode loop cannot serve (other architectures, FSDP-sharded parameters, sliding-window
attention shorter than the rollout) go through ``model.generate`` with the reason in the result and a
warning; both paths return the same :class:`Rollout`.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Architectures whose decoder layer is Llama's: pre-norm attention with q/k/v/o projections and rotary
# embeddings applied by the module's apply_rotary_pos_emb, then a pre-norm MLP; no logit soft-capping,
# no embedding scaling. Mistral and Qwen2 differ from Llama only in sliding windows (refused below when
# they bite) and Qwen2's q/k/v biases (inside the projection modules).
_DECODER_LOOP_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class Rollout:
    """Sampled answers, one row per (prompt, sample): row ``i * num_samples + j`` answers prompt ``i``.

    tokens           (R, N) int64 generated tokens; after a row's first stop token (kept) every entry is
                     ``pad_id``. N is the longest answer (at most ``max_new_tokens``), as in ``generate``.
    logprobs         (R, N) fp32 ``log_softmax(logits / temperature)`` of each sampled token (the
                     sampling distribution before top-k / top-p truncation; temperature 1 on the greedy
                     path), 0 after the answer; None when not asked for.
    lengths          (R,) int64 answer lengths, the stop token included.
    finished         (R,) bool, True where the answer ended with a stop token (False: cut at N).
    engine           "decoder_loop" or "generate".
    fallback_reason  why ``generate`` served the call, None on the decoder loop.
    """

    tokens: Tensor
    logprobs: Tensor | None
    lengths: Tensor
    finished: Tensor
    engine: str
    fallback_reason: str | None = None


# ---------------------------------------------------------------------------------------------
# Which models the decoder loop serves
# ---------------------------------------------------------------------------------------------

def _base_model(model):
    """The transformers model under a peft wrapper (its modules are still the adapted ones)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_loop_reasons(model, total_len: int | None = None) -> list[str]:
    """Why :func:`fast_sample`'s decoder loop cannot run `model` (empty: it can). `total_len` is the
    prompt plus answer length the rollout needs (for sliding-window models)."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _DECODER_LOOP_TYPES:
        return [f"model_type {model_type!r} is not one the decoder loop implements ({', '.join(_DECODER_LOOP_TYPES)})"]
    reasons = []
    inner = getattr(base, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            reasons.append(f"the model has no model.{name}")
    if reasons:
        return reasons
    if base.get_output_embeddings() is None:
        reasons.append("the model has no output embedding (lm_head)")
    layer = inner.layers[0]
    attn = getattr(layer, "self_attn", None)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"):
        if not hasattr(attn, name):
            reasons.append(f"the decoder layers' self_attn has no {name}")
    for name in ("q_norm", "k_norm"):
        if hasattr(attn, name):
            reasons.append(f"the attention has {name} (not in the decoder loop)")
    for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
        if not hasattr(layer, name):
            reasons.append(f"the decoder layers have no {name}")
    if attn is not None and not hasattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb"):
        reasons.append(f"{type(attn).__module__} has no apply_rotary_pos_emb")
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    uses_window = any(t != "full_attention" for t in layer_types) or (
        model_type == "mistral" and window is not None) or bool(getattr(config, "use_sliding_window", False))
    if uses_window and window is not None and (total_len is None or total_len > window):
        reasons.append(f"sliding-window attention (window {window}) over a rollout of {total_len} tokens")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if any(isinstance(p, DTensor) for p in base.parameters()):
        reasons.append("the parameters are sharded DTensors (FSDP2): each layer's weights are gathered by "
                       "the model's forward hooks, which the decoder loop bypasses")
    if any(p.device.type == "meta" for p in base.parameters()):
        reasons.append("the model has parameters on the meta device")
    return reasons


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

def _check_args(model, input_ids, attention_mask, num_samples, max_new_tokens, temperature, top_p, top_k,
                stop_ids, pad_id):
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = (f"a {input_ids.dim()}-dim {input_ids.dtype} tensor" if isinstance(input_ids, Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids: expected a 2-dim int64 tensor (B, P), got {got}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected at least one prompt of at least one token, got shape "
                         f"{tuple(input_ids.shape)}")
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (input_ids'), got {got}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask: expected device {input_ids.device} (input_ids'), got "
                         f"{attention_mask.device}")
    mask = attention_mask.bool()
    if not torch.equal(mask.to(attention_mask.dtype), attention_mask):
        raise ValueError("attention_mask: expected only 0 and 1 entries")
    if not bool(mask[:, -1].all()):
        bad = int((~mask[:, -1]).nonzero()[0])
        raise ValueError(f"attention_mask: expected left padding (every row's last entry 1), row {bad} ends in 0 "
                         f"(right-padded or empty prompt)")
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        bad = int((mask[:, 1:] < mask[:, :-1]).any(1).nonzero()[0])
        raise ValueError(f"attention_mask: expected left padding (zeros then ones), row {bad} has a 0 after a 1")
    vocab = _base_model(model).config.vocab_size
    real = input_ids[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise ValueError(f"input_ids: expected token ids in [0, {vocab}) where attention_mask is 1, got "
                         f"[{int(real.min())}, {int(real.max())}]")
    for name, value, low in (("num_samples", num_samples, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("top_k", top_k, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature: expected a finite float >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")
    if isinstance(stop_ids, (int, Tensor)) or not all(isinstance(s, int) and 0 <= s < vocab for s in stop_ids):
        raise ValueError(f"stop_ids: expected a list of token ids in [0, {vocab}), got {stop_ids!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id: expected an int, got {pad_id!r}")


# ---------------------------------------------------------------------------------------------
# Sampling one step
# ---------------------------------------------------------------------------------------------

def _sample(logits: Tensor, temperature: float, top_k: int, top_p: float, generator,
            work: dict | None = None) -> tuple[Tensor, Tensor]:
    """Next tokens (b,) and their log-probs (b,) fp32 from fp32 logits (b, V), as ``generate`` samples:
    temperature, then top-k, then top-p (HF's TopK/TopP warpers, min_tokens_to_keep=1). The log-prob is
    the untruncated ``log_softmax(logits / temperature)`` (temperature 1 when greedy).

    With `work` (a dict the caller keeps for a whole rollout), `logits` is overwritten by the log-probs and the
    (b, V) probabilities and their cumulative sums go to buffers kept in `work` for the next step: fresh
    multi-MB tensors every step cost more in first-touch page faults than the arithmetic (4.7 vs ~1 ms a step
    at 16 x 49152 on a 2-core CPU)."""
    if temperature == 0:
        logp = torch.log_softmax(logits, -1)
        tok = logits.argmax(-1)
        return tok, logp.gather(1, tok[:, None])[:, 0]
    if work is None:
        logp = torch.log_softmax(logits / temperature if temperature != 1 else logits, -1)  # (b, V)
    else:
        logp = logits.div_(temperature) if temperature != 1 else logits
        logp = logp.sub_(torch.logsumexp(logp, -1, keepdim=True))
    scores = logp  # log-probs are logits of the same distribution
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if scores is not logp:
        probs = torch.softmax(scores, -1)
    elif work is None:
        probs = logp.exp()
    else:
        probs = torch.exp(logp, out=_buffer(work, "probs", logp.shape, torch.float32, logp.device))
    cum = None if work is None else _buffer(work, "cum", probs.shape, torch.float64, probs.device)
    tok = _draw(probs, generator, cum)
    return tok, logp.gather(1, tok[:, None])[:, 0]


def _buffer(work: dict, name: str, shape, dtype, device) -> Tensor:
    """work[name][:shape[0]] when it holds at least shape[0] rows of shape[1:], else a new (shape) buffer there."""
    buf = work.get(name)
    if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != dtype:
        buf = work[name] = torch.empty(shape, dtype=dtype, device=device)
    return buf[: shape[0]]


def _draw(probs: Tensor, generator, cum: Tensor | None = None) -> Tensor:
    """One token per row of `probs` (b, V), non-negative and summing to ~1, drawn by inverting the row's
    cumulative distribution at one uniform number: P(token i) = probs[i] / sum(probs) exactly up to the fp64
    cumulative sum, zero-probability tokens never. ``torch.multinomial`` draws V exponentials per row instead
    (16.5 ms of a 73 ms decode step at 16 rows x 49152 tokens on a 2-core CPU). `cum`: an fp64 (b, V) buffer
    for the cumulative sums."""
    cum = torch.cumsum(probs, -1, dtype=torch.float64, out=cum)       # (b, V)
    total = cum[:, -1:]
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator) * total
    # u < total, so the first entry above u is a token with probability > 0 (never one past the end)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, u, right=True)[:, 0]


# ---------------------------------------------------------------------------------------------
# The decoder loop
# ---------------------------------------------------------------------------------------------

# On CPU a GEMM of a few rows repacks its whole weight on every call: at 16 rows the lm_head's (576 x 49152) took
# 33.0 ms, 14.5 ms with the weight packed once in oneDNN's blocked layout, and the MLP's 1.5-1.7x less
# (bench/bench_rollout.py measures the whole rollout). The decode loop packs the plain fp32 nn.Linear layers of a
# model up to this many bytes of weights once per call (the packed copy lives for the rollout); LoRA-adapted and
# other modules are called as they are.
PACK_MAX_BYTES = 2 << 30


def _lora_parts(module):
    """(base nn.Linear, [(lora_A, lora_B, dropout, scaling), ...]) of a peft LoRA Linear whose forward is
    ``base(x) + sum(lora_B(lora_A(dropout(x))) * scaling)`` over its active adapters; None for anything else
    (merged or disabled adapters, DoRA and other variants, mixed-adapter batches)."""
    if type(module).__name__ != "Linear" or not type(module).__module__.startswith("peft."):
        return None
    base = getattr(module, "base_layer", None)
    if (type(base) is not torch.nn.Linear or getattr(module, "disable_adapters", True)
            or getattr(module, "merged", True)):
        return None
    variants = getattr(module, "lora_variant", {}) or {}
    parts = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in variants:
            return None
        parts.append((module.lora_A[name], module.lora_B[name], module.lora_dropout[name], module.scaling[name]))
    return base, parts


def _packer(model, rows: int):
    """fn(*modules) -> one callable computing the concatenated outputs of `modules` (linear layers that share
    their input) from their weights packed once in oneDNN's layout, or None when they are not all plain
    ``nn.Linear`` or peft LoRA layers over one. The packer itself is None when packing does not apply (not a
    CPU fp32 model, oneDNN missing, weights over PACK_MAX_BYTES). A LoRA layer's base weight is packed and its
    adapters are called as they are (so they may change between calls)."""
    params = list(_base_model(model).parameters())
    if (not params or params[0].device.type != "cpu" or any(p.dtype != torch.float32 for p in params)
            or not torch.backends.mkldnn.is_available() or sum(p.numel() * 4 for p in params) > PACK_MAX_BYTES):
        return None
    ops = torch.ops.mkldnn

    def pack(*modules):
        plain = [m if type(m) is torch.nn.Linear else None for m in modules]
        if len(modules) == 1 and plain[0] is None:
            parts = _lora_parts(modules[0])
            if parts is None:
                return None
            base, adapters = parts
            gemm = pack(base)
            return lambda x: sum((b(a(d(x))) * c for a, b, d, c in adapters), gemm(x))
        if any(m is None for m in plain):
            return None
        weight = torch.cat([m.weight.detach() for m in modules]) if len(modules) > 1 else modules[0].weight.detach()
        bias = None
        if any(m.bias is not None for m in modules):
            bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in modules])
        packed = ops._reorder_linear_weight(weight, rows)
        return lambda x: ops._linear_pointwise(x, packed, bias, "none", [], "")
    return pack


# A prefix every prompt shares is run once when that saves at least this many token positions ((rows - 1) x its
# length): below that the extra pass over the layers costs more than the positions it saves.
SHARED_PREFIX_MIN_SAVED = 16


def _shared_prefix(ids: Tensor, valid: Tensor) -> int:
    """How many leading real tokens every row of the left-padded `ids` (b, P) shares, at most the shortest
    row's length - 1 (each row keeps a token of its own); 0 when sharing would not pay."""
    b, p = ids.shape
    lengths = valid.sum(1)
    shortest = int(lengths.min())
    if b < 2 or (b - 1) * (shortest - 1) < SHARED_PREFIX_MIN_SAVED:
        return 0
    cols = (p - lengths)[:, None] + torch.arange(shortest - 1, device=ids.device)  # each row's first tokens
    lead = ids.gather(1, cols)                                                   # (b, shortest - 1)
    same = (lead == lead[:1]).all(0)
    n = int(same.long().cumprod(0).sum())
    return n if (b - 1) * n >= SHARED_PREFIX_MIN_SAVED else 0


def _split(fn, sizes):
    """x -> fn(x) split into `sizes` along the last dim (the outputs of one fused GEMM)."""
    return lambda x: fn(x).split(sizes, -1)


def _each(fns):
    """x -> (f(x) for f in fns)."""
    return lambda x: tuple(f(x) for f in fns)


def _gated_mlp(gate_up, act, down):
    """Llama's MLP, down(act(gate(x)) * up(x)), with gate_up(x) -> (gate(x), up(x))."""
    def mlp(x):
        gate, up = gate_up(x)
        return down(act(gate) * up)
    return mlp


class _DecoderLoop:
    """A Llama-style model's forward, split into one prefill and single-token steps over a static cache."""

    def __init__(self, model, rows: int = 1):
        base = _base_model(model)
        inner = base.model
        config = base.config
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)[: config.num_hidden_layers]
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = base.get_output_embeddings()
        # per layer: (qkv, o, mlp) callables, qkv(h) -> (q, k, v). Packed, q/k/v are one GEMM (their weights
        # concatenated) where all three are plain linears, and the MLP is Llama's down(act(gate(x)) * up(x))
        # with gate and up as one GEMM likewise.
        pack = _packer(model, rows)

        def one(module):
            return (pack(module) if pack is not None else None) or module

        self.proj = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            fused = pack(*projs) if pack is not None else None
            qkv = (_split(fused, [m.out_features for m in projs]) if fused is not None
                   else _each([one(m) for m in projs]))
            if pack is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                gate_up = pack(mlp.gate_proj, mlp.up_proj)
                if gate_up is None:
                    gate_up = _each([one(mlp.gate_proj), one(mlp.up_proj)])
                else:
                    gate_up = _split(gate_up, [mlp.gate_proj.out_features, mlp.up_proj.out_features])
                ffn = _gated_mlp(gate_up, mlp.act_fn, one(mlp.down_proj))
            else:
                ffn = mlp
            self.proj.append((qkv, one(attn.o_proj), ffn))
        self.head = one(self.lm_head)
        attn = self.layers[0].self_attn
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def _attention_block(self, i, layer, x, cos, sin, col, attend):
        """x (b, t, hidden) -> x + attention; writes the t new keys/values at cache columns col..col+t-1 and
        attends over columns [0, col + t) with `attend` (bool, broadcastable to (b, heads, t, col + t))."""
        b, t, _ = x.shape
        qkv, o_proj, _ = self.proj[i]
        q, k, v = qkv(layer.input_layernorm(x))
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)   # (b, H, t, D)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)      # (b, Hkv, t, D)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        kc, vc = self.k[i], self.v[i]
        kc[:, :, col: col + t] = k   # one row of x (a prefix every row shares) is written to every row
        vc[:, :, col: col + t] = v
        keys, values = kc[:b, :, : col + t], vc[:b, :, : col + t]
        if t == 1:
            # one query per row: the query heads of a key/value head as the rows of one small matmul (SDPA's
            # per-call set-up costs more than this attention: 225 vs ~40 us a layer at 16 rows on CPU)
            qg = q.reshape(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(self.scaling)     # (b, Hkv, g, L)
            scores.masked_fill_(~attend.view(b, 1, 1, -1), float("-inf"))
            out = torch.matmul(scores.softmax(-1), values).view(b, self.n_heads, 1, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=self.scaling,
                                                 enable_gqa=self.n_heads != self.n_kv)
        return x + o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _forward(self, ids, pos, col, attend):
        x = self.embed(ids)                                           # (b, t, hidden)
        cos, sin = self.rotary(x, pos)
        for i, layer in enumerate(self.layers):
            x = self._attention_block(i, layer, x, cos, sin, col, attend)
            x = x + self.proj[i][2](layer.post_attention_layernorm(x))
        return self.norm(x[:, -1])                                    # (b, hidden): the last position only

    def prefill(self, ids: Tensor, mask: Tensor, cache_len: int) -> tuple[Tensor, Tensor]:
        """ids, mask (b, P) left-padded -> (last hidden state (b, hidden), which of the cache's first P columns
        hold real keys (b, P) bool); allocates the cache.

        The tokens every row begins with (a chat template's header and system prompt, a shared instruction)
        are run once: their keys and values go to columns [0, S) of every row, and each row's remaining tokens
        follow at columns [S, P), left-padded there, with the positions they have in the row (the key mask
        hides the padding, wherever it sits). At least each row's last token is in the second pass."""
        b, p = ids.shape
        dtype, device = self.embed.weight.dtype, ids.device
        shape = (b, self.n_kv, cache_len, self.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        valid = mask.bool()
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~valid, 0)    # as transformers does for left padding
        shared = _shared_prefix(ids, valid)
        if shared:
            start = p - int(valid[0].sum())
            lead = ids[:1, start: start + shared]
            causal = torch.ones(shared, shared, dtype=torch.bool, device=device).tril()
            self._forward(lead, pos[:1, start: start + shared], 0, causal[None, None])
            ids, pos, valid = ids[:, shared:], pos[:, shared:], valid[:, : p - shared]
        t = p - shared
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        # a padding query sees only itself (keeps its softmax finite; no real query ever reads it)
        attend = (causal & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=device)
        keys = torch.cat([torch.ones(b, shared, dtype=torch.bool, device=device), valid], 1)  # (b, P)
        attend = torch.cat([keys[:, None, :shared].expand(b, t, shared), attend], 2)
        return self._forward(ids, pos, shared, attend[:, None]), keys

    def step(self, tok: Tensor, pos: Tensor, col: int, attend: Tensor) -> Tensor:
        """tok, pos (b,) -> last hidden (b, hidden); keys/values at cache column col; attend (b, 1, 1, col+1)."""
        return self._forward(tok[:, None], pos[:, None], col, attend)

    def select_rows(self, index: Tensor) -> None:
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


def _decoder_loop_sample(model, ids, mask, num_samples, max_new_tokens, temperature, top_p, top_k, stops, pad_id,
                         generator, return_logprobs):
    b, p = ids.shape
    n = max_new_tokens
    rows_total = b * num_samples
    loop = _DecoderLoop(model, rows_total)
    device = ids.device
    hidden, prompt_keys = loop.prefill(ids, mask, p + n - 1)         # (b, hidden), (b, P)
    key_valid = torch.cat([prompt_keys, torch.ones(b, n - 1, dtype=torch.bool, device=device)], 1)  # (b, P+N-1)
    next_pos = mask.long().sum(1)                                    # position of the first answer token
    if num_samples > 1:
        rep = torch.arange(b, device=device).repeat_interleave(num_samples)
        loop.select_rows(rep)
        hidden, key_valid, next_pos = hidden[rep], key_valid[rep], next_pos[rep]
    logits = loop.head(hidden).float()                               # (R, V)

    tokens = torch.full((rows_total, n), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows_total, n, dtype=torch.float32, device=device)
    lengths = torch.full((rows_total,), n, dtype=torch.long, device=device)
    finished = torch.zeros(rows_total, dtype=torch.bool, device=device)
    rows = torch.arange(rows_total, device=device)                   # output row of each batch row
    alive = torch.ones(rows_total, dtype=torch.bool, device=device)  # batch rows still generating
    work: dict = {}
    for s in range(n):
        tok, lp = _sample(logits, temperature, top_k, top_p, generator, work)
        tokens[rows, s] = tok                                        # rows that already stopped are
        logprobs[rows, s] = lp                                       # overwritten by the padding below
        stopped = torch.isin(tok, stops) & alive
        if bool(stopped.any()):
            lengths[rows[stopped]] = s + 1
            finished[rows[stopped]] = True
            alive &= ~stopped
        if s == n - 1 or not bool(alive.any()):
            break
        dead = int((~alive).sum())
        # drop finished rows once the steps they would still cost outweigh copying the cache (~1/3 of a step)
        if dead and dead * (n - 1 - s) >= alive.numel():
            keep = alive.nonzero()[:, 0]
            loop.select_rows(keep)
            rows, tok, next_pos, key_valid = rows[keep], tok[keep], next_pos[keep], key_valid[keep]
            alive = alive[keep]
        col = p + s
        hidden = loop.step(tok, next_pos + s, col, key_valid[:, None, None, : col + 1])
        logits = loop.head(hidden).float()
    return tokens, logprobs, lengths, finished


# ---------------------------------------------------------------------------------------------
# The generate fallback
# ---------------------------------------------------------------------------------------------

def _generate_sample(model, ids, mask, num_samples, max_new_tokens, temperature, top_p, top_k, stops, pad_id,
                     generator):
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                  eos_token_id=stops.tolist() or None, pad_token_id=pad_id, use_cache=True, output_logits=True,
                  return_dict_in_generate=True)
    if temperature > 0:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
        if generator is not None:  # generate samples from the global RNG: seed it from the caller's generator
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    gen = out.sequences[:, ids.shape[1]:]                            # (R, n)
    logits = torch.stack(out.logits, 1).float()                      # (R, n, V) before any processor
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits / t, -1).gather(2, gen[..., None])[..., 0]
    is_stop = torch.isin(gen, stops)
    finished = is_stop.any(1)
    lengths = torch.where(finished, is_stop.float().argmax(1) + 1, torch.full_like(finished, gen.shape[1],
                                                                                   dtype=torch.long))
    return gen, logp, lengths, finished


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def fast_sample(model, input_ids: Tensor, attention_mask: Tensor, *, num_samples: int, max_new_tokens: int,
                temperature: float, top_p: float, top_k: int = 0, stop_ids: list[int], pad_id: int,
                generator: torch.Generator | None = None, return_logprobs: bool = True,
                engine: str = "auto") -> Rollout:
    """Sample `num_samples` answers per prompt from a causal LM, faster than ``model.generate``.

    Args:
        model: a transformers causal LM (a peft model too). Llama, Mistral and Qwen2 run on the decoder
            loop; anything else, or a model it cannot serve (see :func:`decoder_loop_reasons`), on
            ``model.generate``, with a warning that gives the reason. The model runs in inference mode with
            its modules' eval-time semantics; its weights and mode are left as they are.
        input_ids: (B, P) int64 prompts, LEFT-padded.
        attention_mask: (B, P) 0/1, 0 on each row's left padding, at least one 1 per row. Positions are
            ``cumsum(attention_mask) - 1``, as transformers computes them.
        num_samples: answers per prompt; row ``i * num_samples + j`` answers prompt ``i``.
        max_new_tokens: at most this many tokens per answer.
        temperature: the logits are divided by it; 0 is greedy (argmax, ``do_sample=False``).
        top_p: nucleus sampling threshold in (0, 1] (1: off), after temperature and top-k.
        top_k: keep the k most likely tokens (0: off), after temperature.
        stop_ids: token ids that end an answer (kept in it). A row is finished by its first stop token,
            never by `pad_id` (which may equal a stop id).
        pad_id: what fills each row after its answer.
        generator: the torch.Generator sampling draws from (default: the global RNG).
        return_logprobs: also return each sampled token's log-prob.
        engine: "auto", "decoder_loop" (raise if it cannot serve the model) or "generate".

    Returns:
        :class:`Rollout`: tokens (B * num_samples, N) right-padded with `pad_id`; logprobs (same shape, fp32)
        ``log_softmax(logits / temperature)`` of each sampled token — the sampling distribution at
        `temperature` BEFORE top-k / top-p truncation (what the PPO ratio's old log-probs are computed
        as), temperature 1 on the greedy path — and 0 after the answer; lengths; finished.
    """
    _check_args(model, input_ids, attention_mask, num_samples, max_new_tokens, temperature, top_p, top_k,
                stop_ids, pad_id)
    if engine not in ("auto", "decoder_loop", "generate"):
        raise ValueError(f"engine: expected 'auto', 'decoder_loop' or 'generate', got {engine!r}")
    total_len = input_ids.shape[1] + max_new_tokens
    reasons = decoder_loop_reasons(model, total_len) if engine != "generate" else ["engine='generate' was asked for"]
    if reasons and engine == "decoder_loop":
        raise ValueError("engine: the decoder loop cannot serve this model: " + "; ".join(reasons))
    device = _base_model(model).get_input_embeddings().weight.device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    with torch.inference_mode():
        if reasons:
            if engine == "auto":
                warnings.warn("fast_sample: model.generate serves this model: " + "; ".join(reasons), stacklevel=2)
            tokens, logprobs, lengths, finished = _generate_sample(model, ids, mask, num_samples, max_new_tokens,
                                                                   temperature, top_p, top_k, stops, pad_id, generator)
        else:
            tokens, logprobs, lengths, finished = _decoder_loop_sample(
                model, ids, mask, num_samples, max_new_tokens, temperature, top_p, top_k, stops, pad_id, generator,
                return_logprobs)
        width = int(lengths.max())
        after = torch.arange(width, device=device)[None] >= lengths[:, None]
        tokens = tokens[:, :width].masked_fill(after, pad_id)
        logprobs = logprobs[:, :width].masked_fill(after, 0.0)
    # copies made outside inference mode: the trainer feeds these to forwards that record autograd
    return Rollout(tokens.clone(), logprobs.clone() if return_logprobs else None, lengths.clone(), finished.clone(),
                   "generate" if reasons else "decoder_loop", "; ".join(reasons) if reasons else None)
