"""The benchmark and inspection machinery (`rlhf-fast bench`, `rlhf-fast inspect`), on tiny inputs.

Timings themselves are not asserted (CI machines are noisy); what is: rows carry the required fields,
wrong results are caught before timing, fallbacks are labelled by the backend that ran, the analytic
cost model matches hand counts, the occupancy rule, and inspect's JSON for one compiled kernel.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from rlhf_fast.bench import run
from rlhf_fast.bench.common import MODES, Skip, Timed, Workload, compare, mode_fn, results, time_cpu_interleaved
from rlhf_fast.kernels import _aot, _cost, _inspect

ENV_FIELDS = ("device", "device_type", "torch", "triton", "rlhf_fast", "cpu_capability", "commit", "timestamp")
ROW_FIELDS = ("op", "case", "mode", "provider", "backend", "median_ms", "q1_ms", "q3_ms", "status")


# ---------------------------------------------------------------------------------------------
# A whole quick run through the command line: rows, CSV/JSON fields, derived metrics
# ---------------------------------------------------------------------------------------------

def test_quick_run_writes_csv_and_json_rows(tmp_path):
    rc = run.main(["--ops", "ranking_loss", "--quick", "--cases", "K=4", "--providers", "rlhf_fast", "eager",
                   "--modes", "nograd", "fwd+bwd", "--reps", "2", "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    rows = json.loads((tmp_path / "ranking_loss-cpu.json").read_text())
    with open(tmp_path / "ranking_loss-cpu.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(rows) == len(csv_rows) == 4  # 2 providers x 2 modes
    for row in rows:
        for key in ROW_FIELDS + ENV_FIELDS:
            assert key in row and row[key] not in (None, ""), key
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        assert row["x_GB/s"] > 0 and 0 < row["x_floor_%"], row  # bandwidth-bound: GB/s and % of the floor
        assert row["x_sweep:K"] == 4
    fused = [r for r in rows if r["provider"].startswith("rlhf_fast")]
    assert {r["provider"] for r in fused} == {f"rlhf_fast[{fused[0]['backend']}]"}
    assert all(r["x_vs_eager"] > 0 for r in fused)  # speed-up over each baseline


def _fake_suite(outputs_scale: dict[str, float]):
    """A suite with one case whose providers scale the reference's output: 1.0 agrees, else disagrees."""
    class Case:
        name = "n=64"
        n = 64

    def workload(provider, case, device):
        if provider == "absent":
            raise Skip("not installed here")
        scale = outputs_scale[provider]
        return Workload(lambda x: x * 2 * scale, [torch.arange(64.0)], f"be-{provider}", lambda y: y.sum())

    return types.SimpleNamespace(
        OP="fake", MODES=MODES, QUICK_CASES=[Case()], CASES=[Case()], FUSED_PROVIDERS=["good"],
        providers=lambda device: ["bad", "absent"], workload=workload,
        reference=lambda case, device: Workload(lambda x: x * 2, [torch.arange(64.0)], "torch", lambda y: y.sum()),
        cost=lambda case: dict(tokens=case.n, dtype="fp32"), COST_OP="kl_penalty")


def test_wrong_results_are_reported_not_timed_and_skips_carry_the_reason():
    rows = run.run_suite("fake", _fake_suite({"good": 1.0, "bad": 1.01}), "cpu", quick=True, reps=2, floor_bw=1e10)
    by = {}
    for r in rows:
        by.setdefault(r.provider, []).append(r)
    assert [r.mode for r in by["good"]] == list(MODES) and all(r.status == "ok" for r in by["good"])
    assert all(r.status.startswith("wrong result") and math.isnan(r.median_ms) for r in by["bad"])
    assert all(r.status == "skipped: not installed here" for r in by["absent"])


def test_compare_checks_outputs_and_gradients():
    w = Workload(lambda x: (x * 3, None), [torch.ones(4)], "t", lambda out: out[0].sum())
    same = results(w, True)
    assert compare(same, same) is None
    off = {"outputs": [same["outputs"][0] * 1.1, None], "grads": same["grads"]}
    assert "outputs[0]" in compare(off, same)
    bad_grad = {"outputs": same["outputs"], "grads": [g + 1 for g in same["grads"]]}
    assert "grads[0]" in compare(bad_grad, same)


