"""The native CPU kernels' large-buffer cache (csrc/cpu/hugepage_alloc.cpp): outputs >= 2 MB come
from a cache of released buffers, so a loop calling the same op reuses faulted-in memory;
rlhf_fast.release_cpu_buffers() empties it; RLHF_FAST_CPU_BUFFER_CACHE_MB bounds it (0: off)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rlhf_fast

pytestmark = pytest.mark.skipif(not rlhf_fast.has_native(), reason="needs the native extension")

N = 1 << 19  # 2 MB of fp32 per output: the smallest size the cache serves


def _gae_outputs():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(2, N // 2, generator=g), torch.randn(2, N // 2, generator=g)
    return rlhf_fast.gae(rewards, values, torch.ones(2, N // 2, dtype=torch.bool), backend="cpu")


def test_released_outputs_are_reused_and_release_frees_them():
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


def test_live_outputs_are_never_shared():
    rlhf_fast.release_cpu_buffers()
    first = _gae_outputs()
    second = _gae_outputs()
    assert len({t.data_ptr() for t in (*first, *second)}) == 4


def _run(env_value: str) -> subprocess.CompletedProcess:
    code = ("import torch, rlhf_fast\n"
            "r, m = torch.randn(1, 1 << 20), torch.ones(1, 1 << 20, dtype=torch.bool)\n"
            "x = rlhf_fast.gae(r, r, m, backend='cpu')\n"
            "del x\n"
            "print(rlhf_fast.release_cpu_buffers())\n")
    env = dict(os.environ, RLHF_FAST_CPU_BUFFER_CACHE_MB=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_cache_size_from_the_environment():
    off = _run("0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip().splitlines()[-1] == "0"  # nothing kept
    bad = _run("lots")
    assert bad.returncode != 0
    assert "RLHF_FAST_CPU_BUFFER_CACHE_MB: expected an integer >= 0" in bad.stderr
