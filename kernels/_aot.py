"""Ahead-of-time compilation and inspection of the Triton kernels, without a GPU.

Each op module exposes ``aot_specs()``: the kernel configurations its launchers use (signature as
triton.jit specializes it at launch, constexprs, num_warps, num_stages). Here every spec is compiled
with ``triton.compile`` for a ``GPUTarget`` (sm_80 and sm_90a by default), the cubin is read back with
the ``cuobjdump`` shipped in the triton wheel, and we report per kernel and arch:

  registers     REG of ``cuobjdump -res-usage`` (per thread)
  spills        LOCAL (local memory per thread) and STACK bytes; both are 0 for a kernel that fits
  shared        static SHARED of the cubin + the dynamic shared memory triton launches with (on
                sm_90 the cubin of a kernel using shared memory declares the 1 KB per-CTA system
                reservation as static SHARED)
  ldg128        whether the SASS has 128-bit global loads (LDG.E.128, or LDGSTS.128: the cp.async
                copies into shared memory with which tl.dot kernels load their operand tiles)
  tensor cores  HMMA / HGMMA / IMMA / WGMMA instructions, if any

Run ``python -m rlhf_fast.kernels._aot`` for the table of every op (exit status 1 if any kernel
spills). It must run without ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` returns
interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

# Triton warns once per process that the FP fusion default will change; the kernels are written for
# fused multiply-adds (the CUDA default), so say so explicitly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

DEFAULT_ARCHS = (80, 90)
TENSOR_CORE_OPS = ("HMMA", "HGMMA", "WGMMA", "IMMA", "QMMA", "UTCHMMA", "UTCQMMA")

_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# LDG.E.128, LDG.E.64, LDG.E.U16, LDG.E.EF.128 ... on sm_80; same mnemonics with desc[] on sm_90.
# tl.dot kernels load operand tiles with LDGSTS (cp.async global -> shared), and kernels that
# accumulate with atomics store with RED / REDG (RED.E.ADD.F32 on sm_80, REDG.E.ADD.F32x4 on sm_90):
# they count as global loads and stores.
_MEM_OP = re.compile(r"\b(LDGSTS|LDG|STG|REDG|RED)((?:\.[A-Za-z0-9_]+)*)\b")
_LOAD_OPS = ("LDG", "LDGSTS")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/", re.MULTILINE)
_TENSOR_OP = re.compile(r"\b(" + "|".join(TENSOR_CORE_OPS) + r")\b")


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------

@dataclass
class KernelSpec:
    """One compiled configuration of a @triton.jit kernel."""

    name: str                    # e.g. "gather_logprobs_fwd+entropy"
    fn: Any                      # the triton.jit function
    signature: dict[str, str]    # every argument: "*bf16", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, Any]   # values of the constexpr arguments
    attrs: dict[str, list]       # per-argument hints, e.g. {"n_cols": [["tt.divisibility", 16]]}
    num_warps: int
    num_stages: int
    shapes: list[str] = field(default_factory=list)  # the shapes this configuration serves
    requires_tensor_cores: bool = False  # a tl.dot kernel: its SASS must use tensor-core MMA

    @property
    def label(self) -> str:
        return f"{self.name} [{', '.join(self.shapes)}]" if self.shapes else self.name

    def key(self) -> tuple:
        """Equal for specs that compile to the same kernel."""
        return (self.name, self.fn.__name__, tuple(self.signature.items()),
                tuple((k, repr(v)) for k, v in sorted(self.constexprs.items())),
                tuple((k, repr(v)) for k, v in sorted(self.attrs.items())), self.num_warps, self.num_stages)


def spec_from_args(name: str, fn, args: dict[str, Any], constexprs: dict[str, Any], num_warps: int,
                   num_stages: int) -> KernelSpec:
    """The spec triton.jit would compile when launching `fn` with these (example) arguments.

    Arguments are specialized by triton's own launch-time rule (native_specialize_impl): tensors
    become typed pointers with a 16-byte alignment hint, ints i32 or i64 with a 16-divisibility hint,
    an int equal to 1 a constexpr, Python floats fp32. Meta tensors work as example tensors.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature: dict[str, str] = {}
    consts = dict(constexprs)
    attrs: dict[str, list] = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        if arg not in args:
            raise ValueError(f"{name}: no example value for argument {arg!r} of {fn.__name__}")
        ty, hint = native_specialize_impl(BaseBackend, args[arg], False, True, True)
        signature[arg] = ty
        if ty == "constexpr":  # ints equal to 1 are specialized into the kernel
            consts[arg] = args[arg]
        elif isinstance(hint, str) and hint:
            attrs[arg] = BaseBackend.parse_attr(hint)
    return KernelSpec(name, fn, signature, consts, attrs, num_warps, num_stages)


