"""The benchmarks that need a source checkout: pytest-benchmark suites over the op suites of
rlhf_fast.bench (bench/test_bench.py, `pytest bench/`, not part of CI) and the pipeline-level comparisons
(bench/bench_pipeline.py, bench/bench_trl.py). The runner behind `rlhf-fast bench` and its op suites ship
inside the package as rlhf_fast.bench."""
