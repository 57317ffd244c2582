"""One unattended check of rlhf_fast on a GPU machine: build, GPU tests, benchmarks, pipeline step times.

    make gpu-check OUT=DIR              # on a GPU machine, from a fresh copy of the repository
    make gpu-check DRY_RUN=1 OUT=DIR    # rehearsal on a CPU machine: every section's command, tiny sizes

Written for a machine with no network and no virtualenv: the system python and the torch installed there
(never a second torch), all cores, the native extension built for this GPU's architecture only. Each
section runs as a subprocess with its own time limit; a section that fails or runs over is recorded with
the reason and the next one starts. Missing pytest / ninja come from the wheels in tools/wheels/ (unpacked
into build/gpu-check-site, nothing installed system-wide).

Sections, in order:
  env       python, torch, CUDA, triton, nvcc, the device (name, capability, SMs, memory), optional peers
  deps      pytest and ninja importable / on PATH, from tools/wheels/ when missing
  install   rlhf_fast importable from the checkout (it is on every section's PYTHONPATH; nothing installed)
  build     `setup.py build_ext --inplace` with TORCH_CUDA_ARCH_LIST = this GPU's capability, MAX_JOBS = cores
  tests     pytest on the GPU (TRITON_INTERPRET=0): the tests whose name says gpu, i.e. tests/test_gpu_ops.py
            (every op, every GPU backend, fp32/bf16/fp16, awkward shapes, forward and every gradient) and
            the CUDA-only tests the CPU runs skip; counts, failures and skip reasons from the JUnit XML
  bench     every suite through the benchmark runner (`python -m rlhf_fast.bench`, `rlhf-fast bench` or
            `bench/run.py`, whichever exists), one subprocess per suite: time, GB/s and % of the device's
            peak bandwidth, TFLOP/s, peak memory against eager, torch.compile and flash-attn / Liger
  pipeline  one SFT step and one PPO-ptx iteration of the pipeline's tiny Llama on the GPU

Output in OUT: gpu_check.json (everything), gpu_check.md (the summary), logs/<section>.log (each capped),
tests-junit.xml, bench/<suite>-<device>.csv/.json (the runner's rows). Exit status 1 when a section
failed or ran over (in a dry run: a broken command), else 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "tools" / "wheels"
SITE = ROOT / "build" / "gpu-check-site"  # unpacked wheels (build/ is ignored by git)
LOG_CAP = 2 * 2**20  # bytes of each section log kept (its tail): every output file stays far under 16 MB

# Benchmark suites in the order they run (the most used ops first) and the seconds each may take on the GPU.
BENCH_SUITES = {"gather_logprobs": 30, "linear_logprobs": 30, "linear_ppo_loss": 30, "attention_op": 35,
                "ppo_losses": 20, "gae": 15, "ranking_loss": 15, "attention": 25, "linear": 15}
BENCH_MODES = ("nograd", "fwd+bwd")
# Seconds per section on the GPU; together with the benchmark suites about 7 minutes, inside the 8 asked for.
BUDGETS = {"env": 30, "deps": 30, "install": 60, "build": 170, "tests": 110, "pipeline": 60}
DRY_BUDGETS = {"env": 30, "deps": 30, "install": 60, "build": 60, "tests": 75, "pipeline": 90}
DRY_BENCH_BUDGET = 70
DRY_BENCH_SUITES = ("gae", "ranking_loss")  # the suites a dry run times (fast on CPU)
# The pytest selection: test names that say gpu (tests/test_gpu_ops.py, test_linear_ppo_loss's GPU case),
# not this tool's own test.
TEST_SELECTION = "gpu and not gpu_check"
# Dry run: one shape of a few ops, fp32, on the CPU backends (the full list needs a GPU's speed).
DRY_TEST_SELECTION = "gpu and not gpu_check and fp32 and triton and (kl_penalty or ppo_policy_loss or extreme)"


@dataclass
class Section:
    name: str
    status: str = "not run"  # ok | failed | timeout | skipped
    reason: str = ""
    seconds: float = 0.0
    commands: list = field(default_factory=list)
    data: dict = field(default_factory=dict)


class Check:
    def __init__(self, out: Path, dry_run: bool, total_budget: float):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + total_budget
        self.sections: list[Section] = []
        self.env = dict(os.environ)
        self.env.pop("RLHF_FAST_BACKEND", None)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT)]
                                                 + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env["PATH"] = os.pathsep.join([str(SITE / "bin"), self.env.get("PATH", "")])
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.device = "cpu"
        self.cores = os.cpu_count() or 1

    # -- running commands -------------------------------------------------------------------------------

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, section: Section, cmd: list[str], timeout: float, env: dict | None = None,
            log: str | None = None) -> subprocess.CompletedProcess | None:
        """Runs cmd (list) with the section's environment; the output goes to logs/<log>.log (tail capped).
        Returns the process, or None after a timeout (the section is then marked as run over)."""
        timeout = max(1.0, min(timeout, self.left()))
        section.commands.append({"cmd": " ".join(cmd), "timeout_s": round(timeout)})
        path = self.out / "logs" / f"{log or section.name}.log"
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env or self.env, capture_output=True, text=True,
                                  timeout=timeout, errors="replace")
        except subprocess.TimeoutExpired as e:
            text = _text(e.stdout) + _text(e.stderr)
            _write_capped(path, f"$ {' '.join(cmd)}\n{text}\n[timed out after {timeout:.0f} s]\n", append=True)
            section.status, section.reason = "timeout", f"{' '.join(cmd[:4])}... ran over {timeout:.0f} s"
            section.commands[-1].update(rc=None, seconds=round(time.monotonic() - start, 1))
            section.data.setdefault("partial_output", {})[log or section.name] = text[-20000:]
            return None
        _write_capped(path, f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n[rc {proc.returncode}]\n",
                      append=True)
        section.commands[-1].update(rc=proc.returncode, seconds=round(time.monotonic() - start, 1))
        return proc

    def section(self, name: str, fn, budget: float) -> Section:
        s = Section(name)
        self.sections.append(s)
        start = time.monotonic()
        if self.left() < 5:
            s.status, s.reason = "skipped", "the check's overall time budget was spent"
        else:
            print(f"[gpu-check] {name} (budget {min(budget, self.left()):.0f} s)", flush=True)
            try:
                fn(s, budget)
                if s.status == "not run":
                    s.status = "ok"
            except Exception as e:  # noqa: BLE001 (one broken section must not stop the others)
                s.status, s.reason = "failed", f"{type(e).__name__}: {e}"
        s.seconds = round(time.monotonic() - start, 1)
        print(f"[gpu-check] {name}: {s.status}{' (' + s.reason + ')' if s.reason else ''} in {s.seconds} s",
              flush=True)
        return s

    def python(self, code: str, section: Section, timeout: float, log: str | None = None, env=None):
        return self.run(section, [sys.executable, "-c", code], timeout, env=env, log=log)

    # -- sections ------------------------------------------------------------------------------------

    def env_section(self, s: Section, budget: float) -> None:
        proc = self.python(ENV_PROBE, s, budget)
        if proc is None:
            return
        if proc.returncode != 0:
            s.status, s.reason = "failed", _last_line(proc.stderr)
            return
        s.data = json.loads(proc.stdout.strip().splitlines()[-1])
        s.data["cores"] = self.cores
        if s.data.get("cuda_available"):
            self.device = "cuda"
        elif not self.dry_run:
            s.status, s.reason = "failed", "torch.cuda.is_available() is False: nothing on this machine is a GPU"

    def deps_section(self, s: Section, budget: float) -> None:
        """pytest (and what it needs) and ninja: what is installed, else what tools/wheels/ provides. A dry
        run unpacks every wheel into a scratch folder to prove the set is complete."""
        have = {m: importlib.util.find_spec(m) is not None for m in ("pytest", "pluggy", "iniconfig", "packaging",
                                                                        "pygments")}
        ninja = shutil.which("ninja", path=self.env["PATH"])
        s.data = {"found": {**have, "ninja": ninja}, "unpacked": []}
        target = SITE if not self.dry_run else self.out / "scratch-site"
        wanted = [m for m, ok in have.items() if not ok] + ([] if ninja else ["ninja"])
        if self.dry_run:
            wanted = list(have) + ["ninja"]
        for module in wanted:
            wheel = next(iter(sorted(WHEELS.glob(f"{module}-*.whl"))), None)
            if wheel is None:
                raise RuntimeError(f"{module} is missing and tools/wheels/ has no {module}-*.whl")
            _unpack_wheel(wheel, target)
            s.data["unpacked"].append(wheel.name)
        check = "import pytest, pluggy, iniconfig, packaging, pygments; print(pytest.__version__)"
        env = dict(self.env, PYTHONPATH=os.pathsep.join([str(target), self.env["PYTHONPATH"]]),
                   PATH=os.pathsep.join([str(target / "bin"), self.env["PATH"]]))
        proc = self.python(check, s, budget, env=env)
        if proc is None:
            return
        ninja_ok = subprocess.run(["ninja", "--version"], env=env, capture_output=True, text=True)
        s.data["pytest"] = proc.stdout.strip()
        s.data["ninja"] = ninja_ok.stdout.strip()
        if proc.returncode != 0 or ninja_ok.returncode != 0:
            s.status, s.reason = "failed", _last_line(proc.stderr + ninja_ok.stderr) or "pytest or ninja unusable"

    def install_section(self, s: Section, budget: float) -> None:
        # the checkout is on every section's PYTHONPATH: rlhf_fast (kernels included) imports from it as it
        # is, nothing is installed; the native extension is built in place by the next section
        probe = "import rlhf_fast, rlhf_fast.kernels, rlhf_fast.cli; print(rlhf_fast.__file__)"
        proc = self.python(probe, s, 60)
        if proc is not None and proc.returncode == 0 and str(ROOT) in proc.stdout:
            s.data["how"] = "imported from this checkout (PYTHONPATH)"
            return
        why = _last_line(proc.stderr or proc.stdout) if proc is not None else "the probe did not finish"
        s.status, s.reason = "failed", f"rlhf_fast is not importable from this checkout: {why}"

    def build_section(self, s: Section, budget: float) -> None:
        arch = self.sections[0].data.get("capability") if self.sections else None
        arch = arch or "9.0"  # dry run: the H100/H200 architecture as a stand-in
        env = dict(self.env, TORCH_CUDA_ARCH_LIST=arch, RLHF_FAST_CUDA_ARCHS=arch, MAX_JOBS=str(self.cores))
        s.data.update(arch=arch, max_jobs=self.cores)
        if self.dry_run:
            env["RLHF_FAST_SKIP_NATIVE"] = "1"  # runs setup.py and its knobs; the compile is for the GPU machine
            s.data["note"] = "dry run: setup.py build_ext ran with RLHF_FAST_SKIP_NATIVE=1 (nothing compiled)"
        proc = self.run(s, [sys.executable, "setup.py", "build_ext", "--inplace"], budget - 15, env=env)
        if proc is None:
            return
        if proc.returncode != 0:
            s.status, s.reason = "failed", "build_ext failed: " + _last_line(proc.stderr or proc.stdout)
            return
        if self.dry_run:
            return
        proc = self.python(NATIVE_PROBE, s, 30, log="build-probe")
        if proc is None:
            return
        if proc.returncode != 0:
            s.status, s.reason = "failed", "import after the build: " + _last_line(proc.stderr)
            return
        s.data.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        if not s.data.get("native") or s.data.get("cuda_reasons"):
            s.status = "failed"
            s.reason = "the cuda backend cannot run: " + "; ".join(s.data.get("cuda_reasons") or ["no extension"])

    def tests_section(self, s: Section, budget: float) -> None:
        junit = self.out / "tests-junit.xml"
        env = dict(self.env)
        if self.dry_run:
            env["RLHF_FAST_TEST_DEVICE"] = "cpu"  # the GPU tests' code on CPU tensors and the CPU backends
        else:
            env["TRITON_INTERPRET"] = "0"  # tests/conftest.py sets 1 only when unset: Triton compiles for the GPU
        selection = DRY_TEST_SELECTION if self.dry_run else TEST_SELECTION
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests", "-k", selection, "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        proc = self.run(s, cmd, budget, env=env)
        s.data.update(selection=selection)
        if junit.exists():
            s.data.update(parse_junit(junit))
        if proc is None:
            return
        s.data["rc"] = proc.returncode
        summary = [ln for ln in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
        s.data["summary"] = summary[-1] if summary else _last_line(proc.stdout)
        if proc.returncode not in (0, 1) or not junit.exists():  # 1: tests failed; anything else: pytest broke
            s.status, s.reason = "failed", f"pytest exited {proc.returncode}: {s.data['summary']}"
        elif s.data.get("failed", 0) or s.data.get("errors", 0):
            s.status = "failed"
            s.reason = f"{s.data.get('failed', 0)} failed, {s.data.get('errors', 0)} errors"
        elif not s.data.get("passed"):
            s.status, s.reason = "failed", "no test ran: " + s.data["summary"]

    def bench_runner(self, s: Section) -> list[str]:
        """The benchmark runner's command: the packaged runner, the CLI, or the checkout's bench/run.py,
        whichever answers --help with its options."""
        candidates = [[sys.executable, "-m", "rlhf_fast.bench"], [sys.executable, "-m", "rlhf_fast.cli", "bench"]]
        if (ROOT / "bench" / "run.py").is_file():
            candidates.append([sys.executable, str(Path("bench") / "run.py")])
        tried = []
        for cmd in candidates:
            proc = self.run(s, cmd + ["--help"], 60, log="bench-runner")
            if proc is not None and proc.returncode == 0 and "--ops" in proc.stdout and "--out" in proc.stdout:
                s.data["runner"] = " ".join(cmd[1:])
                return cmd
            tried.append(f"{' '.join(cmd[1:])}: {'timeout' if proc is None else _last_line(proc.stderr)}")
        raise RuntimeError("no benchmark runner answered --help: " + " | ".join(tried))

    def bench_section(self, s: Section, budget: float) -> None:
        runner = self.bench_runner(s)
        s.status, s.reason = "not run", ""  # a timed-out --help probe must not mark the whole section
        out = self.out / "bench"
        s.data["suites"] = {}
        device = self.device
        if self.dry_run:
            # two processes instead of one per suite (the CPU is slow): every suite with its arguments and a
            # case filter that matches nothing, then the two fastest suites for real on their quick cases
            plan = [(list(BENCH_SUITES), ["--cases", "^no case$"], DRY_BENCH_BUDGET / 2),
                    (list(DRY_BENCH_SUITES), ["--quick", "--reps", "1", "--providers", "rlhf_fast", "eager"],
                     DRY_BENCH_BUDGET / 2)]
        else:
            plan = [([suite], [], seconds) for suite, seconds in BENCH_SUITES.items()]
        for suites, extra, seconds in plan:
            args = ["--ops", *suites, "--device", device, "--out", str(out), "--no-plots", "--modes", *BENCH_MODES,
                    *extra]
            if self.left() < 5:
                for suite in suites:
                    s.data["suites"][suite] = {"status": "skipped",
                                               "reason": "the check's overall time budget was spent"}
                continue
            name = suites[0] if len(suites) == 1 else "+".join(suites[:2]) + ("+more" if len(suites) > 2 else "")
            proc = self.run(s, runner + args, seconds, log=f"bench-{name}")
            text = ""
            if proc is None:
                reason = s.reason
                s.status, s.reason = "not run", ""
                text = s.data.get("partial_output", {}).pop(f"bench-{name}", "")
            for suite in suites:
                got = {"status": "ok"}
                s.data["suites"][suite] = got
                rows_file = out / f"{suite}-{device}.json"
                if proc is None:
                    got.update(status="timeout", reason=reason, rows=parse_progress(text, suite))
                elif proc.returncode != 0:
                    got.update(status="failed", reason=_last_line(proc.stderr or proc.stdout))
                elif rows_file.exists():
                    got["rows"] = summarize_rows(json.loads(rows_file.read_text()))
                else:
                    got.update(status="failed", reason=f"the runner wrote no {rows_file.name}")
                if self.dry_run and "^no case$" in extra:
                    got["note"] = "dry run: arguments and suite checked, no case run"
                    if suite in DRY_BENCH_SUITES:
                        continue  # the second process runs it
                elif got["status"] == "ok" and not any(r.get("status") == "ok" for r in got.get("rows", [])):
                    got.update(status="failed", reason="no provider was timed: " + "; ".join(
                        sorted({r.get("status", "") for r in got.get("rows", [])}))[:500])
        s.data.pop("partial_output", None)
        bad = {k: v for k, v in s.data["suites"].items() if v["status"] != "ok"}
        if bad:
            s.status = "timeout" if all(v["status"] == "timeout" for v in bad.values()) else "failed"
            s.reason = "; ".join(f"{k}: {v['status']} ({v.get('reason', '')})" for k, v in bad.items())

    def pipeline_section(self, s: Section, budget: float) -> None:
        result = self.out / "pipeline.json"
        # dry run: the smallest model, the automatic backend only (the torch-backend comparison is for the GPU)
        size = (["--hidden", "32", "--layers", "1", "--batch", "2", "--samples", "2", "--steps", "1",
                 "--backends", "rlhf_fast"] if self.dry_run else [])
        cmd = [sys.executable, str(Path("tools") / "gpu_check.py"), "--pipeline-worker", "--device", self.device,
               "--result", str(result), *size]
        proc = self.run(s, cmd, budget)
        if result.exists():
            s.data.update(json.loads(result.read_text()))
        if proc is None:
            return
        if proc.returncode != 0:
            s.status, s.reason = "failed", _last_line(proc.stderr or proc.stdout)
        elif s.data.get("skipped"):
            s.status, s.reason = "skipped", s.data["skipped"]

    # -- the whole check -------------------------------------------------------------------------------

    def main(self) -> int:
        started = dt.datetime.now(dt.timezone.utc)
        budgets = DRY_BUDGETS if self.dry_run else BUDGETS
        self.section("env", self.env_section, budgets["env"])
        if not self.dry_run and self.device != "cuda":
            for name in ("deps", "install", "build", "tests", "bench", "pipeline"):
                self.sections.append(Section(name, "skipped", "no CUDA device (see env)"))
        else:
            self.section("deps", self.deps_section, budgets["deps"])
            self.section("install", self.install_section, budgets["install"])
            self.section("build", self.build_section, budgets["build"])
            self.section("tests", self.tests_section, budgets["tests"])
            self.section("bench", self.bench_section,
                         DRY_BENCH_BUDGET if self.dry_run else sum(BENCH_SUITES.values()))
            self.section("pipeline", self.pipeline_section, budgets["pipeline"])
        report = {"tool": "tools/gpu_check.py", "dry_run": self.dry_run, "device": self.device,
                  "started": started.isoformat(timespec="seconds"),
                  "seconds": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
                  "commit": _git_commit(), "sections": [asdict(x) for x in self.sections]}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(report))
        shutil.rmtree(self.out / "scratch-site", ignore_errors=True)
        print(f"[gpu-check] report: {self.out / 'gpu_check.md'} and gpu_check.json ({report['seconds']} s)")
        broken = [x for x in self.sections if x.status in ("failed", "timeout")]
        for x in broken:
            print(f"[gpu-check] {x.name}: {x.status}: {x.reason}", file=sys.stderr)
        return 1 if broken else 0


# ---------------------------------------------------------------------------------------------
# Probes run in subprocesses (a broken torch or extension must not take the check down with it)
# ---------------------------------------------------------------------------------------------

ENV_PROBE = r"""
import importlib.util, json, os, platform, shutil, subprocess
import torch
d = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
     "cuda_available": torch.cuda.is_available()}
