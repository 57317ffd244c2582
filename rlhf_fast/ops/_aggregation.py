"""Loss aggregation shared by ppo_policy_loss and value_loss: how per-token losses ``l`` (B, T) and a
mask ``m`` (B, T) become one scalar. Written once here; the references use :func:`aggregate`, the
kernels implement :func:`row_weights` (see csrc/include/rlhf_fast/ppo_losses_math.h).

Every mode is a weighted sum with one weight per sequence,

    loss = sum_b w_b * sum_t l_bt * m_bt

and positions with m == 0 never contribute, whatever the values stored there (padding, -inf, NaN).
With n_b = sum_t m_bt (the valid tokens of sequence b), T = mask.shape[-1] and B = mask.shape[0]:

  ==========================  =========================================  ==================================
  aggregation                 loss                                       w_b
  ==========================  =========================================  ==================================
  "token-mean"                sum_bt l*m / sum_bt m                      1 / D,  D = sum_b n_b
  "seq-mean-token-mean"       mean over the sequences with n_b > 0 of    1 / (S * n_b) if n_b > 0 else 0,
                              (sum_t l*m / n_b)                          S = #{b : n_b > 0}
  "seq-mean-token-sum"        mean over all B sequences of sum_t l*m     1 / S,  S = B
  "seq-mean-token-sum-norm"   sum_bt l*m / (B * L)                       1 / (S * L),  S = B,  L = T
                              (L = norm_length if given, else T)
  ==========================  =========================================  ==================================

``num_items`` (an int, or a 0-dim tensor on the inputs' device, read without a host sync) replaces
the final divisor by the same quantity counted over the whole batch: D for "token-mean" (valid
tokens), S for "seq-mean-token-mean" (sequences with a valid token), and S = B for the two
token-sum modes (sequences). The per-sequence division of "seq-mean-token-mean" (by n_b) stays
local. The loss of a micro-batch is then exactly its share of the loss of the whole batch: the sum
of the micro-batch losses (gradient accumulation, or the ranks of a data-parallel job) is the loss
of the whole batch, with its gradient. (DDP averages gradients over ranks: multiply the loss by the
world size, or pass num_items / world_size.) A divisor that is 0 (an empty or fully masked batch,
or num_items == 0) gives loss 0 and a zero gradient, never NaN.

Sequences with no valid token count in B for "seq-mean-token-sum" and its -norm variant (they add 0
to the sum), but not in S for "seq-mean-token-mean", where their mean would be 0 / 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# Codes passed to the kernels (ppo::Aggregation in ppo_losses_math.h, AGG_* in rlhf_fast/kernels/ppo_losses.py).
AGG_CODES = {name: code for code, name in enumerate(AGGREGATIONS)}
NUM_ITEMS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# accepted as masks and taken as the float weights they stand for
INT_MASK_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_loss_inputs(name: str, x: Tensor, others: dict[str, Tensor], mask: Tensor) -> Tensor:
    """The (B, T) inputs of ppo_policy_loss / value_loss: `x` (named `name`) a 2-D float tensor, each
    of `others` float and shaped and placed like it, `mask` bool, float or integer, likewise.
    Returns the mask the kernels take: an integer mask (e.g. an int64 attention mask) as the float32
    weights it stands for, bool and float masks as they are."""
    from rlhf_fast import _validation as V

    V.check_tensor(name, x, FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (B, T) tensor, got shape {tuple(x.shape)}")
    for other, t in (*others.items(), ("mask", mask)):
        V.check_tensor(other, t, MASK_DTYPES + INT_MASK_DTYPES if other == "mask" else FLOAT_DTYPES)
        V.check_same_device(other, t, name, x)
        V.check_shape(other, t, x.shape, f"{name}.shape")
    return mask.float() if mask.dtype in INT_MASK_DTYPES else mask


def check_aggregation(aggregation) -> int:
    """The kernel code of `aggregation`; ValueError naming the argument if unknown."""
    code = AGG_CODES.get(aggregation) if isinstance(aggregation, str) else None
    if code is None:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    return code


def check_num_items(num_items, like: Tensor) -> tuple[Tensor | None, int]:
    """Splits num_items into the op arguments (tensor or None, int or -1 for "not given")."""
    if num_items is None:
        return None, -1
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.dim() > 1:
            raise ValueError(f"num_items: expected an int or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(num_items.shape)}")
        if num_items.dtype not in NUM_ITEMS_DTYPES:
            raise ValueError(f"num_items: expected a real or integer dtype, got {num_items.dtype}")
        if num_items.device != like.device:
            raise ValueError(f"num_items: expected a tensor on {like.device} like the inputs (it is read "
                             f"without a host sync), got {num_items.device}")
        return num_items.reshape(()), -1
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise ValueError(f"num_items: expected an int >= 0 or a 0-dim tensor, got {num_items!r}")
    return None, num_items


def check_norm_length(norm_length) -> int:
    """-1 for "not given" (use T), else the positive int."""
    if norm_length is None:
        return -1
    if isinstance(norm_length, bool) or not isinstance(norm_length, int) or norm_length <= 0:
        raise ValueError(f"norm_length: expected an int > 0 or None, got {norm_length!r}")
    return norm_length


def check_dual_clip(dual_clip) -> float:
    try:
        c = float(dual_clip)
    except (TypeError, ValueError):
        raise ValueError(f"dual_clip: expected a finite number > 1 or None, got {dual_clip!r}") from None
    if not (math.isfinite(c) and c > 1):
        raise ValueError(f"dual_clip: expected a finite number > 1 or None, got {dual_clip!r}")
    return c


def _inverse(d: Tensor) -> Tensor:
    """1 / d, and 0 where d == 0 (an empty or fully masked divisor)."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def row_weights(mask: Tensor, aggregation: str, num_items=None, norm_length: int | None = None) -> Tensor:
    """Per-sequence weights w (B,) fp32 with loss = sum_b w_b * sum_t l_bt * m_bt (module docstring).

    mask (B, T) bool or float (values are weights >= 0; m != 0 marks a valid token); num_items None,
    an int, or a 0-dim tensor on mask's device. Never differentiable (mask and num_items are data).
    """
    m = mask.detach().float()
    n_rows, length = m.shape
    tokens = m.sum(-1)                                                   # n_b (B,)
    given = None if num_items is None else torch.as_tensor(num_items, dtype=torch.float32, device=m.device)
    if aggregation == "token-mean":
        d = tokens.sum() if given is None else given
        return _inverse(d).expand(n_rows).clone()
    if aggregation == "seq-mean-token-mean":
        s = (tokens > 0).sum().float() if given is None else given
        return _inverse(s * tokens)                                       # 0 for rows with n_b == 0
    if aggregation == "seq-mean-token-sum":
        s = torch.tensor(float(n_rows), device=m.device) if given is None else given
        return _inverse(s).expand(n_rows).clone()
    if aggregation == "seq-mean-token-sum-norm":
        s = torch.tensor(float(n_rows), device=m.device) if given is None else given
        norm = float(length if norm_length is None else norm_length)
        return _inverse(s * norm).expand(n_rows).clone()
    raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")