def test_bwd_mode_times_only_the_backward():
    calls = {"fwd": 0}

    def fwd(x):
        calls["fwd"] += 1
        return x * 2

    timed = mode_fn(Workload(fwd, [torch.ones(3)], "t", lambda y: y.sum()), "bwd")
    timed.setup()
    assert calls["fwd"] == 1
    timed.fn()  # only the backward: no forward inside the timed call
    assert calls["fwd"] == 1


# ---------------------------------------------------------------------------------------------
# Fallback labelling
# ---------------------------------------------------------------------------------------------

def test_cpu_timing_interleaves_the_providers():
    calls = []
    timeds = {k: Timed(lambda k=k: calls.append(k)) for k in "abc"}
    got = time_cpu_interleaved(timeds, warmup=1, reps=4)
    assert calls[:3] == ["a", "b", "c"]  # the warm-ups
    assert calls[3:] == list("abc" "bca" "cab" "abc")  # round-robin, rotating who goes first
    assert set(got) == set("abc") and all(t.reps == 4 and t.median_ms >= 0 for t in got.values())


def test_fallback_is_reported_as_the_backend_that_ran(monkeypatch):
    from rlhf_fast import _native
    from rlhf_fast.bench import bench_gather_logprobs as B

    case = B.Case(8, 16, torch.float32)
    monkeypatch.setattr(_native, "has_native", lambda: False)  # as if rlhf_fast._C had not been built
    w = B.workload("rlhf_fast", case, "cpu")
    assert (w.backend, w.label) == ("torch", "rlhf_fast[torch]")
    with pytest.raises(Skip, match="cpu"):
        B.workload("rlhf_fast[cpu]", case, "cpu")


@pytest.mark.skipif(not __import__("rlhf_fast").has_native(), reason="native extension not built")
def test_automatic_choice_is_labelled_once_by_its_backend():
    from rlhf_fast.bench import bench_gather_logprobs as B

    w = B.workload("rlhf_fast", B.Case(8, 16, torch.float32), "cpu")
    assert (w.backend, w.label) == ("cpu", "rlhf_fast[cpu]")
    assert run.providers(B, "cpu")[:2] == ["rlhf_fast", "rlhf_fast[cpu]"]


# ---------------------------------------------------------------------------------------------
# Analytic cost model against hand counts
# ---------------------------------------------------------------------------------------------

def test_cost_model_hand_counts():
    c = _cost.op_cost("gather_logprobs", "fwd", n=2, vocab=10, dtype="bf16")
    assert c.bytes == 2 * 10 * 2 + 8 * 2 + 4 * 2 and c.flops == 4 * 20 and c.tensor_flops == 0
    assert _cost.op_cost("gather_logprobs", "nograd", n=2, vocab=10, dtype="bf16") == c
    c = _cost.op_cost("linear_logprobs", "fwd", n=4, hidden=8, vocab=16, dtype="bf16")
    assert c.tensor_flops == 2 * 4 * 8 * 16 and c.bytes == (4 + 16) * 8 * 2 + 12 * 4
    assert _cost.op_cost("linear_logprobs", "bwd", n=4, hidden=8, vocab=16, dtype="bf16").tensor_flops == 3 * 1024
    c = _cost.op_cost("linear", "fwd+bwd", m=4, k=8, n=16, dtype="fp32")  # 1 + 2 GEMMs
    assert c.tensor_flops == 3 * 2 * 4 * 8 * 16 and c.bytes == 4 * ((32 + 128 + 64) + (64 + 64 + 256))
    # attention, one causal sequence of 4 tokens: 1 + 2 + 3 + 4 = 10 visible pairs per head
    shape = _cost.attention_shape("dense", batch=1, heads=2, seqlen=4, head_dim=8)
    assert shape["pairs"] == 10
    fwd = _cost.op_cost("attention", "fwd", **shape)
    assert fwd.tensor_flops == 4 * 2 * 8 * 10
    assert fwd.bytes == 2 * (4 * 2 * 8 * 2) + 2 * (4 * 2 * 8 * 2) + 4 * 2 * 4  # q, o; k, v; lse
    assert _cost.op_cost("attention", "fwd+bwd", **shape).tensor_flops == 3.5 * fwd.tensor_flops
    assert _cost._pairs_causal(3, 5) == 3 + 4 + 5  # bottom-right: query i sees i + S - T + 1 keys
    # the issue-5 shape: B=8 H=32 T=2048 D=128 causal, forward 4 H D pairs = 274.9 GFLOP
    big = _cost.attention_shape("dense", batch=8, heads=32, seqlen=2048, head_dim=128)
    assert _cost.op_cost("attention", "fwd", **big).tensor_flops == 4 * 32 * 128 * 8 * 2048 * 2049 // 2


