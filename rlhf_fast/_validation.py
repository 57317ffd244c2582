"""Input checks shared by the public op functions. Every failure is a ValueError that names the
argument, what was expected and what was given."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64", torch.int32: "int32", torch.int64: "int64"}


def _names(dtypes) -> str:
    return ", ".join(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)


def check_tensor(name: str, t, dtypes=None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in ({_names(dtypes)}), got {t.dtype}")


def check_same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} like {ref_name}, got {t.device}")


def check_shape(name: str, t: Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def check_positive_float(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    return value


def check_label_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """labels (N,) int64 must lie in [0, vocab) or equal ignore_index (one reduction + one sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {int(labels[pos])} at flat position {pos}")
