"""pytest-benchmark suites: the cases of every op suite of `rlhf-fast bench` (rlhf_fast.bench.suites), every
mode and provider, each checked against the reference before pytest-benchmark times it (`pytest bench/`; not
part of CI, whose testpaths are tests/).

    pytest bench/ --benchmark-columns=median,iqr,rounds      # QUICK_CASES of every suite
    RLHF_FAST_BENCH_FULL=1 pytest bench/ -k gather_logprobs  # the full case lists
"""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_fast.bench.common import Skip, compare, mode_fn, results
from rlhf_fast.bench.suites import SUITES, cases, providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("RLHF_FAST_BENCH_FULL") == "1"


def _params():
    for name, module in SUITES.items():
        for case in cases(module, DEVICE, quick=not FULL, sweep=False):
            for provider in providers(module, DEVICE):
                for mode in module.MODES:
                    yield pytest.param(name, case, provider, mode, id=f"{name}-{case.name}-{provider}-{mode}")


@pytest.mark.parametrize(("suite", "case", "provider", "mode"), list(_params()))
def test_bench(benchmark, suite, case, provider, mode):
    module = SUITES[suite]
    try:
        w = module.workload(provider, case, DEVICE)
    except Skip as why:
        pytest.skip(str(why))
    if mode != "nograd" and not w.has_backward:
        pytest.skip(f"{provider} has no backward")
    if w.check:
        ref = module.reference(case, DEVICE)
        grad = mode != "nograd" and w.has_backward
        problem = compare(results(w, grad), results(ref, grad), getattr(module, "TOLERANCE", None))
        assert problem is None, f"{w.label or provider} disagrees with the reference: {problem}"
    timed = mode_fn(w, mode)
    benchmark.extra_info.update(backend=w.backend, label=w.label or provider)
    if timed.setup is None:
        benchmark(timed.fn)
    else:
        benchmark.pedantic(timed.fn, setup=lambda: (timed.setup(), None)[1], rounds=5, warmup_rounds=1)
