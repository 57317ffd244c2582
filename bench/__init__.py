"""rlhf_fast benchmarks: one module per op (`setup_<op>(provider, case) -> (fn, check)` and its
case list), shared timing in bench.common, the runner in bench/run.py, pytest-benchmark suites in
bench/test_bench_*.py (run with `pytest bench/`, not part of CI)."""