for m in ("triton", "transformers", "peft", "tokenizers", "liger_kernel", "flash_attn", "pytest", "numpy",
          "matplotlib", "trl", "setuptools", "pip"):
    spec = importlib.util.find_spec(m)
    if spec is None:
        d[m] = None
        continue
    try:
        import importlib.metadata as md
        d[m] = md.version({"liger_kernel": "liger-kernel", "flash_attn": "flash-attn"}.get(m, m))
    except Exception:
        d[m] = "present"
nvcc = shutil.which("nvcc")
if nvcc is None:
    from torch.utils.cpp_extension import CUDA_HOME
    cand = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    nvcc = cand if cand and os.path.exists(cand) else None
d["nvcc"] = nvcc
if nvcc:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    d["nvcc_version"] = out[-1] if out else ""
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    d.update(device=torch.cuda.get_device_name(0), capability=f"{major}.{minor}", sms=p.multi_processor_count,
             memory_GB=round(p.total_memory / 1e9, 1), device_count=torch.cuda.device_count())
print(json.dumps(d))
"""

NATIVE_PROBE = r"""
import json
import torch
import rlhf_fast
avail = rlhf_fast.backends_available("cuda")
print(json.dumps({"native": rlhf_fast.has_native(), "cuda_reasons": avail.get("cuda", []),
                  "triton_reasons": avail.get("triton", []),
                  "extension": __import__("rlhf_fast._C").__file__ if rlhf_fast.has_native() else None}))
