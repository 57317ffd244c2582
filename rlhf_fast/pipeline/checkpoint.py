"""Resumable checkpoints of the pipeline's trainers: ``<stage>/checkpoint`` with the weights, the AdamW
state, the schedulers, the trainer state and the RNG state, never pickle.

One process ("none") or DDP: safetensors files (``safetensors.torch.save_model``, so tied embeddings are
stored once), from rank 0 for DDP plus every rank's RNG state. FSDP2: every rank writes its shards with
``torch.distributed.checkpoint`` into safetensors files (resumable on another world size). Every checkpoint
is written to ``checkpoint.tmp`` and renamed into place: a kill never leaves half a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from rlhf_fast.pipeline import common as C
from rlhf_fast.pipeline.distributed import Dist

SHARDED_DIR = "sharded"   # DCP shards (safetensors) inside <stage>/checkpoint for distributed="fsdp"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = []
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(idx)].append(k)
            else:
                meta["state"][str(idx)].append([k, v])
    return tensors, meta


def _load_optimizer(opt, tensors: dict, meta: dict) -> None:
    state = {}
    for idx, keys in meta["state"].items():
        st = {}
        for k in keys:
            if isinstance(k, list):
                st[k[0]] = k[1]
            else:
                st[k] = tensors[f"{idx}.{k}"]
        state[int(idx)] = st
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_single(directory, models: dict, optimizers: dict, schedulers: dict, state: dict) -> Path:
    """Write ``directory/checkpoint`` atomically: model weights and optimizer state as safetensors,
    scheduler and trainer state (step, RNG state) as JSON / safetensors. Never pickle."""
    directory = Path(directory)
    final = directory / "checkpoint"
    tmp = directory / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _write_files(tmp, models, optimizers, schedulers, state)
    C._replace_dir(tmp, final)
    return final


def _write_files(tmp: Path, models: dict, optimizers: dict, schedulers: dict, state: dict) -> None:
    """The files of a single-file checkpoint (what :func:`_save_single` renames into place)."""
    from safetensors.torch import save_file
    from safetensors.torch import save_model as save_module

    for name, m in models.items():  # save_model stores tensors that share memory (tied embeddings) once
        save_module(m, str(tmp / f"{name}.safetensors"))
    meta = {"state": state, "optimizers": {}, "schedulers": {}}
    for name, opt in optimizers.items():
        tensors, om = _optimizer_tensors(opt)
        save_file(tensors, str(tmp / f"optim_{name}.safetensors"))
        meta["optimizers"][name] = om
    for name, sch in schedulers.items():
        meta["schedulers"][name] = {k: v for k, v in sch.state_dict().items() if k != "lr_lambdas"}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(meta))


def checkpoint_path(directory) -> Path | None:
    """``directory/checkpoint`` (or ``checkpoint.old`` when a run was killed between the two renames),
    None when there is no complete checkpoint."""
    directory = Path(directory)
    ck = directory / "checkpoint"
    if not ck.exists() and (directory / "checkpoint.old").exists():
        ck = directory / "checkpoint.old"  # killed between the two renames
    return ck if (ck / "trainer_state.json").exists() else None


def _load_single(directory, models: dict, optimizers: dict, schedulers: dict) -> dict | None:
    """Restore what :func:`_save_single` wrote; returns the trainer state, or None without a checkpoint."""
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_module

    ck = checkpoint_path(directory)
    if ck is None:
        return None
    meta = json.loads((ck / "trainer_state.json").read_text())
    if meta.get("format") == "dcp-safetensors":
        raise ValueError(f"resume: {ck} holds FSDP shards; resume it with --distributed fsdp")
    for name, m in models.items():
        load_module(m, str(ck / f"{name}.safetensors"))
    for name, opt in optimizers.items():
        _load_optimizer(opt, load_file(str(ck / f"optim_{name}.safetensors")), meta["optimizers"][name])
    for name, sch in schedulers.items():
        sd = sch.state_dict()
        sd.update(meta["schedulers"][name])
        sch.load_state_dict(sd)
    rng = load_file(str(ck / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["state"]



def _hf_storage():
    """DCP's safetensors storage (``torch.distributed.checkpoint.hf_storage``), or a readable error."""
    try:
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError as e:
        raise ValueError(f"distributed='fsdp': sharded checkpoints need torch.distributed.checkpoint's "
                         f"HuggingFaceStorageWriter (safetensors shards), missing from torch {torch.__version__}"
                         ) from e
    return HuggingFaceStorageReader, HuggingFaceStorageWriter


def _owner(opt: torch.optim.Optimizer, models: dict) -> torch.nn.Module:
    first = opt.param_groups[0]["params"][0]
    for m in models.values():
        if any(p is first for p in m.parameters()):
            return m
    raise ValueError("checkpoint: an optimizer whose parameters belong to none of the checkpointed models")


