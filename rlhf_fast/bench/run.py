"""Benchmark runner behind `rlhf-fast bench`: every op suite, every mode, every provider, side by side.

For each case the reference runs once; every provider is then checked against it (outputs and, when
the op has a backward, every gradient) before it is timed. A provider that gives a wrong result is
reported as such and not timed; one that cannot run here (a backend the registry refuses, a peer that
is not installed or needs a GPU) is reported with the reason. rlhf_fast providers are labelled by the
backend the registry actually selected: the automatic choice is `rlhf_fast[<what ran>]` (e.g.
`rlhf_fast[torch]` when the native extension is missing), never the fused kernel it hoped for.

Modes (rlhf_fast/bench/common.py): nograd, fwd, bwd, fwd+bwd. Timing: CPU wall time, warm-up then repeated runs
with the providers of a case interleaved round-robin (a slow spell of the machine hits all of them),
median and quartiles; GPU: triton.testing.do_bench (CUDA events, L2 flushed before every run).
Memory: GPU peak allocated (every row); CPU peak RSS of a fresh process above its inputs (--memory).
Derived: GB/s and % of the memory floor, TFLOP/s, from the analytic cost model of
rlhf_fast.kernels._cost; speed-ups of rlhf_fast over each baseline.

Output: a table per suite on the terminal, rows (with device, versions, commit, timestamp) in
<out>/<suite>-<device>.csv and .json, PNG plots of time and memory against each swept size in
<out>/plots/ (matplotlib), and with --update-readme the README's Performance tables.

    rlhf-fast bench --quick                       # small cases, about a minute
    rlhf-fast bench --ops gather_logprobs --memory
    rlhf-fast bench --update-readme --memory      # full run; rewrites ./README.md's tables (make bench)
    rlhf-fast bench --ops --update-readme         # no timing: only the inspection and estimate tables

(`python -m rlhf_fast.bench.run` is the same command.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from rlhf_fast.bench.common import (
    MODES,
    Row,
    Skip,
    compare,
    cuda_peak_bytes,
    environment,
    is_fused,
    memory_floor,
    mode_fn,
    results,
    time_cpu_interleaved,
    time_fn,
)
from rlhf_fast.bench.suites import SUITES, cases, providers

QUICK_REPS = 5
README_MODES = ("nograd", "fwd+bwd")  # the README tables; every mode is in the CSV/JSON rows and plots


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------

def cost_of(module, case, mode: str):
    """The analytic cost of one call (rlhf_fast.kernels._cost.op_cost), or None for a suite without one."""
    from rlhf_fast.kernels._cost import Cost, op_cost

    if not hasattr(module, "cost"):
        return None
    shape = module.cost(case)
    pairs = shape if isinstance(shape, list) else [(getattr(module, "COST_OP", module.OP), shape)]
    total = Cost(0.0)
    for op, s in pairs:
        c = op_cost(op, mode, **s)
        total = Cost(total.bytes + c.bytes, total.tensor_flops + c.tensor_flops, total.flops + c.flops, c.precision)
    return total


def derived(module, case, mode: str, median_ms: float, floor_bw: float) -> dict:
    """GB/s and % of the memory floor (bandwidth-bound ops), TFLOP/s (ops with GEMMs), the suite's own."""
    out = {}
    cost = cost_of(module, case, mode)
    if cost is not None and median_ms > 0 and math.isfinite(median_ms):
        seconds = median_ms * 1e-3
        if cost.tensor_flops:
            out["TFLOP/s"] = round(cost.tensor_flops / seconds / 1e12, 3)
        else:
            # 3 significant digits: overhead-bound cases run at a small fraction of a GB/s
            out["GB/s"] = float(f"{cost.bytes / seconds / 1e9:.3g}")
            out["floor_%"] = float(f"{100 * cost.bytes / seconds / floor_bw:.3g}")
        out["model_bytes"] = int(cost.bytes)
        out["model_flops"] = int(cost.total_flops)
    if hasattr(module, "derived"):
        out.update(module.derived(case, mode, median_ms))
    for series, axis, x in (module.sweep(case) if hasattr(module, "sweep") else []):
        out[f"sweep:{axis}"] = x
        out[f"series:{axis}"] = series
    return out