"""

# ---------------------------------------------------------------------------------------------
# Parsing what the tools wrote
# ---------------------------------------------------------------------------------------------

def parse_junit(path: Path) -> dict:
    """Counts, the failures (test id and the first lines of the message) and the skip reasons."""
    tree = ElementTree.parse(path)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], {}
    for case in tree.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            el = kinds.get("failure", kinds.get("error"))
            counts["failed" if "failure" in kinds else "errors"] += 1
            message = (el.get("message") or el.text or "").strip()
            failures.append({"test": name, "message": message[:600]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "").strip()[:300]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures[:200], "skip_reasons": skips}


ROW_KEYS = ("op", "case", "mode", "provider", "backend", "median_ms", "peak_MB", "status", "x_GB/s", "x_floor_%",
            "x_TFLOP/s")


def summarize_rows(rows: list[dict]) -> list[dict]:
    """The runner's JSON rows, only the fields of the report, plus every vs_<baseline> speed-up."""
    out = []
    for r in rows:
        keep = {k: r[k] for k in ROW_KEYS if k in r and not _nan(r[k])}
        keep.update({k[2:]: v for k, v in r.items() if k.startswith("x_vs_") and not _nan(v)})
        out.append(keep)
    return out


# "  gather_logprobs case-name              nograd   rlhf_fast[triton]            0.123 ms (IQR 0.1-0.2), peak 1.0 MB"
PROGRESS = re.compile(r"^\s+(?P<op>\S+) (?P<case>.+?)\s+(?P<mode>nograd|fwd\+bwd|fwd|bwd)\s+(?P<provider>\S+)\s+"
                      r"(?P<ms>[0-9.]+|nan) ms \(IQR[^)]*\)(?:, peak (?P<mb>[0-9.]+) MB)?\s*$")


