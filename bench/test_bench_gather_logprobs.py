"""pytest-benchmark suite of gather_logprobs (`pytest bench/`; not part of CI)."""

import pytest

from bench import bench_gather_logprobs as B

DEVICE = "cpu"


@pytest.mark.parametrize("mode", B.MODES)
@pytest.mark.parametrize("provider", B.providers(DEVICE))
@pytest.mark.parametrize("case", B.QUICK_CASES, ids=lambda c: c.name)
def test_gather_logprobs(benchmark, case, mode, provider):
    setup = B.setup(provider, case, mode, DEVICE)
    if setup is None:
        pytest.skip(f"{provider} does not apply to {mode}")
    fn, ran, _ = setup
    benchmark.extra_info["backend"] = ran
    benchmark(fn)
