"""gae against the Python-loop reference, for every backend that runs here (torch, cpu, and triton
under TRITON_INTERPRET=1): masks with holes, padded vs packed, whitening, degenerate batches, dtypes,
bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPES, assert_close, check_under_cpu_capability

import rlhf_fast
from rlhf_fast.reference import gae_loop_ref, gae_ref, gae_whiten_ref

# Advantages sum ~1 / (1 - gamma * lam) fp32 terms: a few ulps of their magnitude.
TOL = dict(atol=1e-4, rtol=1e-4)
# (37, 333): two 16-sequence SIMD groups of the CPU kernel, then 4 + 1 scalar lanes, and 333 % 16
# positions walked after the last whole tile.
SHAPES = [(1, 1), (3, 37), (4, 300), (2, 1030), (37, 333)]
GAMMA_LAM = [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)]


def make_batch(batch, steps, dtype=torch.float32, *, hole_frac=0.15, seed=0):
    """Rewards, values (B, T) and a mask with left padding (prompt), holes inside the response
    (tool/observation tokens), right padding, and one fully masked row when B >= 3."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=g).to(dtype)
    values = torch.randn(batch, steps, generator=g).to(dtype)
    mask = torch.rand(batch, steps, generator=g) > hole_frac
    for b in range(batch):
        first = int(torch.randint(0, max(steps // 4, 1), (1,), generator=g))
        last = steps - int(torch.randint(0, max(steps // 4, 1), (1,), generator=g))
        mask[b, :first] = False
        mask[b, last:] = False
    if batch >= 3:
        mask[1] = False
    return rewards, values, mask


def pack(rewards, values, mask):
    """Packed form of a padded batch: each row's span from its first to its last valid token (holes
    inside kept, as masked positions), with cu_seqlens; rows without a valid token become empty."""
    spans = []
    for b in range(mask.shape[0]):
        idx = mask[b].nonzero()
        spans.append((b, int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (b, 0, 0))
    cat = lambda x: torch.cat([x[b, s:e] for b, s, e in spans])
    cu = torch.tensor([0] + [e - s for _, s, e in spans]).cumsum(0)
    return cat(rewards), cat(values), cat(mask), cu, spans


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_matches_loop_reference(backend, dtype, shape, whiten):
    if backend == "triton" and shape[0] * shape[1] > 1200 and dtype != torch.float32:
        pytest.skip("interpreter time: the large shapes run in float32 only")
    rewards, values, mask = make_batch(*shape, dtype)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=whiten, backend=backend)
    adv_r, ret_r = gae_loop_ref(rewards, values, mask, gamma=0.99, lam=0.95, whiten=whiten)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == shape
    assert_close(adv, adv_r, "advantages", **TOL)
    assert_close(ret, ret_r, "returns", **TOL)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gamma, lam", GAMMA_LAM)
def test_gamma_lam(backend, gamma, lam):
    rewards, values, mask = make_batch(3, 130, hole_frac=0.3, seed=1)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    adv_r, ret_r = gae_loop_ref(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close(adv, adv_r, "advantages", **TOL)
    assert_close(ret, ret_r, "returns", **TOL)


def test_holes_carry_the_recursion():
    """A hole in the middle is skipped: the advantage before it bootstraps from the value and the
    advantage AFTER it, exactly as if the hole were not there."""
    r = torch.tensor([[1.0, 5.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, 9.0, 0.25, 0.125]])
    m = torch.tensor([[True, False, True, True]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae_loop_ref(r, v, m, gamma=gamma, lam=lam)
    a3 = 3.0 - 0.125
    a2 = 2.0 + gamma * 0.125 - 0.25 + gamma * lam * a3
    a0 = 1.0 + gamma * 0.25 - 0.5 + gamma * lam * a2
    expected = torch.tensor([[a0, 0.0, a2, a3]])
    assert_close(adv, expected, "advantages", atol=1e-6, rtol=1e-6)
    dense, _ = gae_loop_ref(r[:, [0, 2, 3]], v[:, [0, 2, 3]], m[:, [0, 2, 3]], gamma=gamma, lam=lam)
    assert_close(adv[:, [0, 2, 3]], dense, "advantages without the hole", atol=1e-6, rtol=1e-6)
    for backend in CPU_BACKENDS:
        got, got_ret = rlhf_fast.gae(r, v, m, gamma=gamma, lam=lam, backend=backend)
        assert_close(got, expected, f"advantages ({backend})", atol=1e-6, rtol=1e-6)
        assert_close(got_ret, ret, f"returns ({backend})", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_padded_equals_packed(backend, whiten):
    rewards, values, mask = make_batch(5, 150, hole_frac=0.2, seed=2)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=whiten, backend=backend)
    pr, pv, pm, cu, spans = pack(rewards, values, mask)
    for cu_dtype in (torch.int64, torch.int32):
        padv, pret = rlhf_fast.gae(pr, pv, pm, gamma=0.99, lam=0.95, whiten=whiten, cu_seqlens=cu.to(cu_dtype),
                                   backend=backend)
        assert padv.shape == pr.shape
        assert_close(padv, torch.cat([adv[b, s:e] for b, s, e in spans]), "packed advantages", **TOL)
        assert_close(pret, torch.cat([ret[b, s:e] for b, s, e in spans]), "packed returns", **TOL)
    ref_adv, ref_ret = gae_loop_ref(pr, pv, pm, gamma=0.99, lam=0.95, whiten=whiten, cu_seqlens=cu)
    assert_close(padv, ref_adv, "packed advantages vs loop reference", **TOL)
    assert_close(pret, ref_ret, "packed returns vs loop reference", **TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_variable_lengths(backend):
    """Empty sequences, length 1, lengths around the kernels' block sizes, and 20 sequences of one
    length (a SIMD group of the CPU kernel, in packed form)."""
    lengths = [0, 1, 31, 32, 33, 0, 127, 128, 129, 257, 1025, 0] + [45] * 20 + [3]
    cu = torch.tensor([0] + lengths).cumsum(0)
    n = int(cu[-1])
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m = torch.rand(n, generator=g) > 0.25
    for whiten in (False, True):
        adv, ret = rlhf_fast.gae(r, v, m, gamma=0.97, lam=0.9, whiten=whiten, cu_seqlens=cu, backend=backend)
        adv_r, ret_r = gae_loop_ref(r, v, m, gamma=0.97, lam=0.9, whiten=whiten, cu_seqlens=cu)
        assert_close(adv, adv_r, "advantages", **TOL)
        assert_close(ret, ret_r, "returns", **TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_lengths_and_sparse_masks(backend, dtype):
    """61 packed sequences of lengths 0..70 (offsets at every alignment), each with its own fraction
    of valid positions from ~0 to ~1 (long masked runs the carry must cross), NaN / inf at every
    masked position. The CPU kernel walks them four at a time, longest first, in blocks aligned to the
    outputs with padded blocks at both ends of a sequence."""
    g = torch.Generator().manual_seed(13)
    lengths = torch.randint(0, 71, (61,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(cu[-1])
    density = torch.rand(61, generator=g).repeat_interleave(lengths)
    m = torch.rand(n, generator=g) < density
    r, v = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    dirty_r, dirty_v = r.clone(), v.clone()
    dirty_r[~m], dirty_v[~m] = float("nan"), float("inf")
    for whiten in (False, True):
        adv, ret = rlhf_fast.gae(dirty_r, dirty_v, m, gamma=0.99, lam=0.95, whiten=whiten, cu_seqlens=cu,
                                 backend=backend)
        adv_r, ret_r = gae_loop_ref(r, v, m, gamma=0.99, lam=0.95, whiten=whiten, cu_seqlens=cu)
        assert_close(adv, adv_r, "advantages", **TOL)
        assert_close(ret, ret_r, "returns", **TOL)
        assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_batches(backend):
    """Padded (96, 4100) and its packed form: more than 2^18 positions, from where the CPU kernel
    shares the walk with a helper thread and writes its outputs with streaming stores (both outputs
    raw, the returns only when whitening); rows end off the kernel's block boundaries."""
    if backend == "triton":
        pytest.skip("the Triton interpreter scans element by element in Python: minutes at 260K tokens")
    rewards, values, mask = make_batch(96, 4100, hole_frac=0.1, seed=14)
    pr, pv, pm, cu, _ = pack(rewards, values, mask)
    assert rewards.numel() >= 2**18 and pr.numel() >= 2**18
    for whiten in (False, True):
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=whiten, backend=backend)
        adv_r, ret_r = gae_loop_ref(rewards, values, mask, gamma=0.99, lam=0.95, whiten=whiten)
        assert_close(adv, adv_r, "advantages", **TOL)
        assert_close(ret, ret_r, "returns", **TOL)
        padv, pret = rlhf_fast.gae(pr, pv, pm, gamma=0.99, lam=0.95, whiten=whiten, cu_seqlens=cu, backend=backend)
        padv_r, pret_r = gae_loop_ref(pr, pv, pm, gamma=0.99, lam=0.95, whiten=whiten, cu_seqlens=cu)
        assert_close(padv, padv_r, "packed advantages", **TOL)
        assert_close(pret, pret_r, "packed returns", **TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_whitening_statistics(backend):
    rewards, values, mask = make_batch(4, 200, seed=4)
    adv, _ = rlhf_fast.gae(rewards, values, mask, whiten=True, backend=backend)
    valid = adv[mask].double()
    assert abs(valid.mean().item()) < 1e-5
    assert abs(valid.std(unbiased=True).item() - 1.0) < 1e-4
    raw, _ = rlhf_fast.gae(rewards, values, mask, whiten=False, backend=backend)
    assert_close(adv, gae_whiten_ref(raw, mask), "whitened advantages", **TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_degenerate_batches(backend):
    """Fully masked rows and batches, one valid token, empty shapes: defined values, never NaN."""
    r, v = torch.randn(3, 20), torch.randn(3, 20)
    none = torch.zeros(3, 20, dtype=torch.bool)
    for whiten in (False, True):
        adv, ret = rlhf_fast.gae(r, v, none, whiten=whiten, backend=backend)
        assert (adv == 0).all() and (ret == 0).all()
    one = none.clone()
    one[2, 7] = True
    adv, ret = rlhf_fast.gae(r, v, one, whiten=True, backend=backend)
    assert (adv == 0).all(), "a single valid token whitens to 0 (variance taken as 0)"
    assert torch.isclose(ret[2, 7], r[2, 7], atol=1e-6) and (ret[~one] == 0).all()  # R = (r - V) + V
    adv, _ = rlhf_fast.gae(r, v, one, whiten=False, backend=backend)
    assert torch.isclose(adv[2, 7], r[2, 7] - v[2, 7], atol=1e-6)
    for shape in ((0, 5), (3, 0)):
        adv, ret = rlhf_fast.gae(torch.randn(shape), torch.randn(shape), torch.ones(shape, dtype=torch.bool),
                                 whiten=True, backend=backend)
        assert adv.shape == ret.shape == shape
    adv, ret = rlhf_fast.gae(torch.randn(0), torch.randn(0), torch.ones(0, dtype=torch.bool),
                             cu_seqlens=torch.zeros(1, dtype=torch.int64), backend=backend)
    assert adv.shape == (0,)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_positions_are_never_read(backend):
    rewards, values, mask = make_batch(3, 64, seed=5)
    dirty_r, dirty_v = rewards.clone(), values.clone()
    dirty_r[~mask] = float("nan")
    dirty_v[~mask] = float("inf")
    for whiten in (False, True):
        adv, ret = rlhf_fast.gae(dirty_r, dirty_v, mask, whiten=whiten, backend=backend)
        clean_adv, clean_ret = rlhf_fast.gae(rewards, values, mask, whiten=whiten, backend=backend)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        assert_close(adv, clean_adv, "advantages", **TOL)
        assert_close(ret, clean_ret, "returns", **TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_values(backend, dtype):
    rewards, values, mask = make_batch(3, 50, seed=6)
    rewards = (rewards.sign() * 1e4).to(dtype)
    values = (values * 1e3).to(dtype)
    for whiten in (False, True):
        adv, ret = rlhf_fast.gae(rewards, values, mask, whiten=whiten, backend=backend)
        adv_r, ret_r = gae_loop_ref(rewards, values, mask, whiten=whiten)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        assert_close(adv, adv_r, "advantages", atol=1e-4 * (1.0 if whiten else 1e4), rtol=1e-4)
        assert_close(ret, ret_r, "returns", atol=1.0, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_sequence(backend):
    """One sequence of 70,000 tokens (int64 offsets, many kernel blocks), packed and padded."""
    if backend == "triton":
        pytest.skip("the Triton interpreter scans element by element in Python: minutes at 70K tokens")
    n = 70_000
    g = torch.Generator().manual_seed(7)
    r, v = torch.randn(1, n, generator=g) * 0.1, torch.randn(1, n, generator=g)
    m = torch.rand(1, n, generator=g) > 0.1
    adv, ret = rlhf_fast.gae(r, v, m, gamma=0.999, lam=0.95, whiten=True, backend=backend)
    adv_r, ret_r = gae_loop_ref(r, v, m, gamma=0.999, lam=0.95, whiten=True)
    assert_close(adv, adv_r, "advantages", **TOL)
    assert_close(ret, ret_r, "returns", **TOL)
    padv, _ = rlhf_fast.gae(r[0], v[0], m[0], gamma=0.999, lam=0.95, whiten=True,
                            cu_seqlens=torch.tensor([0, n]), backend=backend)
    assert_close(padv, adv[0], "packed advantages", **TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_and_mask_types(backend):
    rewards, values, mask = make_batch(3, 40, seed=8)
    base_adv, base_ret = rlhf_fast.gae(rewards, values.bfloat16().float(), mask, backend=backend)
    adv, ret = rlhf_fast.gae(rewards, values.bfloat16(), mask, backend=backend)  # promoted to float32
    assert_close(adv, base_adv, "advantages", **TOL)
    for m in (mask.float(), mask.long(), mask.to(torch.uint8)):
        adv, ret = rlhf_fast.gae(rewards, values.bfloat16(), m, backend=backend)
        assert_close(adv, base_adv, "advantages", **TOL)
        assert_close(ret, base_ret, "returns", **TOL)
    all_adv, _ = rlhf_fast.gae(rewards, values, None, backend=backend)
    ones_adv, _ = rlhf_fast.gae(rewards, values, torch.ones_like(mask), backend=backend)
    assert torch.equal(all_adv, ones_adv)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_not_differentiable_and_inputs_untouched(backend):
    rewards, values, mask = make_batch(2, 30, seed=9)
    r = rewards.clone().requires_grad_(True)
    v = values.clone().requires_grad_(True)
    before = (rewards.clone(), values.clone(), mask.clone())
    adv, ret = rlhf_fast.gae(r, v, mask, whiten=True, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.equal(r.detach(), before[0]) and torch.equal(v.detach(), before[1]) and torch.equal(mask, before[2])


def test_vectorized_reference_matches_loop():
    """The torch backend's doubling scan (gae_ref) against the loop, float64, packed and padded."""
    rewards, values, mask = make_batch(6, 333, torch.float64, hole_frac=0.4, seed=10)
    for whiten in (False, True):
        a, r = gae_ref(rewards, values, mask, gamma=0.98, lam=0.93, whiten=whiten)
        a_l, r_l = gae_loop_ref(rewards, values, mask, gamma=0.98, lam=0.93, whiten=whiten)
        assert_close(a, a_l, "advantages", atol=1e-6, rtol=1e-6)
        assert_close(r, r_l, "returns", atol=1e-6, rtol=1e-6)
        pr, pv, pm, cu, _ = pack(rewards, values, mask)
        a, r = gae_ref(pr, pv, pm, gamma=0.98, lam=0.93, whiten=whiten, cu_seqlens=cu)
        a_l, r_l = gae_loop_ref(pr, pv, pm, gamma=0.98, lam=0.93, whiten=whiten, cu_seqlens=cu)
        assert_close(a, a_l, "packed advantages", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_inputs_that_start_inside_their_storage(backend, whiten):
    """Contiguous views at a storage offset (a slice of a larger batch), padded and packed."""
    rewards, values, mask = (t[1:] for t in make_batch(6, 301, seed=13))
    assert rewards.is_contiguous() and rewards.storage_offset() > 0
    pr, pv, pm, cu, _ = pack(rewards, values, mask)
    offset = lambda x: torch.cat([x[:5], x])[5:]  # the same values, 5 elements into a storage
    packed = (offset(pr), offset(pv), offset(pm))
    assert packed[0].storage_offset() == 5
    for args, kw in (((rewards, values, mask), {}), (packed, dict(cu_seqlens=offset(cu)))):
        adv, ret = rlhf_fast.gae(*args, gamma=0.99, lam=0.95, whiten=whiten, backend=backend, **kw)
        adv_r, ret_r = gae_loop_ref(*args, gamma=0.99, lam=0.95, whiten=whiten, **kw)
        assert adv.shape == args[0].shape and adv.is_contiguous() and not adv.requires_grad
        assert_close(adv, adv_r, "advantages", **TOL)
        assert_close(ret, ret_r, "returns", **TOL)


def test_float64_runs_on_torch():
    rewards, values, mask = make_batch(2, 20, torch.float64)
    assert rlhf_fast.select_backend("gae", rewards.reshape(-1), values.reshape(-1)) == "torch"
    adv, _ = rlhf_fast.gae(rewards, values, mask)
    assert adv.dtype == torch.float32


R, V, M = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
P1 = torch.randn(7)
P_MASK = torch.ones(7, dtype=torch.bool)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((R.long(), V, M), {}, "rewards: expected a floating-point tensor"),
        (([[1.0]], V, M), {}, "rewards: expected a torch.Tensor"),
        ((R[None], V[None], M[None]), {}, r"rewards: expected a 2-D \(B, T\) tensor"),
        ((R, V.int(), M), {}, "values: expected a floating-point tensor"),
        ((R, V[:, :4], M), {}, r"values: expected shape \(2, 5\)"),
        ((R, V, M[:1]), {}, r"mask: expected shape \(2, 5\)"),
        ((R, V, M.to("meta")), {}, "mask: expected a tensor on cpu"),
        ((R, V.to("meta"), M), {}, "values: expected a tensor on cpu"),
        ((R, V, M), dict(gamma=1.5), r"gamma: expected a number in \[0, 1\]"),
        ((R, V, M), dict(lam=float("nan")), r"lam: expected a number in \[0, 1\]"),
        ((R, V, M), dict(lam="x"), r"lam: expected a number in \[0, 1\]"),
        ((R, V, M), dict(whiten=1), "whiten: expected a bool"),
        ((R, V, M), dict(cu_seqlens=torch.tensor([0, 10])), r"rewards: expected a 1-D \(N,\) tensor of packed"),
        ((P1, P1, P_MASK), {}, r"rewards: expected a 2-D \(B, T\) tensor \(or 1-D"),
        ((P1, P1, P_MASK), dict(cu_seqlens=torch.tensor([0.0, 7.0])), "cu_seqlens: expected dtype in"),
        ((P1, P1, P_MASK), dict(cu_seqlens=torch.tensor([[0, 7]])), r"cu_seqlens: expected a 1-D \(S\+1,\)"),
        ((P1, P1, P_MASK), dict(cu_seqlens=torch.zeros(0, dtype=torch.long)), r"cu_seqlens: expected a 1-D"),
        ((P1, P1, P_MASK), dict(cu_seqlens=torch.tensor([0, 7], device="meta")), "cu_seqlens: expected a tensor on"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rlhf_fast.gae(*args, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "cu, match",
    [
        ([1, 3, 7], r"cu_seqlens: expected cu_seqlens\[0\] == 0, got 1"),
        ([0, 5, 3, 7], r"cu_seqlens: expected non-decreasing offsets, got cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 5"),
        ([0, 3, 6], r"cu_seqlens: expected the last offset to equal the number of tokens 7 .*got 6"),
        ([0, 3, 9], r"cu_seqlens: expected the last offset to equal the number of tokens 7 .*got 9"),
    ],
)
def test_bad_cu_seqlens_values(backend, cu, match):
    with pytest.raises(ValueError, match=match):
        rlhf_fast.gae(P1, P1, P_MASK, cu_seqlens=torch.tensor(cu), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    rewards, values, mask = make_batch(3, 40, seed=11)
    flat = lambda x: x.reshape(-1).contiguous()
    cu = torch.arange(4) * 40
    for whiten in (False, True):
        torch.library.opcheck(torch.ops.rlhf_fast.gae.default,
                              (flat(rewards), flat(values), flat(mask), cu, 0.99, 0.95, whiten, backend))
    pr, pv, pm, pcu, _ = pack(rewards, values, mask)
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, (pr, pv, pm, pcu, 1.0, 0.9, True, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    rewards, values, mask = make_batch(3, 50, seed=12)

    def advantage_loss(r, v, m, cu=None):
        adv, ret = rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95, whiten=True, cu_seqlens=cu, backend=backend)
        return (adv * 2).sum() + ret.square().sum()

    compiled = torch.compile(advantage_loss, fullgraph=True, backend="inductor")
    assert_close(compiled(rewards, values, mask), advantage_loss(rewards, values, mask), "padded", **TOL)
    pr, pv, pm, cu, _ = pack(rewards, values, mask)
    assert_close(compiled(pr, pv, pm, cu), advantage_loss(pr, pv, pm, cu), "packed", **TOL)


CAPABILITY_CHECK = r"""
import torch, rlhf_fast
from rlhf_fast.reference import gae_loop_ref
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for batch, steps in ((1, 1), (5, 37), (9, 700), (37, 333)):
        r = torch.randn(batch, steps).to(dtype)
        v = torch.randn(batch, steps).to(dtype)
        m = torch.rand(batch, steps) > 0.2
        m[0, : steps // 2] = False
        for whiten in (False, True):
            a, ret = rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95, whiten=whiten, backend="cpu")
            ar, rr = gae_loop_ref(r, v, m, gamma=0.99, lam=0.95, whiten=whiten)
            assert torch.allclose(a, ar, atol=1e-4, rtol=1e-4), (dtype, batch, steps, whiten)
            assert torch.allclose(ret, rr, atol=1e-4, rtol=1e-4), (dtype, batch, steps, whiten)
# packed sequences of lengths 0..70, sparse masks; then more than 2^18 positions (streaming stores)
lengths = torch.randint(0, 71, (29,))
cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
r, v = torch.randn(int(cu[-1])), torch.randn(int(cu[-1]))
m = torch.rand(int(cu[-1])) < 0.3
big = (torch.randn(64, 4100), torch.randn(64, 4100), torch.rand(64, 4100) > 0.2)
for args, kw in (((r, v, m), dict(cu_seqlens=cu)), (big, {})):
    for whiten in (False, True):
        a, ret = rlhf_fast.gae(*args, gamma=0.99, lam=0.95, whiten=whiten, backend="cpu", **kw)
        ar, rr = gae_loop_ref(*args, gamma=0.99, lam=0.95, whiten=whiten, **kw)
        assert torch.allclose(a, ar, atol=1e-4, rtol=1e-4), (a.shape, whiten)
        assert torch.allclose(ret, rr, atol=1e-4, rtol=1e-4), (a.shape, whiten)
print("ok")
"""


@pytest.mark.skipif(not rlhf_fast.has_native(), reason="native extension not built")
@pytest.mark.parametrize("cap", ["AVX2", "DEFAULT"])
def test_other_simd_builds(cap):
    """The AVX2 and scalar-fallback builds of the CPU kernel (selected like ATen's own kernels)."""
    check_under_cpu_capability(cap, CAPABILITY_CHECK)
