"""The `rlhf-fast` command."""

from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    import torch

    import rlhf_fast

    print(f"rlhf_fast {rlhf_fast.__version__} (torch {torch.__version__})")
    print(f"native extension: {'built' if rlhf_fast.has_native() else 'missing'}"
          + (f", CPU kernels {rlhf_fast.cpu_capability()}" if rlhf_fast.has_native() else ""))
    for name, reasons in rlhf_fast.backends_available().items():
        print(f"  {name:7s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    return 0


def _demo(args) -> int:
    from rlhf_fast import demo

    demo.main(args.rest)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-fast", description="Fused RLHF ops and pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available on this machine and why not").set_defaults(fn=_info)
    p = sub.add_parser("demo", help="gather_logprobs against plain PyTorch")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_demo)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
