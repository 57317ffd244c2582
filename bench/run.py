"""Benchmark runner: every case of every op, every mode, every provider, side by side in one run.

Each provider's outputs (and gradients) are checked against the reference before it is timed; a
provider that fails the check is reported as such and not timed. Rows go to
bench/results/<op>-<device>.csv and .json with the device, versions, commit and timestamp.

    python bench/run.py                  # all cases
    python bench/run.py --quick          # small cases, about a minute
    python bench/run.py --update-readme  # also rewrite the README's performance table
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    bench_attention,
    bench_gae,
    bench_gather_logprobs,
    bench_linear_logprobs,
    bench_linear_ppo_loss,
    bench_ppo_losses,
    bench_ranking_loss,
)
from bench.common import Row, environment, time_fn  # noqa: E402

SUITES = {
    "gather_logprobs": bench_gather_logprobs,
    "linear_logprobs": bench_linear_logprobs,
    "linear_ppo_loss": bench_linear_ppo_loss,
    "gae": bench_gae,
    "ranking_loss": bench_ranking_loss,
    "ppo_losses": bench_ppo_losses,
    "attention": bench_attention,
}
GRAD_RTOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _close(a, b, rtol, atol):
    return a is None and b is None or (a is not None and b is not None and
                                       torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol))


def check(outputs, expected, dtype) -> bool:
    lp, ent, grad = outputs
    lp_r, ent_r, grad_r = expected
    scale = grad_r.float().abs().max().item() if grad_r is not None else 1.0
    return (_close(lp, lp_r, 1e-4, 1e-4) and _close(ent, ent_r, 1e-4, 1e-4)
            and _close(grad, grad_r, GRAD_RTOL[dtype], 1e-3 * scale))


def run_suite(name, module, device, quick, memory=False):
    rows = []
    cases = module.QUICK_CASES if quick else module.CASES
    reps = 5 if quick else getattr(module, "REPS", 11)
    for index, case in enumerate(cases):
        for mode in module.MODES:
            expected = module.reference(case, mode, device)
            for provider in module.providers(device):
                setup = module.setup(provider, case, mode, device)
                if setup is None:
                    continue
                fn, ran, outputs = setup
                if outputs is not None and not check(outputs(), expected, case.dtype):
                    print(f"  {name} {case.name} {mode} {provider}: WRONG RESULT, not timed", flush=True)
                    rows.append(Row(name, case.name, mode, provider, ran, float("nan"), float("nan"),
                                    float("nan"), {"check": "failed"}))
                    continue
                t = time_fn(fn, device, reps=reps)
                extra = module.derived(case, mode, t.median_ms)
                mem = ""
                if memory and not quick:
                    from bench.memory import measure

                    got = measure(name, provider, index, mode, device)
                    if "peak_bytes" in got:
                        extra["peak_MB"] = round(got["peak_bytes"] / 2**20, 1)
                        mem = f", peak {extra['peak_MB']:.1f} MB"
                rows.append(Row(name, case.name, mode, provider, ran, t.median_ms, t.q1_ms, t.q3_ms, extra))
                print(f"  {name} {case.name:28s} {mode:8s} {provider:18s} {t.median_ms:9.2f} ms "
                      f"(IQR {t.q1_ms:.2f}-{t.q3_ms:.2f}){mem}", flush=True)
            del expected
    return rows


def markdown(rows, env, reps) -> str:
    """One line per (case, mode): each provider's median (and peak memory when measured), and our
    speed-up over each baseline; `floor` providers are reported as time ratios instead."""
    by = {}
    providers = []
    for r in rows:
        by.setdefault((r.case, r.mode), {})[r.provider] = r
        if r.provider not in providers:
            providers.append(r.provider)
    ours = [p for p in providers if p.startswith("rlhf_fast[")]
    baselines = [p for p in providers if p not in ours and p != "floor"]
    has_mem = any("peak_MB" in r.extra for r in rows)
    head = ["case", "mode"] + [f"{p} ms" for p in providers]
    head += [f"{o} vs {b}" for o in ours for b in baselines]
    head += [f"{o} / floor" for o in ours if "floor" in providers]
    head += [f"{p} MB" for p in providers if p != "floor"] if has_mem else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (case, mode), got in by.items():
        def ms(p, got=got):
            return got[p].median_ms if p in got else float("nan")
        cells = [case, mode] + [f"{ms(p):.1f}" if p in got else "" for p in providers]
        cells += [f"{ms(b) / ms(o):.2f}x" if o in got and b in got else "" for o in ours for b in baselines]
        cells += [f"{ms(o) / ms('floor'):.2f}" if o in got and "floor" in got else ""
                  for o in ours if "floor" in providers]
        if has_mem:
            cells += [f"{got[p].extra['peak_MB']:.0f}" if p in got and "peak_MB" in got[p].extra else ""
                      for p in providers if p != "floor"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    note = (f"{env['device']}; torch {env['torch']}, triton {env['triton']}, CPU kernels {env['cpu_capability']}; "
            f"commit {env['commit']}, {env['timestamp']}. Medians of {reps} runs after warm-up.")
    if "floor" in providers:
        note += " `floor` is one `logits.sum()` (the forward's memory floor)."
    if has_mem:
        note += (" MB: peak resident memory of a fresh process above its inputs and the gradients every method"
                 " returns.")
    lines.append(note)
    return "\n".join(lines)


def update_readme(name, text, device):
    readme = ROOT / "README.md"
    start, end = f"<!-- bench:{name}:{device}:start -->", f"<!-- bench:{name}:{device}:end -->"
    content = readme.read_text()
    if start not in content:
        print(f"README.md has no {start} marker; not updated")
        return
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(before + start + "\n" + text + "\n" + end + after)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="*", default=list(SUITES), help="which op suites to run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small cases, about a minute")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for CSV/JSON rows")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's tables")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (a fresh process per case)")
    args = ap.parse_args(argv)
    env = environment(args.device)
    print(f"rlhf_fast benchmarks on {env['device']} (torch {env['torch']}, CPU kernels {env['cpu_capability']})")
    os.makedirs(args.out, exist_ok=True)
    for name in args.ops:
        rows = run_suite(name, SUITES[name], args.device, args.quick, args.memory)
        flat = [r.flat(env) for r in rows]
        base = Path(args.out) / f"{name}-{args.device}"
        keys = sorted({k for row in flat for k in row})
        with open(f"{base}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(flat)
        Path(f"{base}.json").write_text(json.dumps(flat, indent=1))
        reps = 5 if args.quick else getattr(SUITES[name], "REPS", 11)
        table = markdown(rows, env, reps)
        print("\n" + table + "\n")
        if args.update_readme and not args.quick:
            update_readme(name, table, args.device)


if __name__ == "__main__":
    main()
