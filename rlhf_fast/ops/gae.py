"""gae: generalized advantage estimation (and the value targets) for PPO, padded or packed, with holes.

Flow: public function (validates, flattens to packed form) -> custom op ``rlhf_fast::gae`` (fake impl,
no autograd: GAE is computed from detached rewards and values) -> the backend chosen by
rlhf_fast.backends: torch (reference.gae_ref), cpu (csrc/cpu/gae.cpp),
triton (rlhf_fast/kernels/gae.py). Every backend sees packed sequences: rewards, values, mask (N,) and
cu_seqlens (S+1,) int64; the padded form (B, T) is the packed form with cu_seqlens = arange(B+1) * T.

Cost model, (B, T) = (256, 2048): the Python loop trainers write (reference.gae_loop_ref) launches
~8 small kernels per time step, T * 8 = 16K launches whatever B is: ~100 ms on a CPU, ~100 ms of
launch latency on a GPU. The kernels read rewards, values and mask once and write advantages and
returns once (9 + 2b bytes a token for b-byte inputs, 4.7 MB here): on CPU each sequence walked
backward in SIMD blocks scanned inside a register (csrc/cpu/kernels/gae_kernel.h), one program
(Triton) per sequence on GPU, the recursion as a parallel scan of affine maps inside it
(rlhf_fast/gae_math.h). Whitening adds one read and one write of the advantages.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf_fast import _validation as V
from rlhf_fast.backends import op_registry
from rlhf_fast.reference import gae_ref

OP = op_registry("gae")


def check_cu_seqlens_values(cu_seqlens: Tensor, total: int) -> None:
    """cu_seqlens (S+1,) int64: starts at 0, never decreases, ends at `total` (one sync). The CPU
    kernel runs the same checks in C++ with the same messages."""
    first = int(cu_seqlens[0])
    if first != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {first}")
    if cu_seqlens.numel() > 1:
        down = cu_seqlens[1:] < cu_seqlens[:-1]
        if bool(down.any()):
            i = int(down.nonzero()[0, 0]) + 1
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i}] = "
                             f"{int(cu_seqlens[i])} < cu_seqlens[{i - 1}] = {int(cu_seqlens[i - 1])}")
    last = int(cu_seqlens[-1])
    if last != total:
        raise ValueError(f"cu_seqlens: expected the last offset to equal the number of tokens {total} "
                         f"(rewards.shape[0]), got {last}")


# ---------------------------------------------------------------------------------------------
# Backends. forward(rewards (N,), values (N,) of one float dtype, mask (N,) bool, cu_seqlens (S+1,)
# int64, all contiguous, gamma, lam, whiten) -> (advantages (N,), returns (N,)) fp32.
# ---------------------------------------------------------------------------------------------

def _torch_forward(rewards, values, mask, cu_seqlens, gamma, lam, whiten):
    check_cu_seqlens_values(cu_seqlens, rewards.shape[0])
    n_seq, total = cu_seqlens.numel() - 1, rewards.numel()
    with torch.no_grad():
        # Sequences of one length (the padded form) scan as rows: log2(T) steps instead of log2(N).
        if n_seq > 0 and total > 0 and total % n_seq == 0:
            length = total // n_seq
            steps = torch.arange(n_seq + 1, device=cu_seqlens.device, dtype=torch.int64) * length
            if torch.equal(cu_seqlens, steps):
                rows = lambda x: x.view(n_seq, length)
                adv, ret = gae_ref(rows(rewards), rows(values), rows(mask), gamma=gamma, lam=lam, whiten=whiten)
                return adv.reshape(-1), ret.reshape(-1)
        return gae_ref(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, cu_seqlens=cu_seqlens)


def _native_forward(rewards, values, mask, cu_seqlens, gamma, lam, whiten):
    if rewards.device.type != "cpu":  # the CPU entry point checks cu_seqlens itself
        check_cu_seqlens_values(cu_seqlens, rewards.shape[0])
    return torch.ops.rlhf_fast_C.gae_fwd.default(rewards, values, mask, cu_seqlens, gamma, lam, whiten)


def _triton_forward(rewards, values, mask, cu_seqlens, gamma, lam, whiten):
    from rlhf_fast.kernels import gae as K

    check_cu_seqlens_values(cu_seqlens, rewards.shape[0])
    return K.gae_fwd(rewards, values, mask, cu_seqlens, gamma, lam, whiten)


OP.register("torch", _torch_forward)
OP.register("cpu", _native_forward)
OP.register("triton", _triton_forward)


# ---------------------------------------------------------------------------------------------
# Custom op (no autograd: the public function passes detached tensors)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::gae", mutates_args=())
def _gae_op(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Tensor, gamma: float, lam: float,
            whiten: bool, backend: str) -> tuple[Tensor, Tensor]:
    return OP.impl(backend).forward(rewards, values, mask, cu_seqlens, gamma, lam, whiten)


@_gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam, whiten, backend):
    new = lambda: rewards.new_empty(rewards.shape, dtype=torch.float32)
    return new(), new()


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _check_unit_float(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return v


def _check_float_tensor(name: str, t) -> None:
    V.check_tensor(name, t)
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor (float32, bfloat16 or float16), "
                         f"got dtype {t.dtype}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None, *, gamma: float = 1.0, lam: float = 0.95,
        whiten: bool = False, cu_seqlens: Tensor | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over sequences with masked positions, and the value targets.

    Args:
        rewards: per-token rewards (KL-shaped, the score usually on the last valid token). Padded form
            ``(B, T)``; packed form ``(N,)`` together with ``cu_seqlens``. float32, bfloat16 or float16
            (float64 on the torch backend). When ``rewards`` and ``values`` differ in dtype both are
            promoted (``torch.promote_types``) before the kernel.
        values: value estimates, same shape and device as ``rewards``.
        mask: which positions take part, same shape (bool, or numbers: nonzero = valid); ``None`` =
            all valid. Masked positions -- padding, or tool/observation tokens inside a multi-turn
            response -- are skipped: their rewards and values are ignored (never read, NaN is fine)
            and the recursion carries across them.
        gamma: discount in [0, 1]. lam: GAE lambda in [0, 1].
        whiten: whiten the advantages over all valid tokens of the batch: ``(A - mean) /
            sqrt(var + 1e-8)`` with the unbiased (n - 1) variance, taken as 0 below two valid tokens
            (a single valid token whitens to 0, an all-masked batch stays 0). Returns are computed
            before whitening and are not whitened.
        cu_seqlens: ``(S+1,)`` int32/int64 offsets of the packed sequences (0, ..., N), non-decreasing;
            empty sequences are allowed.
        backend: ``"torch"``, ``"cpu"`` or ``"triton"``; default ``RLHF_FAST_BACKEND`` or
            the best available for the device (see :mod:`rlhf_fast.backends`).

    For each valid position t, with V' and A' the value and the advantage at the next VALID position
    of the same sequence (0 after its last one)::

        delta_t = r_t + gamma * V' - V_t
        A_t     = delta_t + gamma * lam * A'
        R_t     = A_t + V_t

    Returns:
        ``(advantages, returns)``, float32, shaped like ``rewards``; 0 at masked positions. Not
        differentiable: computed from detached rewards and values (GAE targets are constants of the
        PPO loss); the outputs never require grad. The caller's tensors are never written to.
    """
    _check_float_tensor("rewards", rewards)
    _check_float_tensor("values", values)
    V.check_same_device("values", values, "rewards", rewards)
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(f"rewards: expected a 2-D (B, T) tensor (or 1-D (N,) with cu_seqlens), "
                             f"got shape {tuple(rewards.shape)}")
    else:
        V.check_tensor("cu_seqlens", cu_seqlens, (torch.int32, torch.int64))
        V.check_same_device("cu_seqlens", cu_seqlens, "rewards", rewards)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens: expected a 1-D (S+1,) tensor of offsets, "
                             f"got shape {tuple(cu_seqlens.shape)}")
        if rewards.dim() != 1:
            raise ValueError(f"rewards: expected a 1-D (N,) tensor of packed sequences with cu_seqlens, "
                             f"got shape {tuple(rewards.shape)}")
    V.check_shape("values", values, rewards.shape, "rewards.shape")
    if mask is None:
        mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    V.check_tensor("mask", mask)
    V.check_same_device("mask", mask, "rewards", rewards)
    V.check_shape("mask", mask, rewards.shape, "rewards.shape")
    gamma = _check_unit_float("gamma", gamma)
    lam = _check_unit_float("lam", lam)
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten: expected a bool, got {whiten!r}")

    dtype = torch.promote_types(rewards.dtype, values.dtype)
    flat_r, flat_v = _flat(rewards, dtype), _flat(values, dtype)  # (N,)
    flat_m = _flat(mask if mask.dtype == torch.bool else mask != 0, torch.bool)
    if cu_seqlens is None:  # the padded form is the packed form with offsets [0, T, 2T, ..., B T]
        batch, steps = rewards.shape
        cu = torch.arange(batch + 1, device=rewards.device, dtype=torch.int64) * steps
    else:
        cu = cu_seqlens.to(torch.int64).contiguous()
    name = OP.select([flat_r, flat_v], backend)
    adv, ret = _gae_op(flat_r, flat_v, flat_m, cu, gamma, lam, whiten, name)
    return adv.view(rewards.shape), ret.view(rewards.shape)


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` detached as a contiguous (N,) tensor of `dtype`, without a copy or a no-op call where none is needed
    (each call into ATen costs microseconds, tens of them from cold caches)."""
    t = t.detach().reshape(-1)
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()

