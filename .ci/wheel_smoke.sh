#!/usr/bin/env bash
# The installed wheel works: build the wheel, install it into a fresh virtualenv outside the checkout and run
# every command from a directory that is not the checkout. `make wheel-check` runs it; CI runs it before
# `make test` (whose editable install cannot show a package missing from the wheel).
#
#   PY             the Python of the Makefile's venv (torch, setuptools, wheel, ninja): builds the wheel
#   PYTHON         the base interpreter of the fresh venv (default python3)
#   RLHF_FAST_WHEEL  an already built wheel to test instead of building one
#   KEEP_SMOKE_DIR=1 leave the temporary directory (venv, run outputs) for a look afterwards
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d)"
if [ "${KEEP_SMOKE_DIR:-0}" = 1 ]; then echo "wheel smoke: keeping $TMP"; else trap 'rm -rf "$TMP"' EXIT; fi
step() { echo; echo "== wheel smoke: $*"; }
unset PYTHONPATH  # the fresh venv must find rlhf_fast only where the wheel put it

# The torch the wheel is built against; the native extension only loads into this same torch.
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"

# --- 1. the wheel ------------------------------------------------------------------------------------
if [ -n "${RLHF_FAST_WHEEL:-}" ]; then
  WHEEL="$(realpath "$RLHF_FAST_WHEEL")"
else
  step "building the wheel against torch $TORCH_VERSION"
  (cd "$ROOT" && "$PY" -m pip wheel --no-build-isolation --no-deps -q -w "$TMP/dist" .)
  WHEEL="$(ls "$TMP"/dist/rlhf_fast-*.whl)"
fi
echo "wheel: $WHEEL"

step "what the wheel holds"
"$PY" - "$WHEEL" "$ROOT" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheel, root = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
problems = [f"top-level entries {top}, expected only rlhf_fast"] if top != ["rlhf_fast"] else []
# every module of the source tree is in the wheel
want = {p.relative_to(root).as_posix() for p in (root / "rlhf_fast").rglob("*.py")}
missing = sorted(want - names)
if missing:
    problems.append(f"missing from the wheel: {missing}")
native = sorted(n for n in names if n.startswith("rlhf_fast/_C") and n.endswith(".so"))
print(f"{len(names)} files; top level {top}; native extension {native or 'none'}")
if problems:
    sys.exit("wheel smoke: " + "; ".join(problems))
EOF

# --- 2. a fresh virtualenv outside the checkout, with the wheel's [pipeline,bench] extras ------------
step "installing into a fresh virtualenv in $TMP/venv"
if "$PYTHON" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  # the base interpreter has this torch: share it rather than install a second copy, but only if it cannot
  # also hand the venv an rlhf_fast of its own (an editable install of the checkout, say)
  if "$PYTHON" -c "import rlhf_fast" 2>/dev/null; then
    echo "wheel smoke: $PYTHON already imports rlhf_fast; a --system-site-packages venv would not test the wheel" >&2
    exit 1
  fi
  "$PYTHON" -m venv --system-site-packages "$TMP/venv"
else
  "$PYTHON" -m venv "$TMP/venv"
  # first, so the wheel's torch requirement is already met and pip has no reason to fetch another build
  "$TMP/venv/bin/python" -m pip install -q "torch==$TORCH_VERSION"
fi
VPY="$TMP/venv/bin/python"
# torch pinned again: a resolver that wanted to replace it fails here instead of installing a CUDA build
"$VPY" -m pip install -q "$WHEEL[pipeline,bench]" "torch==$TORCH_VERSION"

mkdir -p "$TMP/work"
cd "$TMP/work"  # not the checkout: nothing may come from the source tree
export PATH="$TMP/venv/bin:$PATH"

step "import rlhf_fast resolves to the installed wheel"
"$VPY" - "$TMP/venv" "$ROOT" "$TORCH_VERSION" <<'EOF'
import os
import sys

import torch

import rlhf_fast

venv, root, torch_version = os.path.realpath(sys.argv[1]), os.path.realpath(sys.argv[2]), sys.argv[3]
where = os.path.realpath(rlhf_fast.__file__)
print(f"rlhf_fast {rlhf_fast.__version__} from {where}; torch {torch.__version__} from {torch.__file__}")
if not where.startswith(venv + os.sep) or where.startswith(root + os.sep):
    sys.exit(f"wheel smoke: rlhf_fast imported from {where}, expected the wheel installed under {venv}")
if torch.__version__.split("+")[0] != torch_version:
    sys.exit(f"wheel smoke: torch {torch.__version__} in the venv, expected the build's {torch_version}")
EOF

step "rlhf-fast info"
rlhf-fast info | tee "$TMP/info.txt"
if "$PY" -c "import sys, zipfile; sys.exit(not any(n.startswith('rlhf_fast/_C') for n in zipfile.ZipFile('$WHEEL').namelist()))"
then
  grep -q "native extension: built" "$TMP/info.txt" || { echo "wheel smoke: the wheel's native extension did not load" >&2; exit 1; }
fi

step "rlhf-fast pipeline (the toy model, a few steps per stage)"
rlhf-fast pipeline --preset tiny --output_dir "$TMP/run" --quiet \
  --sft.max_steps 2 --rm.max_steps 2 --ppo.iterations 1 \
  --task.num_sft 64 --task.num_rm_prompts 16 --task.num_ppo_prompts 16 --task.num_eval_prompts 8
ls "$TMP/run"

step "rlhf-fast bench (one op, its smallest case)"
rlhf-fast bench --ops ranking_loss --quick --cases K=4 --providers rlhf_fast eager --modes nograd fwd+bwd \
  --reps 2 --no-plots --out "$TMP/bench"
test -s "$TMP/bench/ranking_loss-cpu.csv"

step "rlhf-fast inspect (one kernel)"
rlhf-fast inspect --no-cuda --arch 90 --kernels '^ranking_loss_finalize'

step "every module of the installed package imports"
"$VPY" - <<'EOF'
import importlib
import pkgutil
import sys
import traceback

import rlhf_fast

failed = []  # walk_packages imports each package to look inside it; onerror gets those that fail
names = ["rlhf_fast"] + [m.name for m in pkgutil.walk_packages(rlhf_fast.__path__, "rlhf_fast.", onerror=failed.append)]
for name in names:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 (every failure is reported, then the run fails)
        if name not in failed:
            failed.append(name)
        traceback.print_exc()
print(f"{len(set(names) - set(failed))} of {len(names)} modules import")
if failed:
    sys.exit(f"wheel smoke: these modules of the installed package fail to import: {failed}")
EOF

step "passed"