# ---------------------------------------------------------------------------------------------
# Running a suite
# ---------------------------------------------------------------------------------------------

class Progress:
    """A progress bar on a terminal (tqdm when installed), plain lines otherwise."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="run", leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what[-60:], refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_suite(name: str, module, device: str, quick: bool = False, memory: bool = False, modes=None,
              only_providers=None, reps: int | None = None, floor_bw: float | None = None,
              case_filter: str | None = None) -> list[Row]:
    all_cases = cases(module, device, quick)
    selected = [(i, c) for i, c in enumerate(all_cases) if not case_filter or re.search(case_filter, c.name)]
    modes = [m for m in module.MODES if not modes or m in modes]
    provs = [p for p in providers(module, device) if not only_providers or p in only_providers]
    reps = reps or (QUICK_REPS if quick else getattr(module, "REPS", 11))
    floor_bw = floor_bw or memory_floor(device)[0]
    rows: list[Row] = []
    progress = Progress(len(selected) * len(provs) * len(modes), name)
    for index, case in selected:
        ref = module.reference(case, device)
        grad = ref.has_backward and any(m != "nograd" for m in modes)
        want = {"nograd": results(ref, False), "grad": results(ref, True) if grad else None}
        labels_done = set()
        ready = []  # (provider, label, workload, status) of the providers that run on this case
        for provider in provs:
            row_base = dict(op=name, case=case.name)
            try:
                w = module.workload(provider, case, device)
            except Skip as why:
                rows += [Row(**row_base, mode=m, provider=provider, backend="-", median_ms=math.nan, q1_ms=math.nan,
                             q3_ms=math.nan, status=f"skipped: {why}") for m in modes]
                progress.write(f"  {name} {case.name}: {provider} skipped: {why}")
                for m in modes:
                    progress.step(f"{case.name} {m} {provider}")
                continue
            label = w.label or provider
            if is_fused(provider) and label in labels_done:  # an explicit backend the automatic choice ran
                for m in modes:
                    progress.step(f"{case.name} {m} {provider}")
                continue
            labels_done.add(label)
            status = "ok"
            if w.check:
                try:
                    problem = compare(results(w, False), want["nograd"], getattr(module, "TOLERANCE", None))
                    if problem is None and want["grad"] is not None and w.has_backward:
                        problem = compare(results(w, True), want["grad"], getattr(module, "TOLERANCE", None))
                except Exception as e:  # noqa: BLE001 (a peer's API drift must not stop the run)
                    problem = f"error: {type(e).__name__}: {e}"
                if problem:
                    status = ("wrong result: " if not problem.startswith("error") else "") + problem
                    progress.write(f"  {name} {case.name} {label}: {status} -- not timed")
            ready.append((provider, label, w, status))
        for mode in modes:
            timeds = {label: mode_fn(w, mode) for _, label, w, status in ready
                      if status == "ok" and (mode == "nograd" or w.has_backward)}
            # CPU: the providers' timed runs interleaved (one slow spell hits all of them); GPU: one at a time
            timings = time_cpu_interleaved(timeds, reps=reps) if device == "cpu" else {}
            for provider, label, w, status in ready:
                row_base = dict(op=name, case=case.name)
                progress.step(f"{case.name} {mode} {label}")
                if label not in timeds:
                    if status != "ok":
                        rows.append(Row(**row_base, mode=mode, provider=label, backend=w.backend, median_ms=math.nan,
                                        q1_ms=math.nan, q3_ms=math.nan, status=status))
                    continue
                timed = timeds[label]
                t = timings[label] if label in timings else time_fn(timed, device, reps=reps)
                row = Row(**row_base, mode=mode, provider=label, backend=w.backend, median_ms=t.median_ms,
                          q1_ms=t.q1_ms, q3_ms=t.q3_ms, min_ms=t.min_ms, reps=t.reps,
                          extra=derived(module, case, mode, t.median_ms, floor_bw))
                if device == "cuda":
                    row.peak_MB = round(cuda_peak_bytes(timed) / 2**20, 1)
                elif memory and not quick:
                    from rlhf_fast.bench.memory import measure

                    got = measure(name, provider, index, mode, device, quick)
                    if "peak_bytes" in got:
                        row.peak_MB = round(got["peak_bytes"] / 2**20, 1)
                        for key in ("first_peak", "retained"):
                            if f"{key}_bytes" in got:
                                row.extra[f"{key}_MB"] = round(got[f"{key}_bytes"] / 2**20, 1)
                    else:
                        row.extra["memory_error"] = got.get("error", "unknown")
                rows.append(row)
                mem = f", peak {row.peak_MB:.1f} MB" if not math.isnan(row.peak_MB) else ""
                progress.write(f"  {name} {case.name:34s} {mode:8s} {label:24s} {t.median_ms:10.3f} ms "
                               f"(IQR {t.q1_ms:.3f}-{t.q3_ms:.3f}){mem}")
        del want, ref
    progress.close()
    add_speedups(rows)
    return rows


def add_speedups(rows: list[Row]) -> None:
    """x_vs_<baseline> = baseline median / rlhf_fast median, on every rlhf_fast row, per (case, mode)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.status == "ok":
            groups.setdefault((r.op, r.case, r.mode), []).append(r)
    for group in groups.values():
        for ours in (r for r in group if is_fused(r.provider)):
            for base in (r for r in group if not is_fused(r.provider) and r.provider != "floor"):
                ours.extra[f"vs_{base.provider}"] = round(base.median_ms / ours.median_ms, 3)
            floor = [r for r in group if r.provider == "floor"]
            if floor:
                ours.extra["x_floor_time"] = round(ours.median_ms / floor[0].median_ms, 3)


