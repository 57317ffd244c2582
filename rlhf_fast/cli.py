"""The `rlhf-fast` command."""

from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    import torch

    import rlhf_fast

    print(f"rlhf_fast {rlhf_fast.__version__} (torch {torch.__version__})")
    print(f"native extension: {'built' if rlhf_fast.has_native() else 'missing'}"
          + (f", CPU kernels {rlhf_fast.cpu_capability()}, CPU GEMMs {rlhf_fast.cpu_gemm_engine()}"
             if rlhf_fast.has_native() else ""))
    for name, reasons in rlhf_fast.backends_available().items():
        print(f"  {name:7s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    return 0


def _demo(args) -> int:
    from rlhf_fast import demo

    demo.main(args.rest)
    return 0


def _bench(args) -> int:
    """rlhf_fast.bench.run: suites, modes, providers, CSV/JSON rows, plots, README tables."""
    from rlhf_fast.bench import run

    return run.main(args.rest)


def _inspect(args) -> int:
    """rlhf_fast.kernels._inspect_cli: AOT-compile every kernel for sm_80/sm_90a and report (exit 1 on spills or
    missing tensor cores)."""
    import os
    import subprocess

    # Triton's interpreter objects cannot be compiled ahead of time: run in a clean process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.call([sys.executable, "-m", "rlhf_fast.kernels._inspect_cli", *args.rest], env=env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-fast", description="Fused RLHF ops and pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available on this machine and why not").set_defaults(fn=_info)
    # demo, bench and inspect hand all their options (--help too) to the tools they run
    p = sub.add_parser("demo", help="gather_logprobs against plain PyTorch", add_help=False)
    p.set_defaults(fn=_demo)
    p = sub.add_parser("bench", add_help=False,
                       help="benchmarks of every op against eager, torch.compile and peers (rlhf-fast bench --help)")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("inspect", add_help=False,
                       help="compile the Triton kernels for sm_80/sm_90a without a GPU and report registers, spills, "
                            "shared memory, load widths, tensor-core use (rlhf-fast inspect --help)")
    p.set_defaults(fn=_inspect)
    from rlhf_fast.pipeline.cli import add_subcommands  # pipeline, sft, rm, ppo, grpo, dpo

    add_subcommands(sub)
    args, extra = ap.parse_known_args(argv)
    if extra and args.command not in ("bench", "inspect", "demo"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    args.rest = extra
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
