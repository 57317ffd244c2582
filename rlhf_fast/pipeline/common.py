"""Pieces every stage shares: device choice, model/tokenizer loading and saving, log-probs through the
fused lm_head op, the metrics log, learning-rate schedule and atomic, resumable checkpoints.

No module-level state: everything a stage needs is passed in (device, generators), so that the same code
runs per rank under torchrun (the distributed plumbing is in :mod:`rlhf_fast.pipeline.distributed`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor

import rlhf_fast
from rlhf_fast.pipeline.data import IGNORE

ATTN = "rlhf_fast"


def resolve_device(name: str) -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: not a torch device: {name!r} ({e})") from None


# ---------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------

def _register_attention():
    import rlhf_fast.integrations.transformers  # noqa: F401  registers attn_implementation="rlhf_fast"


def build_tiny_llama(tokenizer, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
                     seed=0, tie_word_embeddings=False, max_positions=1024):
    """A tiny ``LlamaForCausalLM`` built from a config (random init with `seed`) for `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _register_attention()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(ATTN)
    return model


def load_tokenizer(name: str, trust_remote_code: bool = False, progress: bool = True):
    """The model's tokenizer, left-padded (generation), with pad = eos when it has no pad token (padding is
    decided by the attention mask, never by the pad id)."""
    from transformers import AutoTokenizer

    from rlhf_fast.pipeline.models import quiet_transformers, resolve_model

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(resolve_model(name, progress), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer: {name} has no eos token (the pipeline ends answers with it)")
    tok.padding_side = "left"
    return tok


def _load_quietly(loader, name, trust_remote_code, expected_missing: tuple[str, ...] = (), progress: bool = True,
                  **kw):
    """``loader(name, ...)`` with attn_implementation="rlhf_fast" (falling back to "sdpa" for models it cannot
    serve), without transformers' load reports; a weight missing from the checkpoint is an error unless it
    is one the caller expects (the new scalar head of a reward model made from a causal LM)."""
    from rlhf_fast.pipeline.models import quiet_transformers, resolve_model

    _register_attention()
    path = resolve_model(name, progress)
    with quiet_transformers():
        try:
            model, info = loader(path, attn_implementation=ATTN, trust_remote_code=trust_remote_code,
                                 output_loading_info=True, **kw)
        except (ValueError, ImportError) as e:
            if "attn_implementation" not in str(e) and "attention" not in str(e).lower():
                raise
            model, info = loader(path, attn_implementation="sdpa", trust_remote_code=trust_remote_code,
                                 output_loading_info=True, **kw)
    tied = {n for n, _ in tied_parameters(model)}
    missing = [k for k in info.get("missing_keys", []) if k not in tied
               and not any(k == e or k.startswith(e + ".") for e in expected_missing)]
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise ValueError(f"model: {name} lacks weights {sorted(missing)[:8]}{more} that {type(model).__name__} "
                         "needs")
    return model


def tied_parameters(model) -> list[tuple[str, Tensor]]:
    """(name, tensor) of the parameters that share their storage with an earlier one (tied embeddings)."""
    seen, out = set(), []
    for n, p in model.named_parameters(remove_duplicate=False):
        key = p.data_ptr()
        if key in seen:
            out.append((n, p))
        seen.add(key)
    return out


def load_causal_lm(name: str, trust_remote_code: bool = False, device=None, progress: bool = True):
    from transformers import AutoModelForCausalLM

    if not name:
        raise ValueError("model: a local path or hub id is required")
    model = _load_quietly(AutoModelForCausalLM.from_pretrained, name, trust_remote_code, dtype=torch.float32,
                          progress=progress)
    return model.to(device) if device is not None else model


def load_scalar_model(name: str, trust_remote_code: bool = False, device=None, pad_token_id=None, seed: int = 0,
                      progress: bool = True):
    """A sequence-classification model with one output (the reward model / critic): the causal LM's
    network with its unembedding replaced by a scalar head ``score``.

    A head missing from the checkpoint (a causal LM turned into a reward model) is initialised from
    `seed`, not from whatever state the global RNG is in: the same seed gives the same reward model in
    every process (each rank of a torchrun, a resumed run, a second run). Any other missing weight is an
    error."""
    from transformers import AutoModelForSequenceClassification

    if not name:
        raise ValueError("reward_model: a local path or hub id is required")
    kw = {"num_labels": 1, "dtype": torch.float32}
    if pad_token_id is not None:
        kw["pad_token_id"] = pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _load_quietly(AutoModelForSequenceClassification.from_pretrained, name, trust_remote_code,
                              expected_missing=("score", "classifier"), progress=progress, **kw)
    return model.to(device) if device is not None else model


def _unwrap_peft(model):
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def scalar_head(model) -> torch.nn.Module:
    model = _unwrap_peft(model)
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"reward_model: {type(model).__name__} has no scalar head ('score')")


def save_model(model, tokenizer, path, extra: dict | None = None, state_dict: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer, written to a temporary directory and renamed;
    `state_dict` (e.g. gathered from FSDP shards) replaces the model's own tensors."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    from rlhf_fast.pipeline.models import quiet_transformers

    with quiet_transformers():  # no shard progress bars
        if state_dict is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:  # save_pretrained pops entries from the dict it is given
            model.save_pretrained(tmp, safe_serialization=True, state_dict=dict(state_dict))
        tokenizer.save_pretrained(tmp)
    if extra:
        (tmp / "rlhf_fast.json").write_text(json.dumps(extra, indent=2))
    _replace_dir(tmp, path)


def _replace_dir(tmp: Path, path: Path) -> None:
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions that skip left padding (as transformers' generate computes them)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T, H) last hidden states of the model's base network (of the transformers model inside a peft
    model: its adapters apply)."""
    out = _unwrap_peft(model).base_model(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def lm_head_params(model) -> tuple[Tensor, Tensor | None]:
    head = _unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"model: {type(model).__name__} has no output embedding (lm_head)")
    return head.weight, getattr(head, "bias", None)


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, temperature: float = 1.0,
                   return_entropy: bool = False):
    """(B, T-1) fp32 log p(labels) (0 where labels == -100), straight from the lm_head through
    :func:`rlhf_fast.linear_logprobs` (no (B, T, V) logits)."""
    h = hidden_states(model, input_ids, attention_mask)[:, :-1]
    weight, bias = lm_head_params(model)
    return rlhf_fast.linear_logprobs(h, weight, labels, bias=bias, temperature=temperature, ignore_index=IGNORE,
                                     return_entropy=return_entropy)


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------

def warmup_of(config, total_steps: int) -> int:
    """``config.warmup_steps``, or 10% of `total_steps` when it is negative."""
    return config.warmup_steps if config.warmup_steps >= 0 else math.ceil(0.1 * total_steps)


def optimizer_and_schedule(config, params, n_rows: int, lr: float):
    """(steps_per_epoch, total_steps, AdamW, warm-up + cosine LambdaLR) of a stage that trains `n_rows`
    rows in batches of ``config.batch_size`` for ``config.epochs`` (at most ``config.max_steps``) at peak
    learning rate `lr`."""
    steps_per_epoch = max(1, n_rows // config.batch_size)
    total = steps_per_epoch * config.epochs
    total_steps = min(total, config.max_steps) if config.max_steps else total
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_of(config, total_steps), total_steps))
    return steps_per_epoch, total_steps, optimizer, scheduler


def global_batch_indices(n_rows: int, batch_size: int, steps_per_epoch: int, seed: int, step: int) -> list[int]:
    """The rows of optimizer step `step`'s global batch: a permutation per epoch seeded by (seed, epoch),
    so the global batch depends on the step only (a resumed run draws what the uninterrupted one would)."""
    epoch, i = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(step_seed(seed, epoch))
    order = torch.randperm(n_rows, generator=g)
    return order[i * batch_size: (i + 1) * batch_size].tolist()


def progress_range(n: int, step: int, desc: str, progress: bool):
    """range(0, n, step) with a progress bar (rows done, ETA) on rank 0 when `progress`."""
    from tqdm.auto import tqdm

    show = progress and int(os.environ.get("RANK", "0") or 0) == 0
    with tqdm(total=n, desc=desc, disable=not show, dynamic_ncols=True, unit="prompt") as bar:
        for start in range(0, n, step):
            yield start
            bar.update(min(step, n - start))


def given_or_loaded(given, path: str, message: str, load):
    """`given` when it is not None, else ``load()`` when the config names a `path`, else ValueError(message)."""
    if given is not None:
        return given
    if not path:
        raise ValueError(message)
    return load()


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 10% of the peak."""
    def f(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (FSDP2) -> its global value


def clip_grad(params, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0: off); returns the norm before clipping. FSDP2's
    sharded gradients (DTensors) give the norm over all shards."""
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        return float(_full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    return float(torch.norm(torch.stack([_full(p.grad.norm()) for p in params]))) if params else 0.0


# ---------------------------------------------------------------------------------------------
# Metrics log
# ---------------------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (and to TensorBoard when the
    ``tensorboard`` package is installed). ``enabled=False`` (ranks other than 0) writes nothing."""

    def __init__(self, directory, stage: str, tensorboard: bool = True, enabled: bool = True):
        self.path = Path(directory) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.writer = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(directory) / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL log is the record
                self.writer = None

    def log(self, step: int, **values) -> dict:
        row = {"stage": self.stage, "step": int(step), "time": round(time.time(), 3)}
        for k, v in values.items():
            row[k] = float(v) if isinstance(v, Tensor | int | float) and not isinstance(v, bool) else v
        if not self.enabled:
            return row
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, float) and k not in ("time",):
                    self.writer.add_scalar(f"{self.stage}/{k}", v, step)
        return row

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        kept = [r for r in rows if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_metrics(path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def step_seed(seed: int, *parts: int) -> int:
    """A seed derived from the run seed and a position (epoch, step): data order and sampling depend only on
    where the run is, so a resumed run draws exactly what the uninterrupted one would."""
    s = seed & 0xFFFFFFFF
    for p in parts:
        s = (s * 1_000_003 + int(p) + 0x9E3779B9) & 0x7FFFFFFFFFFF
    return s
