"""The native CPU kernels' large-buffer cache (csrc/cpu/hugepage_alloc.cpp). Off by default; opted in
with rlhf_fast.set_cpu_buffer_cache(mb) or RLHF_FAST_CPU_BUFFER_CACHE_MB, outputs >= 2 MB come from a
cache of released buffers (at most `mb` MB idle), so a loop calling the same op reuses faulted-in
memory; rlhf_fast.release_cpu_buffers() empties it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rlhf_fast

pytestmark = pytest.mark.skipif(not rlhf_fast.has_native(), reason="needs the native extension")

N = 1 << 19  # 2 MB of fp32 per output: the smallest size the cache serves


def _gae_outputs(n=N):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(2, n // 2, generator=g), torch.randn(2, n // 2, generator=g)
    return rlhf_fast.gae(rewards, values, torch.ones(2, n // 2, dtype=torch.bool), backend="cpu")


@pytest.fixture
def cache_mb():
    """Turns the cache on for one test (with the bound the test passes) and off again after it."""
    previous = []

    def turn_on(mb):
        previous.append(rlhf_fast.set_cpu_buffer_cache(mb))

    yield turn_on
    rlhf_fast.set_cpu_buffer_cache(previous[0] if previous else 0)
    rlhf_fast.release_cpu_buffers()


def test_off_by_default_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "RLHF_FAST_CPU_BUFFER_CACHE_MB"}
    out = _run(env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"]  # nothing kept, and the bound was 0


def test_released_outputs_are_reused_and_release_frees_them(cache_mb):
    cache_mb(64)
    rlhf_fast.release_cpu_buffers()
    adv, ret = _gae_outputs()
    ptrs = {adv.data_ptr(), ret.data_ptr()}
    want = (adv.clone(), ret.clone())
    del adv, ret
    adv, ret = _gae_outputs()
    assert {adv.data_ptr(), ret.data_ptr()} == ptrs  # the same memory, handed out again
    torch.testing.assert_close(adv, want[0])  # and fully rewritten (uninitialised memory is never read)
    torch.testing.assert_close(ret, want[1])
    del adv, ret
    assert rlhf_fast.release_cpu_buffers() >= 2 * 4 * N
    assert rlhf_fast.release_cpu_buffers() == 0


def test_live_outputs_are_never_shared(cache_mb):
    cache_mb(64)
    rlhf_fast.release_cpu_buffers()
    first = _gae_outputs()
    second = _gae_outputs()
    assert len({t.data_ptr() for t in (*first, *second)}) == 4


def test_the_bound_is_kept(cache_mb):
    """At most `mb` MB stay idle: two 2 MB outputs fit in 4 MB, a third pair evicts the oldest."""
    cache_mb(4)
    rlhf_fast.release_cpu_buffers()
    a, b = _gae_outputs(), _gae_outputs()
    del a, b  # 4 x 2 MB released into a 4 MB cache
    assert rlhf_fast.release_cpu_buffers() == 4 << 20
    big = _gae_outputs(4 * N)  # 8 MB each: larger than the bound, never kept
    del big
    assert rlhf_fast.release_cpu_buffers() == 0


def test_turning_it_off_frees_the_idle_buffers(cache_mb):
    cache_mb(64)
    rlhf_fast.release_cpu_buffers()
    out = _gae_outputs()
    del out
    assert rlhf_fast.set_cpu_buffer_cache(0) == 64
    assert rlhf_fast.release_cpu_buffers() == 0  # freed when the cache was turned off
    out = _gae_outputs()
    del out
    assert rlhf_fast.release_cpu_buffers() == 0  # and nothing is kept while it is off


@pytest.mark.parametrize("mb", [-1, 1.5, "64", True, (1 << 20) + 1])
def test_bad_bound(mb):
    with pytest.raises(ValueError, match=r"mb: expected an integer in \[0, 1048576\] \(MB\), got"):
        rlhf_fast.set_cpu_buffer_cache(mb)


def _run(env) -> subprocess.CompletedProcess:
    code = ("import torch, rlhf_fast\n"
            "r, m = torch.randn(1, 1 << 20), torch.ones(1, 1 << 20, dtype=torch.bool)\n"
            "x = rlhf_fast.gae(r, r, m, backend='cpu')\n"
            "del x\n"
            "print(rlhf_fast.release_cpu_buffers(), rlhf_fast.set_cpu_buffer_cache(0))\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_cache_bound_from_the_environment():
    on = _run(dict(os.environ, RLHF_FAST_CPU_BUFFER_CACHE_MB="16"))
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == [str(2 * 4 << 20), "16"]  # both 4 MB outputs kept, bound 16 MB
    off = _run(dict(os.environ, RLHF_FAST_CPU_BUFFER_CACHE_MB="0"))
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0"]
    bad = _run(dict(os.environ, RLHF_FAST_CPU_BUFFER_CACHE_MB="lots"))
    assert bad.returncode != 0
    assert "RLHF_FAST_CPU_BUFFER_CACHE_MB: expected an integer in [0, 1048576]" in bad.stderr
