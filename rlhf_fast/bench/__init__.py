"""The benchmark runner behind `rlhf-fast bench`, shipped with the package (install the `[bench]` extra for
its peers and plots).

  suites.py        the op suites `rlhf-fast bench` runs (SUITES) and which cases and providers each one has
  bench_<op>.py    one suite per op: `workload(provider, case, device)`, `reference(case, device)`, the cases
  common.py        workloads, the four modes, the check against the reference, timing, the environment
  memory.py        peak memory of one case in a fresh process (`python -m rlhf_fast.bench.memory`)
  run.py           the command line: tables, CSV/JSON rows, plots, the README's Performance tables
  gemm_engines.py  linear_logprobs with each CPU GEMM engine (`python -m rlhf_fast.bench.gemm_engines`)

The pytest-benchmark suites and the pipeline/TRL comparisons stay in bench/ of the source checkout.
"""
