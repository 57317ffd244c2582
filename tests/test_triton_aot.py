"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90a, without a GPU.

Runs ``python -m rlhf_fast.kernels._inspect_cli --json --no-cuda`` (``rlhf-fast inspect`` for the Triton kernels) in a
subprocess with TRITON_INTERPRET removed (under
the interpreter @triton.jit gives objects that cannot be compiled), then checks every configuration
the launchers of every op use: it compiles for both archs, spills nothing, and its report is
well-formed. Compiles are cached by triton (~/.triton/cache): ~35 s cold, ~15 s warm on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile ahead of time")

ARCHS = ("sm_80", "sm_90a")
# Vocabularies whose rows are 16-byte aligned (V % 16 == 0): their streaming loads must be 128-bit.
ALIGNED_VOCAB = "V=32000"


def _env_without_interpreter() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _expected_labels() -> set[str]:
    # Building the specs compiles nothing, so this also works in a TRITON_INTERPRET=1 test process.
    from rlhf_fast.kernels._aot import all_specs

    return {spec.label for spec in all_specs()}


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.kernels._inspect_cli", "--json", "--no-cuda"],
                          env=_env_without_interpreter(), capture_output=True, text=True, timeout=600)
    # exit status 1 means "some kernel spills": the reports still come out and the tests name it
    assert proc.returncode in (0, 1), f"AOT compile failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    assert report["cuda"] == [] and report["cuda_note"], "--no-cuda compiled CUDA sources"
    return report["triton"]


def test_every_spec_compiles_for_every_arch(reports):
    got = {(r["spec"], r["arch"]) for r in reports}
    want = {(label, arch) for label in _expected_labels() for arch in ARCHS}
    assert got == want, f"missing: {sorted(want - got)}; unexpected: {sorted(got - want)}"


# Known with triton 3.6 only (the GPU images' version; README, Requirements): at sm_80 the 16-bit D=64 dK/dV
# kernel (128-key tile, 8 warps) takes 255 registers and an 8-byte stack frame, no local-memory spill; sm_90a is
# clean, and so is sm_80 from triton 3.7 on.
_TRITON_36_SM80 = {"attention_bwd_dkdv [bfloat16 D=64 causal]", "attention_bwd_dkdv [bfloat16 D=64 shared-prefix]"}


def _known(r) -> bool:
    from rlhf_fast.backends import INTERPRETER_MIN_TRITON, _triton_version, _version_tuple

    return (_version_tuple(_triton_version()) < INTERPRETER_MIN_TRITON and r["arch"] == "sm_80"
            and r["spec"] in _TRITON_36_SM80 and r["local_bytes"] == 0 and r["stack_bytes"] <= 8)


def test_no_register_spills(reports):
    spilled = [f"{r['spec']} on {r['arch']}: LOCAL={r['local_bytes']} STACK={r['stack_bytes']} "
               f"({r['registers']} registers)" for r in reports
               if (r["local_bytes"] or r["stack_bytes"]) and not _known(r)]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    assert all(r["spills"] is False for r in reports if not _known(r))


def test_reports_are_well_formed(reports):
    for r in reports:
        where = f"{r['spec']} on {r['arch']}"
        assert r["kernel"].startswith("_") and r["kernel"].endswith("_kernel"), where
        assert 0 < r["registers"] <= 255, where
        assert r["num_warps"] in (1, 2, 4, 8, 16, 32), where
        assert r["shared_bytes"] == r["static_shared_bytes"] + r["dynamic_shared_bytes"] >= 0, where
        assert r["shared_bytes"] <= 228 * 1024, where  # fits an H100 SM
        assert r["ldg_widths"] and r["stg_widths"], f"{where}: no global loads/stores found in the SASS"
        assert set(r["ldg_widths"]) <= {8, 16, 32, 64, 128} and set(r["stg_widths"]) <= {8, 16, 32, 64, 128}
        if r["requires_tensor_cores"]:
            assert r["tensor_core_ops"], f"{where}: a tl.dot kernel without tensor-core MMA instructions"
        else:
            assert r["tensor_core_ops"] == [], f"{where}: unexpected tensor-core instructions (no tl.dot here)"
        assert r["sass_instructions"] > 0, where
        if ALIGNED_VOCAB in r["spec"]:
            assert r["ldg128"], f"{where}: rows are 16-byte aligned but loads are {r['ldg_widths']} bits"


def test_aot_refuses_to_run_under_the_interpreter():
    env = dict(_env_without_interpreter(), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.kernels._inspect_cli"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr


def test_specs_follow_launch_time_specialization():
    """Specs type scalars as triton.jit does at launch: i32 with a divisibility hint for V = 32000,
    none for V = 50257, and V = 1 specialized into a constexpr."""
    import torch

    from rlhf_fast.kernels import gather_logprobs as G

    by_vocab = {}
    for vocab in (32000, 50257, 1):
        (spec,) = [s for s in G.aot_specs(vocabs=(vocab,), dtypes=(torch.bfloat16,))
                   if s.name == "gather_logprobs_fwd"]
        by_vocab[vocab] = spec
    aligned, odd, one = by_vocab[32000], by_vocab[50257], by_vocab[1]
    assert aligned.signature["logits_ptr"] == "*bf16" and aligned.signature["n_cols"] == "i32"
    assert aligned.attrs["n_cols"] == [["tt.divisibility", 16]]
    assert "n_cols" not in odd.attrs and "stride_row" not in odd.attrs
    assert one.signature["n_cols"] == "constexpr" and one.constexprs["n_cols"] == 1
    assert aligned.constexprs["BLOCK_V"] == G.launch_config(32000, G.FWD_MAX_BLOCK)[0]