# ---------------------------------------------------------------------------------------------
# Output: CSV/JSON, terminal/markdown tables, plots
# ---------------------------------------------------------------------------------------------

def write_rows(rows: list[Row], env: dict, base: Path) -> list[dict]:
    flat = [r.flat(env) for r in rows]
    keys = list(dict.fromkeys(k for row in flat for k in row))
    with open(f"{base}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    Path(f"{base}.json").write_text(json.dumps(flat, indent=1, default=str))
    return flat


def _num(v: float, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.0f}"


def _memory_cell(row: Row, first: bool) -> str:
    if not first:
        return _num(row.peak_MB, 0)
    return " / ".join(_num(v, 0) for v in (row.peak_MB, row.extra.get("first_peak_MB", math.nan),
                                           row.extra.get("retained_MB", math.nan)))


def markdown(rows: list[Row], env: dict, reps: int, modes=None, case_names=None) -> str:
    """One line per (case, mode): each provider's median ms, rlhf_fast's speed-up over each baseline, its
    GB/s (% of the memory floor) or TFLOP/s, and peak memory per provider when measured."""
    ok = [r for r in rows if r.status == "ok" and (not modes or r.mode in modes)
          and (case_names is None or r.case in case_names)]
    by: dict[tuple, dict[str, Row]] = {}
    provs: list[str] = []
    for r in ok:
        by.setdefault((r.case, r.mode), {})[r.provider] = r
        if r.provider not in provs:
            provs.append(r.provider)
    ours = [p for p in provs if is_fused(p)]
    baselines = [p for p in provs if not is_fused(p) and p != "floor"]
    has_mem = any(not math.isnan(r.peak_MB) for r in ok)
    rate = "TFLOP/s" if any("TFLOP/s" in r.extra for r in ok) else "GB/s"
    head = ["case", "mode"] + [f"{p} ms" for p in provs]
    head += [f"{o} vs {b}" for o in ours for b in baselines]
    head += [f"{o} {rate}" for o in ours] + ([f"{o} % floor" for o in ours] if rate == "GB/s" else [])
    first = has_mem and any("first_peak_MB" in r.extra for r in ok)
    mem_head = "MB steady / first / kept" if first else "MB"
    head += [f"{p} {mem_head}" for p in provs if p != "floor"] if has_mem else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (case, mode), got in by.items():
        cells = [case, mode] + [_num(got[p].median_ms) if p in got else "" for p in provs]
        cells += [f"{got[b].median_ms / got[o].median_ms:.2f}x" if o in got and b in got else ""
                  for o in ours for b in baselines]
        cells += [_num(got[o].extra.get(rate, math.nan), 3 if rate == "TFLOP/s" else 1) if o in got else ""
                  for o in ours]
        if rate == "GB/s":
            cells += [_num(got[o].extra.get("floor_%", math.nan), 0) if o in got else "" for o in ours]
        if has_mem:
            cells += [_memory_cell(got[p], first) if p in got else "" for p in provs if p != "floor"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    note = (f"{env['device']}; torch {env['torch']}, triton {env['triton']}, CPU kernels {env['cpu_capability']}; "
            f"commit {env['commit']}, {env['timestamp']}. Medians of {reps} runs after warm-up"
            + (" (CUDA events, L2 flushed)" if env.get("device_type") == "cuda" else "") + ".")
    if "floor" in provs:
        note += " `floor` is one `logits.sum()` (the forward's memory floor)."
    if rate == "GB/s":
        note += (" GB/s: the analytic compulsory bytes (rlhf_fast.kernels._cost.op_cost) per second; % floor: of "
                 f"{env.get('floor_GBps', '?')} GB/s ({env.get('floor_source', '?')}).")
    else:
        note += " TFLOP/s: the analytic FLOPs (rlhf_fast.kernels._cost.op_cost) per second."
    if has_mem:
        note += (" MB: peak memory above the inputs and the gradients every method returns ("
                 + ("GPU: torch peak allocated" if env.get("device_type") == "cuda" else "fresh process, peak RSS")
                 + ")" + ("; steady: a second call's peak, first: the first call's, kept: what the first call "
                          "leaves resident once its outputs are freed (rlhf_fast.bench.memory)" if first else "")
                 + ".")
    skipped = sorted({f"{r.provider} ({r.status})" for r in rows if r.status.startswith("skipped")})
    wrong = sorted({f"{r.provider} on {r.case}: {r.status}" for r in rows
                    if r.status != "ok" and not r.status.startswith("skipped")})
    if skipped:
        note += " Not run: " + "; ".join(skipped) + "."
    if wrong:
        note += " Failed the check, not timed: " + "; ".join(wrong) + "."
    lines.append(note)
    return "\n".join(lines)


def plot(rows: list[Row], out_dir: Path, device: str) -> list[Path]:
    """Per suite, swept axis, series and mode: time and peak memory against the swept size, one line per
    provider (only sweeps with at least two sizes). Returns the PNG paths; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.status != "ok":
            continue
        for key, series in r.extra.items():
            if key.startswith("series:"):
                axis = key[len("series:"):]
                groups.setdefault((r.op, axis, series, r.mode), []).append(r)
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for (op, axis, series, mode), group in groups.items():
        if len({r.extra[f"sweep:{axis}"] for r in group}) < 2:
            continue
        has_mem = any(not math.isnan(r.peak_MB) for r in group)
        fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4), squeeze=False)
        for provider in dict.fromkeys(r.provider for r in group):
            pts = sorted((r.extra[f"sweep:{axis}"], r.median_ms, r.peak_MB) for r in group if r.provider == provider)
            xs = [p[0] for p in pts]
            axes[0][0].plot(xs, [p[1] for p in pts], marker="o", label=provider)
            if has_mem:
                axes[0][1].plot(xs, [p[2] for p in pts], marker="o", label=provider)
        axes[0][0].set(xlabel=axis, ylabel="median ms", title=f"{op} {mode}: time", xscale="log", yscale="log")
        if has_mem:
            axes[0][1].set(xlabel=axis, ylabel="peak MB", title=f"{op} {mode}: memory", xscale="log")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{series} ({device})", fontsize=9)
        fig.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9=]+", "_", f"{op}-{device}-{axis}-{series}-{mode}").strip("_")
        path = out_dir / f"{slug}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------

README = Path("README.md")  # the checkout's README when run from its root, as `make bench` does


def replace_block(text: str, key: str, body: str, anchor: str | None = None, title: str | None = None) -> str:
    """Replace what lies between <!-- key:start --> and <!-- key:end -->; when the markers are missing,
    insert a new block (under `title`) just before the line <!-- anchor -->."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    if start in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        return before + start + "\n" + body.strip() + "\n" + end + after
    marker = f"<!-- {anchor} -->" if anchor else None
    if marker is None or marker not in text:
        raise ValueError(f"README has neither {start} nor {marker}")
    block = (f"### {title}\n\n" if title else "") + f"{start}\n{body.strip()}\n{end}\n\n"
    return text.replace(marker, block + marker, 1)


def update_readme_tables(tables: dict[str, str], device: str, path: Path = README) -> None:
    text = path.read_text()
    where = "GPU" if device == "cuda" else "CPU"
    for name, table in tables.items():
        text = replace_block(text, f"bench:{name}:{device}", table, anchor=f"bench:{device}:more",
                             title=f"{name}, {where}")
    if device == "cuda" and tables:
        text = re.sub(r"<!-- bench:cuda:none:start -->.*?<!-- bench:cuda:none:end -->\n?", "", text, flags=re.S)
    path.write_text(text)


def static_sections(inspect: bool = True) -> dict[str, str]:
    """The README blocks that need no timing: the inspection summary (compiles every kernel: ~1-3 min)
    and the time-at-peak tables of the cost model."""
    from rlhf_fast.kernels import _cost, _inspect

    blocks = {}
    if inspect:
        report = _inspect.inspect_all()
        report.pop("_reports")
        failures = "; ".join(report["failures"]) or "none"
        note = report["cuda_note"] and f" CUDA sources: {report['cuda_note']}."
        blocks["inspect"] = (_inspect.markdown_table(report["summary"]) + "\n\n"
                             f"`rlhf-fast inspect` (per configuration: `rlhf-fast inspect`; JSON: `--json`). "
                             f"Spills or missing tensor cores: {failures}.{note or ''} Occupancy: resident warps "
                             "per SM / 64 at sm_80/sm_90 limits (CUDA kernels: register limit only, the block size "
                             "is a launch argument); ldg128: configurations with 128-bit global loads.")
    est = _cost.op_estimates()
    cols = ["op", "shape", "mode", "GFLOP", "MB", "H100_us", "H100_bound", "H200_us", "H200_bound"]
    blocks["estimates"] = (_inspect.markdown_table(est, cols) + "\n\n"
                           "Roofline lower bound max(FLOPs / peak, bytes / bandwidth) of one call: H100 SXM "
                           "989 TFLOP/s bf16 dense, 3.35 TB/s; H200 989 TFLOP/s, 4.8 TB/s. Bytes: every input "
                           "read once, every output written once (MB = 1e6 bytes). From "
                           "`rlhf_fast.kernels._cost.op_cost`; per kernel: `rlhf-fast inspect`.")
    blocks["attention-yardstick"] = (_inspect.markdown_table(_cost.attention_table()) + "\n\n"
                                     "FLOPs as flash-attention-2 counts them (forward 4·pairs·D per head, backward "
                                     "2.5x the forward, the recompute of S included); the goal for the Triton "
                                     "kernels is flash-attention-2-class throughput, >= 330 TFLOP/s fwd+bwd at "
                                     "D=128 on an H100 (`ms @330TF`).")
    return blocks


def update_readme_static(inspect: bool = True, path: Path = README) -> None:
    text = path.read_text()
    for key, body in static_sections(inspect).items():
        text = replace_block(text, key, body)
    path.write_text(text)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-fast bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="*", default=list(SUITES), choices=list(SUITES), metavar="SUITE",
                    help=f"suites to run (default all: {', '.join(SUITES)}); none with --update-readme: only the "
                         "inspection and estimate tables")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="small cases, 5 runs each: about a minute")
    ap.add_argument("--modes", nargs="*", choices=MODES, help="only these modes")
    ap.add_argument("--providers", nargs="*", help="only these providers (e.g. rlhf_fast eager)")
    ap.add_argument("--cases", help="only the cases whose name matches this regular expression")
    ap.add_argument("--reps", type=int, help="timed runs per measurement (CPU)")
    ap.add_argument("--memory", action="store_true", help="CPU: peak RSS in a fresh process per case (slow)")
    ap.add_argument("--out", default=str(Path("bench") / "results"),
                    help="folder for CSV/JSON rows and plots (default: bench/results under the current directory)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--update-readme", action="store_true",
                    help="rewrite the README's Performance tables (full runs only; --modes may leave out modes the "
                         "README does not show) and its inspection/estimate tables")
    ap.add_argument("--readme", default=str(README),
                    help="with --update-readme: the README to rewrite (default: README.md in the current directory, "
                         "the checkout's root for `make bench`)")
    ap.add_argument("--no-inspect", action="store_true", help="with --update-readme: leave the inspection table")
    args = ap.parse_args(argv)
    readme = Path(args.readme)
    if args.update_readme and not readme.is_file():
        ap.error(f"--update-readme: expected the README of a source checkout at --readme, got {str(readme)!r}, "
                 "which is not a file")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    env = environment(args.device)
    floor_bw, floor_source = memory_floor(args.device) if args.ops else (float("nan"), "")
    env["floor_GBps"], env["floor_source"] = round(floor_bw / 1e9, 1), floor_source
    print(f"rlhf_fast benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"CPU kernels {env['cpu_capability']}, commit {env['commit']}); memory floor {env['floor_GBps']} GB/s "
          f"({floor_source})", flush=True)
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)
    tables = {}
    for name in args.ops:
        module = SUITES[name]
        start = time.perf_counter()
        rows = run_suite(name, module, args.device, args.quick, args.memory, args.modes, args.providers, args.reps,
                         floor_bw, args.cases)
        write_rows(rows, env, out / f"{name}-{args.device}")
        plots = [] if args.no_plots else plot(rows, out / "plots", args.device)
        reps = args.reps or (QUICK_REPS if args.quick else getattr(module, "REPS", 11))
        print("\n" + markdown(rows, env, reps) + "\n")
        print(f"{name}: {len(rows)} rows in {time.perf_counter() - start:.0f} s -> {out / name}-{args.device}.csv/.json"
              + (f", {len(plots)} plots in {out / 'plots'}" if plots else ""), flush=True)
        headline = {c.name for c in (module.GPU_CASES if args.device == "cuda" and hasattr(module, "GPU_CASES")
                                     else module.CASES)}
        tables[name] = markdown(rows, env, reps, modes=README_MODES, case_names=headline)
    if args.update_readme:
        partial_modes = args.modes and not set(README_MODES) <= set(args.modes)  # the README shows README_MODES
        if args.quick or args.cases or args.providers or partial_modes or args.reps:
            print("--update-readme: the README gets full runs only; its timing tables were left as they are")
        else:
            update_readme_tables(tables, args.device, readme)
        update_readme_static(inspect=not args.no_inspect, path=readme)
        print(f"{readme} Performance section updated ({', '.join(tables) or 'no timing tables'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