def parse_progress(text: str, suite: str) -> list[dict]:
    """Rows from the runner's progress lines: what a suite measured before it was stopped."""
    rows = []
    for line in text.splitlines():
        m = PROGRESS.match(line)
        if m and m["op"] == suite:
            row = {"op": suite, "case": m["case"].strip(), "mode": m["mode"], "provider": m["provider"],
                   "median_ms": float(m["ms"]), "status": "ok", "from": "progress line (suite stopped)"}
            if m["mb"]:
                row["peak_MB"] = float(m["mb"])
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# The Markdown report
# ---------------------------------------------------------------------------------------------

def _fmt(v, digits=3) -> str:
    if v is None or _nan(v):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(report: dict) -> str:
    secs = {s["name"]: s for s in report["sections"]}
    env = secs.get("env", {}).get("data", {})
    lines = [f"# rlhf_fast GPU check{' (dry run on CPU)' if report['dry_run'] else ''}", "",
             f"{env.get('device', 'no CUDA device')}"
             + (f" (sm_{env['capability'].replace('.', '')}, {env.get('sms')} SMs, {env.get('memory_GB')} GB)"
                if env.get("capability") else "")
             + f"; python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
               f"triton {env.get('triton')}, nvcc {env.get('nvcc_version', env.get('nvcc'))}; transformers "
               f"{env.get('transformers')}, peft {env.get('peft')}, liger_kernel {env.get('liger_kernel')}, "
               f"flash_attn {env.get('flash_attn')}. Commit {report['commit']}, {report['started']}, "
               f"{report['seconds']} s in all.", "",
             "| section | status | seconds | note |", "|---|---|---|---|"]
    for s in report["sections"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['reason'].replace('|', '/')[:300]} |")
    build = secs.get("build", {}).get("data", {})
    if build:
        lines += ["", f"Build: TORCH_CUDA_ARCH_LIST={build.get('arch')}, MAX_JOBS={build.get('max_jobs')}"
                  + (f"; {build['note']}" if build.get("note") else "")
                  + (f"; extension {build['extension']}" if build.get("extension") else "") + "."]
    tests = secs.get("tests", {}).get("data", {})
    if tests:
        lines += ["", "## Tests", "", f"`pytest tests -k \"{tests.get('selection')}\"`: "
                  f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('errors', 0)} "
                  f"errors, {tests.get('skipped', 0)} skipped."]
        for f in tests.get("failures", [])[:40]:
            first = f["message"].splitlines()[0] if f["message"] else ""
            lines.append(f"- FAILED `{f['test']}`: {first[:300]}")
        for reason, n in sorted(tests.get("skip_reasons", {}).items(), key=lambda kv: -kv[1])[:20]:
            lines.append(f"- skipped {n}x: {reason}")
    bench = secs.get("bench", {}).get("data", {})
    if bench.get("suites"):
        lines += ["", "## Benchmarks", "",
                  f"Runner `{bench.get('runner')}`, modes {', '.join(BENCH_MODES)}. GB/s and % of peak: the analytic "
                  "bytes of one call per second, against the device's datasheet bandwidth; TFLOP/s: analytic "
                  "FLOPs per second; MB: peak allocated above the inputs.", "",
                  "| suite | case | mode | provider | ms | GB/s | % peak | TFLOP/s | MB | speed-ups |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        notes = []
        for suite, got in bench["suites"].items():
            if got["status"] != "ok":
                notes.append(f"- {suite}: {got['status']} ({got.get('reason', '')[:300]})")
            for r in got.get("rows", []):
                if r.get("status") != "ok":
                    continue
                ups = ", ".join(f"{k[3:]} {v}x" for k, v in r.items() if k.startswith("vs_"))
                lines.append(f"| {suite} | {r.get('case')} | {r.get('mode')} | {r.get('provider')} | "
                             f"{_fmt(r.get('median_ms'))} | {_fmt(r.get('x_GB/s'))} | {_fmt(r.get('x_floor_%'))} | "
                             f"{_fmt(r.get('x_TFLOP/s'))} | {_fmt(r.get('peak_MB'))} | {ups} |")
            not_run = sorted({f"{r.get('provider')}: {r.get('status')}" for r in got.get("rows", [])
                              if r.get("status") != "ok"})
            notes += [f"- {suite}, not timed: {n[:300]}" for n in not_run[:10]]
        lines += [""] + notes
    pipe = secs.get("pipeline", {}).get("data", {})
    if pipe and not pipe.get("skipped"):
        lines += ["", "## Pipeline", "", f"Model: {pipe.get('model')}.", "",
                  "| backend | SFT step ms | PPO iteration ms | rollout ms | update ms | peak GB |",
                  "|---|---|---|---|---|---|"]
        for name, r in pipe.get("backends", {}).items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'][:200]} | | | | |")
                continue
            lines.append(f"| {name} | {_fmt(r.get('sft_step_ms'))} | {_fmt(r.get('ppo_iteration_ms'))} | "
                         f"{_fmt(r.get('rollout_ms'))} | {_fmt(r.get('update_ms'))} | {_fmt(r.get('peak_GB'))} |")
    elif pipe.get("skipped"):
        lines += ["", f"Pipeline: skipped ({pipe['skipped']})."]
    lines += ["", "Logs of every command: logs/; all figures: gpu_check.json.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The pipeline worker: one SFT step and one PPO-ptx iteration of the tiny Llama
# ---------------------------------------------------------------------------------------------

def pipeline_worker(args) -> int:
    result = {"backends": {}}
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        result["skipped"] = f"transformers is not importable ({e})"
        Path(args.result).write_text(json.dumps(result))
        return 0
    result["model"] = (f"the pipeline's tiny Llama (hidden {args.hidden}, {args.layers} layers, 4 heads / 2 kv heads, "
                       f"the embedded task's vocabulary), {args.batch} prompts x {args.samples} answers per PPO "
                       f"iteration, SFT batch {args.batch * args.samples}, median of {args.steps} after one warm-up")
    for backend in args.backends:
        env = dict(os.environ, RLHF_FAST_BACKEND="torch") if backend == "torch" else dict(os.environ)
        env.pop("RLHF_FAST_BACKEND", None) if backend == "rlhf_fast" else None
        cmd = [sys.executable, __file__, "--pipeline-step", "--device", args.device, "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--batch", str(args.batch), "--samples", str(args.samples),
               "--steps", str(args.steps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            result["backends"][backend] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            result["backends"][backend] = {"error": _last_line(proc.stderr or proc.stdout)}
            sys.stderr.write(proc.stderr)
        Path(args.result).write_text(json.dumps(result))  # what finished survives a timeout of the next
    return 0 if all("error" not in r for r in result["backends"].values()) else 1


def pipeline_step(args) -> int:
    """Times (this process, RLHF_FAST_BACKEND as given) one SFT step and one PPO iteration; prints JSON."""
    import tempfile

    import torch

    from rlhf_fast.pipeline import common as C
    from rlhf_fast.pipeline.config import PPOConfig, SFTConfig
    from rlhf_fast.pipeline.ppo import PPOTrainer
    from rlhf_fast.pipeline.sft import SFTTrainer
    from rlhf_fast.pipeline.task import TopicTask, build_tokenizer, sft_examples

    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    tok = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    task = TopicTask()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        model = C.build_tiny_llama(tok, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_layers=args.layers, num_heads=4, num_kv_heads=2, seed=0)
        C.save_model(model, tok, f"{d}/base")
        n = args.batch * args.samples
        sft = SFTTrainer(SFTConfig(output_dir=f"{d}/sft", batch_size=n, device=args.device, eval_fraction=0.0),
                         model=model, tokenizer=tok, train_data=sft_examples(task, 4 * n, g), progress=False)
        times = []
        for i in range(args.steps + 1):
            batch = sft.batch_at(i)
            sync()
            t0 = time.perf_counter()
            sft.step(batch)
            sync()
            times.append(time.perf_counter() - t0)
        out["sft_step_ms"] = 1e3 * statistics.median(times[1:])
        del sft, model
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        policy = C.load_causal_lm(f"{d}/base")
        rm = C.load_scalar_model(f"{d}/base", pad_token_id=tok.pad_token_id)
        cfg = PPOConfig(output_dir=f"{d}/ppo", prompts_per_iteration=args.batch, samples_per_prompt=args.samples,
                        minibatch_size=max(1, n // 2), device=args.device, eval_every=0)
        ppo = PPOTrainer(cfg, policy=policy, reward_model=rm, tokenizer=tok,
                         prompts=[{"prompt": p} for p in task.prompts(256, g)], ptx_data=sft_examples(task, 256, g),
                         progress=False)
        steps = [ppo.step() for _ in range(args.steps + 1)][1:]
        out["ppo_iteration_ms"] = 1e3 * statistics.median(s["step_s"] for s in steps)
        out["rollout_ms"] = 1e3 * statistics.median(s["rollout_s"] for s in steps)
        out["update_ms"] = out["ppo_iteration_ms"] - out["rollout_ms"]
        if cuda:
            out["peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    import rlhf_fast

    out["backend_env"] = os.environ.get("RLHF_FAST_BACKEND", "automatic")
    out["native"] = rlhf_fast.has_native()
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _unpack_wheel(wheel: Path, target: Path) -> None:
    """A wheel is a zip of the installed files: its packages go to target/, its scripts (ninja) to
    target/bin/, executable."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "bin").mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if info.is_dir():
                continue
            if len(parts) >= 3 and parts[0].endswith(".data") and parts[1] == "scripts":
                dest = target / "bin" / parts[-1]
                dest.write_bytes(z.read(info))
                dest.chmod(0o755)
            elif not parts[0].endswith(".data"):
                z.extract(info, target)


def _write_capped(path: Path, text: str, append: bool = False) -> None:
    old = path.read_text(errors="replace") if append and path.exists() else ""
    text = old + text
    if len(text) > LOG_CAP:
        text = f"[first {len(text) - LOG_CAP} characters cut]\n" + text[-LOG_CAP:]
    path.write_text(text)


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check-out", help="folder for gpu_check.json/.md, logs and bench rows")
    ap.add_argument("--dry-run", action="store_true", help="rehearse every section on CPU with tiny sizes")
    ap.add_argument("--total-budget", type=float, default=None,
                    help="seconds for the whole check (default 470 on a GPU, 260 in a dry run)")
    ap.add_argument("--pipeline-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pipeline-step", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--backends", nargs="+", default=["rlhf_fast", "torch"], choices=["rlhf_fast", "torch"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pipeline_worker:
        return pipeline_worker(args)
    if args.pipeline_step:
        return pipeline_step(args)
    out = Path(args.out).resolve()
    budget = args.total_budget or (260.0 if args.dry_run else 470.0)
    return Check(out, args.dry_run, budget).main()


if __name__ == "__main__":
    sys.exit(main())
