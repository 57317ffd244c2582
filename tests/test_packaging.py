"""The wheel holds the whole package: every module of rlhf_fast/ and of kernels/ (as rlhf_fast.kernels), and
nothing at the top level but rlhf_fast. `make test` runs on an editable install, which cannot show a package
left out of the wheel; this builds the pure-Python part of the wheel (no native extension, seconds) and
reads its file list. .ci/wheel_smoke.sh installs the full wheel and runs every command from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_and_only_rlhf_fast(tmp_path):
    env = dict(os.environ, RLHF_FAST_SKIP_NATIVE="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(tmp_path), str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("rlhf_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rlhf_fast"}, top  # never a top-level `kernels` (transformers imports that name); bench/ stays
    want = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rlhf_fast").rglob("*.py")}
    assert not want - names, sorted(want - names)
    for module in ("pipeline/__init__.py", "integrations/__init__.py", "bench/run.py", "bench/suites.py",
                   "kernels/_aot.py"):
        assert f"rlhf_fast/{module}" in names, module
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "rlhf-fast = rlhf_fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
