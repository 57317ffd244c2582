"""The GPU check's rehearsal (`make gpu-check DRY_RUN=1`), fast core: its parsers and report on known
input, and the sections whose commands are quick here (env, deps, install, build's setup.py run) must
succeed and write the JSON and Markdown report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


def test_parse_progress_keeps_rows_of_a_stopped_suite():
    text = ("  gather_logprobs 8192x32000-bf16                nograd   rlhf_fast[triton]             0.512 ms "
            "(IQR 0.500-0.520), peak 12.0 MB\n  gather_logprobs other line\n"
            "  gae 256x2048 fwd+bwd eager 1.000 ms (IQR 0.9-1.1)\n")
    rows = gpu_check.parse_progress(text, "gather_logprobs")
    assert rows == [{"op": "gather_logprobs", "case": "8192x32000-bf16", "mode": "nograd",
                     "provider": "rlhf_fast[triton]", "median_ms": 0.512, "status": "ok",
                     "from": "progress line (suite stopped)", "peak_MB": 12.0}]


def test_parse_junit_counts_and_reasons(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="t1"/>'
                   '<testcase classname="a" name="t2"><failure message="boom">trace</failure></testcase>'
                   '<testcase classname="a" name="t3"><skipped message="no cuda"/></testcase>'
                   '<testcase classname="a" name="t4"><skipped message="no cuda"/></testcase>'
                   '</testsuite></testsuites>')
    got = gpu_check.parse_junit(xml)
    assert (got["passed"], got["failed"], got["errors"], got["skipped"]) == (1, 1, 0, 2)
    assert got["failures"] == [{"test": "a::t2", "message": "boom"}]
    assert got["skip_reasons"] == {"no cuda": 2}


@pytest.mark.slow
def test_dry_run_core(tmp_path):
    check = gpu_check.Check(tmp_path, dry_run=True, total_budget=150)
    check.section("env", check.env_section, 60)
    for name, fn in (("deps", check.deps_section), ("install", check.install_section),
                     ("build", check.build_section)):
        check.section(name, fn, 90)
    bad = {s.name: s.reason for s in check.sections if s.status not in ("ok", "skipped")}
    assert not bad, bad
    assert check.sections[2].data["how"]
    report = {"dry_run": True, "device": check.device, "started": "now", "seconds": 0, "commit": "x",
              "sections": [gpu_check.asdict(s) for s in check.sections]}
    text = gpu_check.markdown(report)
    assert "| build | ok |" in text
    json.dumps(report, default=str)