# ---------------------------------------------------------------------------------------------
# Compile and inspect
# ---------------------------------------------------------------------------------------------

@dataclass
class KernelReport:
    spec: str                  # KernelSpec.label
    kernel: str                # function name in the cubin
    arch: str                  # "sm_80", "sm_90a"
    num_warps: int
    num_stages: int
    registers: int             # per thread
    local_bytes: int           # local memory per thread: spilled registers (and local arrays)
    stack_bytes: int           # stack frame per thread
    static_shared_bytes: int   # __shared__ declared in the cubin
    dynamic_shared_bytes: int  # what triton launches with (reduction scratch, pipelining buffers)
    ldg_widths: tuple[int, ...]  # widths in bits of the global loads in the SASS
    stg_widths: tuple[int, ...]  # widths in bits of the global stores
    tensor_core_ops: tuple[str, ...]  # tensor-core mnemonics found in the SASS
    sass_instructions: int
    requires_tensor_cores: bool = False

    @property
    def missing_tensor_cores(self) -> bool:
        return self.requires_tensor_cores and not self.tensor_core_ops

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    @property
    def shared_bytes(self) -> int:
        return self.static_shared_bytes + self.dynamic_shared_bytes

    @property
    def ldg128(self) -> bool:
        return 128 in self.ldg_widths

    @property
    def uses_tensor_cores(self) -> bool:
        return bool(self.tensor_core_ops)