def aggregate(loss: Tensor, mask: Tensor, aggregation: str, num_items=None, norm_length: int | None = None
              ) -> Tensor:
    """The scalar loss (fp32) of per-token losses `loss` (B, T) under `mask` (module docstring).

    Differentiable in `loss`. Positions with mask == 0 contribute nothing, also when `loss` holds
    inf or NaN there (they are selected away, not multiplied by 0).
    """
    m = mask.detach().float()
    masked = torch.where(m != 0, loss.float() * m, torch.zeros_like(m))  # (B, T)
    return (masked.sum(-1) * row_weights(mask, aggregation, num_items, norm_length)).sum()


# ---------------------------------------------------------------------------------------------
# Pieces shared by the custom ops of ppo_policy_loss and value_loss. Their forward returns
# (loss (), stats (K,), token_grad (B, T) fp32 = m * dl/dx or (0,), row_scale (B,) = w_b); their
# backward is the same for both losses: grad_x = token_grad * (grad_loss * w_b), in x's dtype.
# ---------------------------------------------------------------------------------------------

def fake_outputs(like: Tensor, n_stats: int, need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Outputs of a loss op's fake (meta) implementation for (B, T) input `like`."""
    new = lambda *size: like.new_empty(size, dtype=torch.float32)
    rows, cols = like.shape
    return new(), new(n_stats), new(rows, cols) if need_grad else new(0), new(rows)


def scale_token_grad(grad_loss: Tensor, token_grad: Tensor, row_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The backward of both losses: token_grad (B, T) * (grad_loss () * row_scale (B,))[:, None], in `dtype`.

    Plain PyTorch on every backend: the gradient was computed by the forward pass, so what is left is
    one broadcast multiply (a kernel of our own would save nothing in eager mode and would hide it from
    inductor's fusion under torch.compile). grad_loss is a tensor: skipping the multiply when it is 1
    would need a host sync, so it is always done.
    """
    if token_grad.dim() != 2 or token_grad.shape[0] != row_scale.shape[0]:
        raise RuntimeError("token_grad: no (B, T) per-token gradient was saved (the forward ran with "
                           f"need_grad=False), got shape {tuple(token_grad.shape)}")
    return (token_grad * (grad_loss.float() * row_scale).unsqueeze(-1)).to(dtype)


def register_loss_autograd(op) -> None:
    """Autograd of a loss op with the (loss, stats, token_grad, row_scale) outputs above and
    (x, <6 non-differentiable inputs>) arguments: grad_x = scale_token_grad(...), nothing else."""

    def setup_context(ctx, inputs, output):
        _, stats, token_grad, row_scale = output
        ctx.mark_non_differentiable(stats, token_grad, row_scale)
        ctx.save_for_backward(token_grad, row_scale)
        ctx.dtype = inputs[0].dtype

    def backward(ctx, grad_loss, _grad_stats, _grad_token_grad, _grad_row_scale):
        token_grad, row_scale = ctx.saved_tensors
        grad_x = None if grad_loss is None else scale_token_grad(grad_loss, token_grad, row_scale, ctx.dtype)
        return grad_x, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
