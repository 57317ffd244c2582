"""Pieces shared by the tests of the per-token losses (ppo_policy_loss, value_loss): masked inputs with
garbage under the mask, running the op and its reference, comparing the two, and the split-batch
equivalence of num_items."""

from __future__ import annotations

import itertools

import torch
from helpers import GRAD_TOL, OUT_TOL, assert_close

# The loss is a sum of O(1) terms times 1 / (number of tokens): fp32 rounding of that sum.
LOSS_TOL = dict(atol=1e-6, rtol=2e-5)


def masked_inputs(tensors, garbage, *, masked_rows=(1,), mask_kind="bool", seed_garbage=True):
    """`tensors` (B, T) followed by a mask that keeps ~75% of the positions and none of `masked_rows`;
    with `seed_garbage` (and T > 3) each tensor holds its `garbage` value (inf, -inf or NaN) wherever
    the mask is 0, which must never matter. mask_kind "float": the mask as 0/1 float32."""
    shape = tensors[0].shape
    keep = torch.rand(shape) < 0.75
    for r in masked_rows:
        if r < shape[0]:
            keep[r] = False
    if seed_garbage and shape[1] > 3:
        for t, value in zip(tensors, garbage, strict=True):
            t[~keep] = value
    return (*tensors, keep if mask_kind == "bool" else keep.to(torch.float32))


def run_op_and_ref(op, ref, stat_names, inputs, grad_scale, **kw):
    """((loss, stats, grad), the same of the reference): `op` and `ref` on (x, *rest) = inputs, the
    gradient of grad_scale * loss with respect to x."""
    x0, *rest = inputs
    out = []
    for fn in (op, ref):
        x = x0.detach().clone().requires_grad_(True)
        loss, stats = fn(x, *rest, **kw)
        (g,) = torch.autograd.grad(loss * grad_scale, x)
        out.append((loss.detach(), torch.stack([stats[k] for k in stat_names]), g))
    return out


def check_loss_result(result, dtype, stat_names, what="", stats_tol=OUT_TOL):
    """A run_op_and_ref result: fp32 scalar loss and stats as the reference, a NaN-free gradient in the
    input dtype within one rounding of it (relative to the largest gradient)."""
    (loss, stats, g), (loss_r, stats_r, g_r) = result
    assert loss.dtype == torch.float32 and loss.shape == () and stats.dtype == torch.float32
    assert_close(loss, loss_r, f"loss{what}", **LOSS_TOL)
    for name, s, s_r in zip(stat_names, stats, stats_r, strict=True):
        assert_close(s, s_r, f"{name}{what}", **stats_tol)
    assert g.dtype == dtype and not g.isnan().any(), f"grad{what}: dtype {g.dtype} or NaN"
    scale = g_r.float().abs().max().item() + 1e-30
    tol = GRAD_TOL[dtype]
    assert_close(g, g_r, f"grad{what}", atol=max(tol["atol"], 1e-6 * scale), rtol=tol["rtol"])


def check_split_batch(loss_fn, inputs, aggregation):
    """Micro-batches (uneven; rows 4-5 of the 9 fully masked) with num_items = the global count sum to the
    full-batch loss, with the full-batch gradient (gradient accumulation / data parallelism). loss_fn(x,
    *rest, mask, aggregation=, num_items=) -> (loss, stats)."""
    x0, *rest, mask = inputs
    x = x0.clone().requires_grad_(True)
    full, _ = loss_fn(x, *rest, mask, aggregation=aggregation)
    full.backward()
    if aggregation == "token-mean":
        count = mask.sum()                       # valid tokens
    elif aggregation == "seq-mean-token-mean":
        count = (mask.sum(-1) > 0).sum()         # sequences with a valid token
    else:
        count = torch.tensor(mask.shape[0])      # sequences
    y = x0.clone().requires_grad_(True)
    total = 0
    for i, rows in enumerate((slice(0, 4), slice(4, 6), slice(6, 9))):
        items = count if i % 2 == 0 else int(count)  # a 0-dim tensor or an int
        part, _ = loss_fn(y[rows], *(t[rows] for t in rest), mask[rows], aggregation=aggregation, num_items=items)
        part.backward()
        total = total + part.detach()
    assert_close(total, full, "summed micro-batch losses", atol=1e-6, rtol=1e-5)
    assert_close(y.grad, x.grad, "accumulated gradient", atol=1e-8, rtol=1e-5)


def check_empty_inputs(loss_fn):
    """(0, T) and (B, 0) inputs, bool and float masks: loss 0 and every statistic 0 (no NaN), a gradient
    of the input's shape. loss_fn(x, a, b, mask) -> (loss, stats)."""
    for shape, mask_dtype in itertools.product([(0, 5), (3, 0)], [torch.bool, torch.float32]):
        x = torch.randn(shape, requires_grad=True)
        loss, stats = loss_fn(x, torch.randn(shape), torch.randn(shape), torch.ones(shape, dtype=mask_dtype))
        loss.backward()
        assert loss.item() == 0.0 and all(s.item() == 0.0 for s in stats.values()) and x.grad.shape == shape
