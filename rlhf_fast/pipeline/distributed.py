"""Scale-out plumbing of the pipeline: ``torchrun`` process groups, DDP / FSDP2 wrapping, global-batch
sharding, global statistics, sharded checkpoints and the gathered Hugging Face export, LoRA adapters.

Everything here is PyTorch's own machinery (``torch.distributed``, ``DistributedDataParallel``,
``torch.distributed.fsdp.fully_shard``, ``torch.distributed.checkpoint``) and ``peft``; this module only
decides how the pipeline's trainers use it:

- :func:`setup` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...),
  starts the process group (NCCL on GPU, gloo on CPU) and picks the rank's device. ``distributed="none"``
  without torchrun is the plain single-process run, untouched.
- :class:`Engine` wraps one model. ``engine(fn, *args)`` runs ``fn(model, *args)`` *inside* the wrapper's
  forward, so the fused ops that read ``lm_head.weight`` directly (``linear_logprobs``,
  ``linear_ppo_loss``) and ``generate`` run where DDP's reducer and FSDP2's root hooks expect them
  (FSDP2 only unshards the root's parameters — embeddings, final norm, lm_head — inside the root's forward).
- Losses are normalised by *global* counts (``num_items`` = tokens / prompts of the whole global batch,
  all-reduced), and the backward runs on ``loss * world_size`` because DDP and FSDP2 average gradients over
  ranks: the average of per-rank partial sums times the world size is the full-batch gradient. So N ranks x
  M micro-batches give the gradient of one batch, up to fp32 summation order.
- Data order depends only on the global step: the trainer draws the *global* batch of a step exactly as a
  single process would, and :func:`shard` gives rank r the rows ``r::world_size`` of it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf_fast.pipeline import common as C

MODES = ("none", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """Where this process stands: ``mode`` ("none", "ddp", "fsdp"), ``rank`` / ``world_size`` /
    ``local_rank`` (0 / 1 / 0 for a single process), its ``device`` and its compute ``precision``
    ("fp32", or "bf16": autocast on GPU and FSDP2's bf16 parameters with fp32 gradient reduction)."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is running (distributed="ddp"/"fsdp", even with one process)."""
        return self.mode != "none" and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def sum(self, *values) -> list[float]:
        """Sums of the given numbers over ranks (one all-reduce, float64)."""
        vals = [float(v) for v in values]
        if not (self.active and self.world_size > 1):
            return vals
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def autocast(self):
        """bf16 autocast on GPU when the precision is bf16; nothing otherwise."""
        if self.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def _resolve_device(name: str | None, local_rank: int) -> torch.device:
    if name in ("auto", "", None):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: not a torch device: {name!r} ({e})") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


def setup(mode: str = "none", device: str | None = "auto", precision: str = "auto") -> Dist:
    """Start (or join) the process group for `mode` and return this process's :class:`Dist`.

    Under torchrun (``WORLD_SIZE`` set) the group is initialised from the environment with NCCL when the
    device is a GPU, gloo otherwise; each rank takes ``cuda:LOCAL_RANK``. Without torchrun, "ddp" and
    "fsdp" run as a group of one process (an in-memory store; no port), which is what a single-GPU FSDP
    run is. "none" starts nothing, and refuses to run under a torchrun of several processes (each rank
    would train alone and write the same files). Calling it again reuses the running group."""
    if mode not in MODES:
        raise ValueError(f"distributed: expected one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if mode == "none" and world > 1:
        raise ValueError(f"distributed: launched by torchrun with {world} processes; pass --distributed ddp or "
                         "--distributed fsdp (with 'none' every rank would train alone and write the same files)")
    dev = _resolve_device(device, local_rank)
    prec = precision if precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    if mode == "none":
        return Dist("none", 0, 1, 0, dev, prec)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:  # a group of one process: no torchrun, no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(mode, dist.get_rank(), dist.get_world_size(), local_rank, dev, prec)


def shutdown() -> None:
    """Destroy the process group, if one runs (the CLI calls this when a command ends)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Data: global batches shared out by rank
# ---------------------------------------------------------------------------------------------

def shard(items, d: Dist):
    """Rank r's rows ``items[r::world_size]`` of a global batch (a list or a 1-D tensor)."""
    return items[d.rank:: d.world_size] if d.world_size > 1 else items


def micro_splits(n: int, grad_accum: int) -> list[slice]:
    """``min(grad_accum, n)`` contiguous, near-equal slices of range(n) (earlier ones one longer)."""
    k = max(1, min(int(grad_accum), n))
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


def check_batch(what: str, global_size: int, d: Dist, grad_accum: int) -> None:
    """Every rank needs at least `grad_accum` rows of each global batch (a rank with an empty micro-batch
    would skip collectives the others run)."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum: must be >= 1, got {grad_accum}")
    if global_size < d.world_size * grad_accum:
        raise ValueError(f"{what}: the global batch of {global_size} must hold at least world_size x grad_accum = "
                         f"{d.world_size} x {grad_accum} rows")


# ---------------------------------------------------------------------------------------------
# Global statistics
# ---------------------------------------------------------------------------------------------

WHITEN_EPS = 1e-8  # as rlhf_fast.gae(whiten=True)


def masked_whiten(x: Tensor, mask: Tensor, d: Dist) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the valid positions of *all ranks* (unbiased variance, 0 below
    two positions, masked positions 0): the formula of ``rlhf_fast.gae(..., whiten=True)``, with the mean
    and variance all-reduced in two float64 passes, so the result does not depend on the world size."""
    m = mask.bool()
    xd = x.double()
    s, n = d.sum(torch.where(m, xd, 0.0).sum(), m.sum())
    mean = s / max(1.0, n)
    (ss,) = d.sum(torch.where(m, (xd - mean) ** 2, 0.0).sum())
    var = ss / max(1.0, n - 1) if n >= 2 else 0.0
    return torch.where(m, (xd - mean) / (var + WHITEN_EPS) ** 0.5, 0.0).to(x.dtype)


def global_mean_std(x: Tensor, d: Dist) -> tuple[float, float, int]:
    """(mean, unbiased std, count) of a 1-D tensor over all ranks (two float64 passes)."""
    xd = x.double()
    s, n = d.sum(xd.sum(), xd.numel())
    mean = s / max(1.0, n)
    (ss,) = d.sum(((xd - mean) ** 2).sum())
    std = (ss / (n - 1)) ** 0.5 if n >= 2 else 0.0
    return mean, std, int(n)


class Stats:
    """Logged statistics gathered over micro-batches and ranks: ``add(name, value, weight)`` for weighted
    means, ``total(name, value)`` for sums, ``low`` / ``high`` for minima / maxima; :meth:`reduce` does
    one all-reduce per kind."""

    def __init__(self):
        self.mean: dict[str, list[float]] = {}
        self.sums: dict[str, float] = {}
        self.mins: dict[str, float] = {}
        self.maxs: dict[str, float] = {}

    def add(self, name: str, value, weight=1.0) -> None:
        acc = self.mean.setdefault(name, [0.0, 0.0])
        acc[0] += float(value) * float(weight)
        acc[1] += float(weight)

    def total(self, name: str, value) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def low(self, name: str, value) -> None:
        self.mins[name] = min(self.mins.get(name, float("inf")), float(value))

    def high(self, name: str, value) -> None:
        self.maxs[name] = max(self.maxs.get(name, float("-inf")), float(value))

    def reduce(self, d: Dist) -> dict[str, float]:
        keys_m, keys_s = sorted(self.mean), sorted(self.sums)
        flat = [v for k in keys_m for v in self.mean[k]] + [self.sums[k] for k in keys_s]
        flat = d.sum(*flat) if flat else []
        out = {k: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else 0.0 for i, k in enumerate(keys_m)}
        out.update({k: flat[2 * len(keys_m) + i] for i, k in enumerate(keys_s)})
        for table, op in ((self.mins, "MIN"), (self.maxs, "MAX")):
            keys = sorted(table)
            if not keys:
                continue
            vals = [table[k] for k in keys]
            if d.active and d.world_size > 1:
                t = torch.tensor(vals, dtype=torch.float64, device=d.device)
                dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
                vals = t.tolist()
            out.update(dict(zip(keys, vals, strict=True)))
        return out


# ---------------------------------------------------------------------------------------------
# Models: DDP / FSDP2 engine, LoRA, gradient checkpointing
# ---------------------------------------------------------------------------------------------

def _if(**kw):
    return {k: v for k, v in kw.items() if v is not None}


class _Apply(torch.nn.Module):
    """``forward(fn, *args)`` = ``fn(model, *args)``: the unit DDP and FSDP2 wrap, so that whatever a stage
    computes from the model (log-probs from the lm_head, generation, losses) runs inside the wrapper's
    forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def unwrap_peft(model):
    """The transformers model inside a peft ``PeftModel`` (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder blocks of a transformers model (classes named in ``_no_split_modules``), the units
    FSDP2 shards one by one; falls back to the longest ``nn.ModuleList``."""
    base = unwrap_peft(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        lists = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    return layers


def is_fsdp(model) -> bool:
    """Whether any submodule of `model` is FSDP2-sharded (then its forward passes are collectives)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (transformers' own, non-reentrant)."""
    base = unwrap_peft(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(base).__name__} does not support it")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_lora(model, *, r: int, alpha: float, dropout: float, target_modules: list[str], task_type: str,
               seed: int = 0, last_layers: int = 0):
    """``peft.get_peft_model`` with a LoRA adapter "default" (``task_type`` "CAUSAL_LM" or "SEQ_CLS"; for
    SEQ_CLS the scalar head ``score`` is trained in full as a module to save). The base weights are frozen;
    ``with model.disable_adapter():`` gives the base model back without a second copy. The adapters' initial
    weights are drawn from `seed`, not from the global RNG: the same in every rank and in a resumed run.
    ``last_layers`` > 0 puts adapters in the last that many decoder layers only (peft's
    ``layers_to_transform``): no parameter below them trains, so autograd records nothing there."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover
        raise ValueError("lora_r: LoRA needs the 'peft' package (pip install 'rlhf-fast[pipeline]')") from e
    targets = list(target_modules) if target_modules else "all-linear"
    layers = None
    if last_layers:
        n = getattr(model.config, "num_hidden_layers", None)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"lora_layers: {type(model).__name__}'s config has no num_hidden_layers")
        if not 0 < int(last_layers) <= n:
            raise ValueError(f"lora_layers: expected 1..{n} (the model's decoder layers) or 0, got {last_layers}")
        layers = list(range(n - int(last_layers), n))
        if targets == "all-linear":  # peft takes a layer subset with named targets only: the decoder's linears
            targets = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                              if isinstance(mod, torch.nn.Linear) and ".layers." in name})
    cfg = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                     task_type=task_type, bias="none", layers_to_transform=layers,
                     layers_pattern="layers" if layers else None)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes about peft's calls
        return get_peft_model(model, cfg)


def prepare(model, cfg, d: Dist, task_type: str = "CAUSAL_LM"):
    """The trained model of a stage on this rank's device, with the stage's LoRA adapter (``cfg.lora_r``)
    and activation checkpointing (``cfg.gradient_checkpointing``); wrap it in an :class:`Engine` next."""
    model = model.to(d.device)
    if getattr(cfg, "lora_r", 0):
        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_r
        model = apply_lora(model, r=cfg.lora_r, alpha=alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules, task_type=task_type, seed=getattr(cfg, "seed", 0),
                           last_layers=getattr(cfg, "lora_layers", 0))
    if getattr(cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    return model


def _mp_policy(d: Dist, root: bool):
    """bf16 parameters, fp32 gradient reduction on GPU. The root (:class:`_Apply`) does not cast its
    inputs: they are rollout statistics (old log-probs, advantages, returns) the losses want in fp32."""
    if d.precision == "bf16" and d.device.type == "cuda":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=not root)
    return None


class Engine:
    """One model under the run's data-parallel wrapper. With ``RLHF_FAST_LINEAR=1`` in the environment its
    ``nn.Linear`` layers are routed through :func:`rlhf_fast.linear`
    (:func:`~rlhf_fast.integrations.transformers.use_rlhf_fast_linear`, in place; opt-in).

    ``engine(fn, *args)`` runs ``fn(model, *args)`` through the wrapper's forward (gradients flow; DDP
    synchronises them, FSDP2 reduce-scatters them). ``engine.no_grad(fn, *args)`` runs without
    gradients (generation, rollout log-probs, evaluation): directly on the model for "none"/"ddp", through
    the FSDP2 root for "fsdp" (all ranks must then make the same calls). ``with engine.sync(last):``
    around each micro-batch skips the gradient all-reduce / reduce-scatter until the last one.

    "ddp": ``DistributedDataParallel`` (no buffer sync at each forward: the buffers are constants such as
    rotary frequencies); frozen models are not wrapped. "fsdp": ``fully_shard`` on every decoder layer, then on
    the root, with a bf16 ``MixedPrecisionPolicy`` on GPU. The optimizer must be built after the engine
    (FSDP2 replaces the parameters by sharded DTensors)."""

    def __init__(self, model: torch.nn.Module, d: Dist, *, trainable: bool = True):
        if os.environ.get("RLHF_FAST_LINEAR", "") not in ("", "0"):
            from rlhf_fast.integrations.transformers import use_rlhf_fast_linear

            use_rlhf_fast_linear(model)  # the layers' GEMMs through rlhf_fast.linear (oneDNN on x86 CPUs)
        self.model, self.dist = model, d
        self.module = _Apply(model)
        self.wrapped: torch.nn.Module = self.module
        wants_grad = trainable and any(p.requires_grad for p in model.parameters())
        if d.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(d.device.type, (d.world_size,))
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh, **_if(mp_policy=_mp_policy(d, root=False)))
            fully_shard(self.module, mesh=mesh, **_if(mp_policy=_mp_policy(d, root=True)))
        elif d.mode == "ddp" and wants_grad:
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # no buffer sync on every forward: the buffers are constants (rotary frequencies)
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
            # device_ids=None: the inputs are on the device already (and hold structures DDP need not copy)
            self.wrapped = DistributedDataParallel(self.module, device_ids=None, **sync)

    def __call__(self, fn: Callable, *args, **kwargs):
        with self.dist.autocast():
            return self.wrapped(fn, *args, **kwargs)

    @torch.no_grad()
    def no_grad(self, fn: Callable, *args, **kwargs):
        with self.dist.autocast():
            if self.dist.mode == "fsdp":
                try:
                    return self.wrapped(fn, *args, **kwargs)
                finally:
                    # the root keeps its weights gathered after a forward (for the backward that usually
                    # follows); without one, free them, so that an optimizer step or a state dict never
                    # meets a stale gathered copy
                    self.wrapped.reshard()
            return fn(self.model, *args, **kwargs)

    @contextlib.contextmanager
    def sync(self, enabled: bool):
        """Gradient synchronisation on (the last micro-batch of a step) or off (the others)."""
        if enabled or self.dist.mode == "none":
            if self.dist.mode == "fsdp":
                self.wrapped.set_requires_gradient_sync(True)
            yield
        elif self.dist.mode == "ddp" and hasattr(self.wrapped, "no_sync"):
            with self.wrapped.no_sync():
                yield
        elif self.dist.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapped.set_requires_gradient_sync(True)
        else:
            yield

    def backward(self, loss: Tensor) -> None:
        """``loss`` is this rank's part of the global loss (normalised by global counts); the wrappers
        average gradients over ranks, so the backward runs on ``loss * world_size`` to make that a sum."""
        (loss * self.dist.world_size if self.dist.world_size > 1 else loss).backward()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Export and checkpoints
# ---------------------------------------------------------------------------------------------

def full_state_dict(model, d: Dist) -> dict[str, Tensor]:
    """The model's whole state dict as plain CPU tensors on rank 0 (empty on the other ranks): gathered
    with ``get_model_state_dict(full_state_dict=True)`` under FSDP2 (a collective: every rank calls it)."""
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if d.is_main else {}
    if not d.is_main:
        return {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def merge_lora(state: dict[str, Tensor], peft_model) -> dict[str, Tensor]:
    """A peft model's gathered state dict turned into its base architecture's: every LoRA linear merged
    (``W + scaling * B @ A``), modules-to-save copies in place of the originals, peft prefixes dropped."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    out = dict(state)
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer):
            for adapter in mod.lora_A:
                a, b = out.pop(f"{name}.lora_A.{adapter}.weight"), out.pop(f"{name}.lora_B.{adapter}.weight")
                w = out[f"{name}.base_layer.weight"]
                delta = (b.float() @ a.float()) * mod.scaling[adapter]
                if getattr(mod, "fan_in_fan_out", False):
                    delta = delta.T
                out[f"{name}.base_layer.weight"] = (w.float() + delta).to(w.dtype)
            for k in [k for k in out if k.startswith(f"{name}.base_layer.")]:
                out[f"{name}.{k[len(name) + len('.base_layer.'):]}"] = out.pop(k)
        elif isinstance(mod, ModulesToSaveWrapper):
            adapter = mod.active_adapter if isinstance(mod.active_adapter, str) else mod.active_adapter[0]
            for k in [k for k in out if k.startswith(f"{name}.original_module.")]:
                del out[k]
            for k in [k for k in out if k.startswith(f"{name}.modules_to_save.{adapter}.")]:
                out[f"{name}.{k[len(f'{name}.modules_to_save.{adapter}.'):]}"] = out.pop(k)
    prefix = "base_model.model."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in out.items()}


def export_model(model, tokenizer, path, d: Dist, extra: dict | None = None) -> None:
    """The gathered Hugging Face export of `model` (``save_pretrained``, safetensors, + the tokenizer) for
    inference: rank 0 writes it from :func:`full_state_dict` (LoRA adapters merged into the weights), the
    other ranks wait. A collective under FSDP2."""
    if d.mode == "none" and not hasattr(model, "peft_config"):
        C.save_model(model, tokenizer, path, extra)  # the single-process path, as it always was
        return
    state = full_state_dict(model, d)
    if d.is_main:
        base = unwrap_peft(model)
        if base is not model:
            state = merge_lora(state, model)
        C.save_model(base, tokenizer, path, extra, state_dict=state)
    d.barrier()


def storage_bytes(models: Iterable[torch.nn.Module]) -> int:
    """Bytes of the distinct parameter and buffer storages of `models` (a tensor shared by two models
    counts once): what the models hold in memory."""
    seen, total = set(), 0
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            t = t.to_local() if hasattr(t, "to_local") else t
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total

