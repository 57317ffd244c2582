"""Ahead-of-time compilation and inspection of the GPU kernels, without a GPU: ``rlhf-fast inspect``.

Compiles every Triton kernel configuration (rlhf_fast.kernels._aot) and every csrc/cuda/*.cu for sm_80
and sm_90a, and prints registers, spills, shared memory, occupancy, load widths and tensor-core use per
kernel (rlhf_fast.kernels._inspect), then the time at H100 / H200 peak of each kernel at its op's GPU
benchmark shapes (rlhf_fast.kernels._cost). ``--json`` prints the machine-readable report; exit status 1
if any kernel spills or lacks the tensor-core instructions it requires. ``--estimate OP KEY=VALUE ...``
prints only the cost of one op at a shape.

Run it as ``rlhf-fast inspect`` or ``python -m rlhf_fast.kernels._inspect_cli``, in a process without
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlhf_fast.kernels._cost import attention_shape, estimate, op_cost
from rlhf_fast.kernels._inspect import DEFAULT_ARCHS, format_table, inspect_all, text_table


def _parse_shape(items: list[str]) -> dict:
    shape = {}
    for item in items:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--estimate: expected key=value, got {item!r}")
        try:
            shape[key] = int(value)
        except ValueError:
            shape[key] = {"true": True, "false": False}.get(value.lower(), value)
    return shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-fast inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability to compile for, repeatable (default: 80 and 90)")
    parser.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    parser.add_argument("--ops", nargs="*", help="only the kernels of these ops (e.g. gather_logprobs attention)")
    parser.add_argument("--kernels", help="only the Triton configurations whose label matches this regular expression")
    cuda = parser.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                      help="also compile csrc/cuda/*.cu with nvcc (default: when nvcc and the sources are found)")
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false", help="Triton kernels only")
    parser.add_argument("--summary", action="store_true", help="one line per kernel family instead of per config")
    parser.add_argument("--estimate", nargs="+", metavar="OP KEY=VALUE",
                        help="only print the cost of one op at a shape, e.g. --estimate gather_logprobs n=8192 "
                             "vocab=128256 dtype=bf16 (attention: kind=dense batch=8 heads=32 seqlen=2048 "
                             "head_dim=128)")
    opts = parser.parse_args(argv)
    if opts.estimate:
        op, shape = opts.estimate[0], _parse_shape(opts.estimate[1:])
        if op == "attention" and "pairs" not in shape:
            shape = attention_shape(shape.pop("kind", "dense"), **shape)
        rows = [{"op": op, "mode": m, **estimate(op_cost(op, m, **shape))} for m in ("fwd", "bwd", "fwd+bwd")]
        print(json.dumps(rows, indent=1) if opts.json else text_table(rows))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled ahead of time)",
              file=sys.stderr)
        return 2
    report = inspect_all(tuple(opts.arch or DEFAULT_ARCHS), opts.cuda, opts.ops, opts.kernels)
    reports = report.pop("_reports")
    if opts.json:
        print(json.dumps(report, indent=1))
    else:
        if opts.summary:
            print(text_table(report["summary"]))
        else:
            print(format_table(reports))
        if report["cuda_note"]:
            print(f"\nCUDA sources: {report['cuda_note']}")
        print("\nTime at peak of each kernel at its op's GPU benchmark shapes (roofline lower bound, us):\n")
        print(text_table(report["kernel_estimates"],
                         ["kernel", "shape", "GFLOP", "MB", "H100_us", "H100_bound", "H200_us", "H200_bound"]))
    for failure in report["failures"]:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