def test_time_at_peak_is_the_roofline_bound():
    mem = _cost.estimate(_cost.Cost(bytes=3.35e12))
    assert mem["H100_us"] == pytest.approx(1e6) and mem["H100_bound"] == "memory"
    assert mem["H200_us"] == pytest.approx(3.35 / 4.8 * 1e6)
    comp = _cost.estimate(_cost.Cost(bytes=1.0, tensor_flops=989e12))
    assert comp["H100_us"] == pytest.approx(1e6) and comp["H100_bound"] == "compute"
    row = next(r for r in _cost.attention_table() if r["shape"].startswith("dense causal B=8 H=32 T=2048 D=128")
               and r["mode"] == "fwd+bwd")
    assert row["ms @989TF"] == pytest.approx(row["GFLOP"] / 989)  # GFLOP / (TFLOP/s) = ms
    assert row["ms @330TF"] == pytest.approx(row["GFLOP"] / 330)


def test_every_triton_kernel_has_a_cost():
    names = {spec.name for spec in _aot.all_specs()}
    assert names and all(_cost.kernel_base(n)[0] in _cost.KERNEL_OPS for n in names), names
    rows = _cost.kernel_estimates(names)
    assert {r["kernel"] for r in rows} == names and all(r["H100_us"] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# Occupancy, resource parsing, inspect's JSON
# ---------------------------------------------------------------------------------------------

def test_occupancy_limits():
    # 128 registers x 32 threads = 4096 per warp: 16 warps per SM, 4 CTAs of 4 warps
    assert _inspect.occupancy("sm_90a", 128, 4) == {"occupancy": 0.25, "warps_per_sm": 16, "ctas_per_sm": 4,
                                                 "limiter": "registers"}
    # 100 KB + the 1 KB reservation: one CTA fits in sm_80's 164 KB
    occ = _inspect.occupancy("sm_80", 32, 8, 100 * 1024)
    assert (occ["ctas_per_sm"], occ["limiter"], occ["occupancy"]) == (1, "shared", 0.125)
    assert _inspect.occupancy("sm_80", 32, 4)["occupancy"] == 1.0
    assert _inspect.occupancy("sm_90", 72, None) == {"occupancy": 0.438, "warps_per_sm": 28, "limiter": "registers",
                                                  "ctas_per_sm": None}


def test_cuda_resource_usage_parsing():
    text = """
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN9rlhf_fast4cuda26gather_logprobs_bwd_kernelIfLb0EEEvPKT_:
  REG:48 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9rlhf_fast4cuda26gather_logprobs_fwd_kernelIfLi512ELi512EEEvPKT_:
  REG:55 STACK:8 SHARED:1216 LOCAL:4 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    found = _inspect._RES_FUNCTION.findall(text)
    assert [f[1:] for f in found] == [("48", "0", "0", "0"), ("55", "8", "1216", "4")]
    sass = "\t\tFunction : _Zk1\n /*0010*/ LDG.E.128 R4, desc[UR4][R2.64] ;\n /*0020*/ HMMA.16816.F32 R0, R4 ;\n"
    features = _inspect.sass_features(_inspect._split_functions(sass)["_Zk1"])
    assert features["ldg_widths"] == (128,) and features["tensor_core_ops"] == ("HMMA",)


@pytest.mark.skipif(_inspect.cuobjdump_path() is None, reason="no cuobjdump (triton wheel or CUDA toolkit)")
def test_inspect_json_for_one_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.kernels._inspect_cli", "--json", "--no-cuda",
                           "--arch", "90", "--kernels", "^ranking_loss_finalize"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report) >= {"triton", "cuda", "cuda_note", "summary", "kernel_estimates", "op_estimates", "failures"}
    (kernel,) = report["triton"]
    assert kernel["arch"] == "sm_90a" and kernel["kernel"] == "_ranking_loss_finalize_kernel"
    assert 0 < kernel["registers"] <= 255 and kernel["spills"] is False and kernel["missing_tensor_cores"] is False
    assert 0 < kernel["occupancy"] <= 1 and kernel["limiter"] and kernel["ldg_widths"]
    assert report["failures"] == [] and report["cuda"] == []
    assert [r["kernel"] for r in report["kernel_estimates"]] == ["ranking_loss_finalize"]


# ---------------------------------------------------------------------------------------------
# README blocks and plots
# ---------------------------------------------------------------------------------------------

def test_readme_blocks_replace_and_insert(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:a:cpu:start -->\nold\n<!-- bench:a:cpu:end -->\n<!-- bench:cpu:more -->\n")
    run.update_readme_tables({"a": "new a", "b": "new b"}, "cpu", readme)
    text = readme.read_text()
    assert "old" not in text and "new a" in text
    assert text.index("### b, CPU") < text.index("<!-- bench:b:cpu:start -->\nnew b\n<!-- bench:b:cpu:end -->") \
        < text.index("<!-- bench:cpu:more -->")
    run.update_readme_tables({"b": "newer b"}, "cpu", readme)
    assert readme.read_text().count("### b, CPU") == 1 and "newer b" in readme.read_text()


def test_plots_one_line_per_provider(tmp_path):
    pytest.importorskip("matplotlib")
    from rlhf_fast.bench.common import Row

    rows = [Row("op", f"V={v}", "nograd", p, p, ms * v, ms * v, ms * v, extra={"sweep:vocab": v, "series:vocab": "N=8"})
            for v in (8, 16, 32) for p, ms in (("rlhf_fast[cpu]", 1.0), ("eager", 3.0))]
    (path,) = run.plot(rows, tmp_path, "cpu")
    assert path.suffix == ".png" and path.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# The runner ships inside the package: no checkout, no import circle
# ---------------------------------------------------------------------------------------------

def test_memory_probe_imports_the_suites_not_the_runner():
    code = ("import sys, rlhf_fast.bench.memory, rlhf_fast.bench.suites; "
            "assert 'rlhf_fast.bench.run' not in sys.modules, sorted(m for m in sys.modules if 'bench' in m)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_memory_probe_runs_in_a_fresh_process_from_any_directory(tmp_path, monkeypatch):
    from rlhf_fast.bench import memory

    monkeypatch.chdir(tmp_path)
    got = memory.measure("ranking_loss", "eager", 2, "nograd", "cpu", quick=True, timeout=300)
    assert "peak_bytes" in got and got["peak_bytes"] >= 0 and got["backend"], got


def test_cli_bench_runs_outside_the_checkout(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "bench", "--ops", "ranking_loss", "--quick",
                           "--cases", "K=4", "--providers", "eager", "--modes", "nograd", "--reps", "1", "--no-plots",
                           "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out" / "ranking_loss-cpu.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["provider"], row["mode"], row["status"]) == ("eager", "nograd", "ok")


def test_update_readme_asks_for_an_existing_readme(tmp_path, capsys):
    missing = tmp_path / "README.md"
    with pytest.raises(SystemExit) as exc:
        run.main(["--ops", "--update-readme", "--readme", str(missing)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--readme" in err and str(missing) in err, err