def _require_compiler(spec: KernelSpec) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("rlhf_fast.kernels._aot cannot compile under TRITON_INTERPRET=1: @triton.jit then "
                           "builds interpreter objects. Run it in a process without TRITON_INTERPRET, e.g. "
                           "`env -u TRITON_INTERPRET python -m rlhf_fast.kernels._aot`.")
    if not isinstance(spec.fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{spec.name}: {type(spec.fn).__name__} is not a triton JITFunction (was the "
                           "module imported under TRITON_INTERPRET=1?); AOT compilation needs a fresh "
                           "process without TRITON_INTERPRET")


def compile_spec(spec: KernelSpec, capability: int):
    """triton.compile the spec for NVIDIA compute capability `capability` (80, 90, ...)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _require_compiler(spec)
    index = {name: i for i, name in enumerate(spec.fn.arg_names)}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                    attrs={(index[k],): v for k, v in spec.attrs.items()})
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, flag, path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{tool} {flag} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _width(suffixes: str) -> int:
    """Bits moved by one LDG/STG from its suffixes (.E.128 -> 128, .E.U16 -> 16, .E -> 32,
    .F32x4 -> 128)."""
    for part in suffixes.split("."):
        if part in ("128", "64"):
            return int(part)
        if part in ("F32x4", "F32x2"):
            return 32 * int(part[-1])
        if part in ("U8", "S8"):
            return 8
        if part in ("U16", "S16"):
            return 16
    return 32


def arch_name(capability: int) -> str:
    """The ptxas arch triton compiles a capability for: 90 -> sm_90a (wgmma/setmaxnreg need the "a")."""
    return f"sm_{capability}{'a' if capability >= 90 else ''}"


def inspect_compiled(kernel, label: str, num_warps: int, num_stages: int,
                     requires_tensor_cores: bool = False) -> KernelReport:
    cubin = kernel.asm["cubin"]
    res = _cuobjdump(cubin, "-res-usage")
    match = _RES_USAGE.search(res)
    if match is None:
        raise RuntimeError(f"{label}: no resource usage in cuobjdump output:\n{res}")
    reg, stack, shared, local = map(int, match.groups())
    sass = _cuobjdump(cubin, "-sass")
    loads, stores = set(), set()
    for op, suffixes in _MEM_OP.findall(sass):
        (loads if op in _LOAD_OPS else stores).add(_width(suffixes))
    tensor_ops = sorted(set(_TENSOR_OP.findall(sass)))
    target = re.search(r"\.target\s+(sm_\w+)", sass)
    arch = target.group(1) if target else arch_name(kernel.metadata.target.arch)
    return KernelReport(
        spec=label, kernel=kernel.name, arch=arch,
        num_warps=num_warps, num_stages=num_stages, registers=reg, local_bytes=local, stack_bytes=stack,
        static_shared_bytes=shared, dynamic_shared_bytes=int(kernel.metadata.shared),
        ldg_widths=tuple(sorted(loads)), stg_widths=tuple(sorted(stores)), tensor_core_ops=tuple(tensor_ops),
        sass_instructions=len(_SASS_INSTRUCTION.findall(sass)), requires_tensor_cores=requires_tensor_cores)


def inspect_specs(specs, archs=DEFAULT_ARCHS) -> list[KernelReport]:
    """Compile every spec for every arch (compute capabilities, e.g. (80, 90)) and inspect it."""
    reports = []
    for spec in specs:
        for cap in archs:
            kernel = compile_spec(spec, cap)
            reports.append(inspect_compiled(kernel, spec.label, spec.num_warps, spec.num_stages,
                                            spec.requires_tensor_cores))
    return reports


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def all_specs() -> list[KernelSpec]:
    """The AOT specs of every op with Triton kernels: every rlhf_fast.kernels module with aot_specs()."""
    import importlib
    import pkgutil

    import rlhf_fast.kernels as package

    specs: list[KernelSpec] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"rlhf_fast.kernels.{info.name}")
        if hasattr(module, "aot_specs"):
            specs += list(module.aot_specs())
    return specs


def format_table(reports: list[KernelReport]) -> str:
    head = ("kernel", "arch", "warps", "regs", "local", "stack", "shared", "ldg bits", "stg bits", "tc",
            "spill")
    rows = [head]
    for r in reports:
        bits = lambda widths: "/".join(map(str, widths)) or "-"
        rows.append((r.spec, r.arch, str(r.num_warps), str(r.registers), str(r.local_bytes),
                     str(r.stack_bytes), str(r.shared_bytes), bits(r.ldg_widths), bits(r.stg_widths),
                     ",".join(r.tensor_core_ops) or "none", "SPILL" if r.spills else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_fast.kernels._aot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability to compile for, repeatable (default: 80 and 90)")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON instead of a table")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled ahead of time)",
              file=sys.stderr)
        return 2
    reports = inspect_specs(all_specs(), tuple(opts.arch or DEFAULT_ARCHS))
    if opts.json:
        import dataclasses
        import json

        print(json.dumps([dict(dataclasses.asdict(r), spills=r.spills, ldg128=r.ldg128, shared_bytes=r.shared_bytes,
                               missing_tensor_cores=r.missing_tensor_cores) for r in reports], indent=1))
    else:
        print(format_table(reports))
    spilled = [f"{r.spec} on {r.arch}" for r in reports if r.spills]
    no_mma = [f"{r.spec} on {r.arch}" for r in reports if r.missing_tensor_cores]
    if spilled:
        print("register spills in: " + "; ".join(spilled), file=sys.stderr)
    if no_mma:
        print("no tensor-core instructions in: " + "; ".join(no_mma), file=sys.stderr)
    return 1 if spilled or no_mma else 0


if __name__ == "__main__":
    sys.exit(main())