def _flat_state(models: dict, optimizers: dict) -> tuple[dict[str, Tensor], dict]:
    """Model and optimizer state of sharded (FSDP2) models as one flat {key: (D)Tensor} dict for DCP, and
    the optimizers' non-tensor state (param groups) for JSON."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat: dict[str, Tensor] = {}
    groups = {}
    for name, m in models.items():
        for k, v in get_model_state_dict(m).items():
            flat[f"{name}/{k}"] = v
    for name, opt in optimizers.items():
        osd = get_optimizer_state_dict(_owner(opt, models), opt)
        for fqn, st in osd["state"].items():
            for k, v in st.items():
                if not isinstance(v, Tensor):
                    v = torch.tensor(v)
                flat[f"optim_{name}/{fqn}/{k}"] = v
        groups[name] = osd["param_groups"]
    return flat, groups


def _unique(flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """`flat` without the entries whose (local) tensor shares memory with an earlier one: a tied weight
    (lm_head = embed_tokens) and its optimizer state appear under two names, safetensors stores a memory
    once. DCP loads in place, so loading the first name fills the other too."""
    out, seen = {}, set()
    for k, v in flat.items():
        local = v.to_local() if hasattr(v, "to_local") else v
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape)) \
            if local.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v
    return out


def _save_rng(path: Path, d: Dist) -> None:
    from safetensors.torch import save_file

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(path / f"rng_rank{d.rank}.safetensors"))


def _load_rng(path: Path, d: Dist) -> None:
    from safetensors.torch import load_file

    f = path / f"rng_rank{d.rank}.safetensors"
    if not f.exists():
        return
    rng = load_file(str(f))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def save_checkpoint(d: Dist, directory, models: dict, optimizers: dict, schedulers: dict, state: dict) -> None:
    """``directory/checkpoint``, written to ``checkpoint.tmp`` and renamed, never pickle.

    "none": one process's files (weights, AdamW state, RNG state as safetensors, the rest JSON). "ddp": the
    same files from rank 0 (the replicas are equal), plus every rank's RNG state. "fsdp": each rank writes
    its own shards of the weights and of the AdamW state with ``torch.distributed.checkpoint`` in
    safetensors files (``HuggingFaceStorageWriter``, the offsets of each shard in the file's metadata;
    resumable on another world size), the param groups, schedulers and trainer state as JSON, and its RNG
    state."""
    if d.mode == "none":
        _save_single(directory, models, optimizers, schedulers, state)
        return
    directory = Path(directory)
    tmp = directory / "checkpoint.tmp"
    if d.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    d.barrier()
    if d.mode == "ddp":
        if d.is_main:
            _write_files(tmp, models, optimizers, schedulers, state)
    else:
        import torch.distributed.checkpoint as dcp

        _, HuggingFaceStorageWriter = _hf_storage()
        flat, groups = _flat_state(models, optimizers)
        dcp.save(_unique(flat), storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=True))
        if d.is_main:
            meta = {"state": state, "format": "dcp-safetensors", "world_size": d.world_size,
                    "param_groups": groups,
                    "schedulers": {n: {k: v for k, v in s.state_dict().items() if k != "lr_lambdas"}
                                   for n, s in schedulers.items()}}
            (tmp / "trainer_state.json").write_text(json.dumps(meta))
    _save_rng(tmp, d)
    d.barrier()
    if d.is_main:
        C._replace_dir(tmp, directory / "checkpoint")
    d.barrier()


def load_checkpoint(d: Dist, directory, models: dict, optimizers: dict, schedulers: dict) -> dict | None:
    """Restore what :func:`save_checkpoint` wrote (every rank reads); the trainer state, or None."""

    if d.mode != "fsdp":
        st = _load_single(directory, models, optimizers, schedulers)
        if st is not None and d.mode == "ddp":
            _load_rng(checkpoint_path(directory), d)
        return st
    ck = checkpoint_path(directory)
    if ck is None:
        return None
    meta = json.loads((ck / "trainer_state.json").read_text())
    if meta.get("format") != "dcp-safetensors":
        raise ValueError(f"resume: {ck} is a single-file checkpoint; resume it with --distributed none or ddp")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    HuggingFaceStorageReader, _ = _hf_storage()
    flat, _ = _flat_state(models, optimizers)
    dcp.load(_unique(flat), storage_reader=HuggingFaceStorageReader(str(ck / SHARDED_DIR)))
    for name, m in models.items():
        pre = f"{name}/"
        set_model_state_dict(m, {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)})
    for name, opt in optimizers.items():
        pre = f"optim_{name}/"
        state: dict[str, dict] = {}
        for k, v in flat.items():
            if k.startswith(pre):
                fqn, key = k[len(pre):].rsplit("/", 1)
                state.setdefault(fqn, {})[key] = v
        set_optimizer_state_dict(_owner(opt, models), opt,
                                 {"state": state, "param_groups": meta["param_groups"][name]})
    for name, sch in schedulers.items():
        sd = sch.state_dict()
        sd.update(meta["schedulers"][name])
        sch.load_state_dict(sd)
    _load_rng(ck, d)
    return meta["state"]
