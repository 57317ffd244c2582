"""Ahead-of-time compilation and inspection of the GPU kernels, without a GPU: what
``rlhf-fast inspect`` runs.

Triton. Each op module exposes ``aot_specs()``: the kernel configurations its launchers use (signature as
triton.jit specializes it at launch, constexprs, num_warps, num_stages). Every spec is compiled with
``triton.compile`` for a ``GPUTarget`` (sm_80 and sm_90a by default), the cubin is read back with the
``cuobjdump`` shipped in the triton wheel, and we report per kernel and arch:

  registers     REG of ``cuobjdump -res-usage`` (per thread)
  spills        LOCAL (local memory per thread) and STACK bytes; both are 0 for a kernel that fits
  shared        static SHARED of the cubin + the dynamic shared memory triton launches with (on
                sm_90 the cubin of a kernel using shared memory declares the 1 KB per-CTA system
                reservation as static SHARED)
  occupancy     resident warps per SM / 64 from registers, shared memory and warps per CTA, with the
                sm_80 / sm_90 limits (ARCH_LIMITS), and which of them binds
  ldg128        whether the SASS has 128-bit global loads (LDG.E.128, or LDGSTS.128: the cp.async
                copies into shared memory with which tl.dot kernels load their operand tiles)
  tensor cores  HMMA / HGMMA / IMMA / WGMMA instructions, if any; a spec that multiplies matrices
                (requires_tensor_cores) must have them

CUDA. Every csrc/cuda/*.cu of a source checkout is compiled by nvcc (when it is found) for sm_80 and
sm_90 with the flags of setup.py and ``--resource-usage``; the same figures are read per kernel from
the object's cubins (occupancy from registers alone: the block size is a launch argument there).

Cost model. ``op_cost`` / ``kernel_cost`` count the FLOPs and the compulsory bytes (every input read
once, every output written once) of an op or of one kernel at a given shape; ``estimate`` turns them
into the time at the peak of an H100 SXM or an H200 (``PEAKS``): max(FLOPs / peak FLOP/s, bytes /
peak bandwidth), the roofline lower bound. The same functions give the benchmarks their GB/s and
TFLOP/s (bench/), and the README's estimate tables.

Run ``python -m rlhf_fast.kernels._aot`` (or ``rlhf-fast inspect``) for the tables; ``--json`` for the
machine-readable report. Exit status 1 if any kernel spills or lacks the tensor-core instructions it
requires. It must run without ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` returns
interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Triton warns once per process that the FP fusion default will change; the kernels are written for
# fused multiply-adds (the CUDA default), so say so explicitly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton  # noqa: E402
except ImportError:  # the cost model below needs no triton; compiling does
    triton = None

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


class SpecSet:
    """The specs of a kernel family, one per compiled kernel: a spec that compiles to the same kernel as
    one already held (equal ``key()``) only adds its shape label to that one."""

    def __init__(self) -> None:
        self._specs: dict[tuple, KernelSpec] = {}

    def add(self, spec: KernelSpec, shape: str, new_shape: str | None = None) -> None:
        """Add `spec` serving `shape`; `new_shape`, when given, labels it instead if it is new."""
        held = self._specs.get(spec.key())
        if held is not None:
            held.shapes.append(shape)
        else:
            spec.shapes.append(new_shape or shape)
            self._specs[spec.key()] = spec

    def specs(self) -> list[KernelSpec]:
        return list(self._specs.values())


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
# Occupancy
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of a compute capability (CUDA C Programming Guide, compute capabilities table)."""

    max_warps: int            # resident warps per SM
    max_ctas: int             # resident thread blocks per SM
    registers: int            # 32-bit registers per SM
    reg_unit: int             # registers are allocated per warp in units of this many
    shared: int               # shared memory per SM usable by thread blocks (bytes)
    shared_per_cta: int       # largest shared memory one block may have
    reserved_shared: int = 1024  # the system's per-block reservation (compute capability >= 8.0)


ARCH_LIMITS = {
    "sm_80": ArchLimits(max_warps=64, max_ctas=32, registers=65536, reg_unit=256, shared=164 * 1024,
                        shared_per_cta=163 * 1024),
    "sm_90": ArchLimits(max_warps=64, max_ctas=32, registers=65536, reg_unit=256, shared=228 * 1024,
                        shared_per_cta=227 * 1024),
}


def occupancy(arch: str, registers: int, num_warps: int | None, shared_bytes: int = 0,
              reservation_included: bool = False) -> dict:
    """Resident warps per SM as a fraction of the maximum, and the limit that binds.

    registers: per thread; per warp they are allocated in units of reg_unit. num_warps: per CTA, or
    None when the block size is chosen at launch (CUDA kernels): then only the register limit on warps
    is reported. shared_bytes: per CTA; the 1 KB system reservation is added unless already included
    (the sm_90 cubins triton emits declare it as static shared memory).
    """
    lim = ARCH_LIMITS[arch.rstrip("a")]
    per_warp = math.ceil(max(registers, 1) * 32 / lim.reg_unit) * lim.reg_unit
    warps_by_regs = lim.registers // per_warp
    if num_warps is None:
        warps = min(lim.max_warps, warps_by_regs)
        return {"occupancy": round(warps / lim.max_warps, 3), "warps_per_sm": warps,
                "limiter": "registers" if warps < lim.max_warps else "none", "ctas_per_sm": None}
    smem = shared_bytes + (0 if reservation_included else lim.reserved_shared)
    if smem > lim.shared_per_cta + lim.reserved_shared:
        return {"occupancy": 0.0, "warps_per_sm": 0, "ctas_per_sm": 0, "limiter": "shared (does not fit)"}
    limits = {"warps": lim.max_warps // num_warps, "ctas": lim.max_ctas,
              "registers": warps_by_regs // num_warps,
              "shared": lim.shared // (math.ceil(smem / 128) * 128) if smem else lim.max_ctas}
    ctas = min(limits.values())
    binding = [k for k, v in limits.items() if v == ctas]
    limiter = "none" if "warps" in binding or "ctas" in binding else binding[0]
    return {"occupancy": round(ctas * num_warps / lim.max_warps, 3), "warps_per_sm": ctas * num_warps,
            "ctas_per_sm": ctas, "limiter": limiter}


# ---------------------------------------------------------------------------------------------
# Compile and inspect
# ---------------------------------------------------------------------------------------------

@dataclass
class KernelReport:
    spec: str                  # KernelSpec.label (Triton) or the demangled kernel (CUDA)
    kernel: str                # function name in the cubin
    arch: str                  # "sm_80", "sm_90a"
    num_warps: int | None      # per CTA; None for CUDA kernels (block size chosen at launch)
    num_stages: int | None
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
    source: str = "triton"     # "triton" or the .cu file

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

    @property
    def occupancy(self) -> dict:
        included = self.source == "triton" and self.arch.startswith("sm_90") and self.static_shared_bytes > 0
        return occupancy(self.arch, self.registers, self.num_warps, self.shared_bytes, included)

    def as_dict(self) -> dict:
        return dict(asdict(self), spills=self.spills, ldg128=self.ldg128, shared_bytes=self.shared_bytes,
                    missing_tensor_cores=self.missing_tensor_cores, **self.occupancy)


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


def cuobjdump_path() -> str | None:
    """The cuobjdump of the triton wheel, else the CUDA toolkit's."""
    if triton is not None:
        try:
            return triton.knobs.nvidia.cuobjdump.path
        except Exception:  # noqa: BLE001 (knob layout differs across triton versions)
            pass
    return shutil.which("cuobjdump")


def _cuobjdump_file(path: str, flag: str) -> str:
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither in the triton wheel nor on PATH)")
    res = subprocess.run([tool, flag, path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{tool} {flag} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return _cuobjdump_file(path, flag)


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


def sass_features(sass: str) -> dict:
    """Load/store widths, tensor-core mnemonics and instruction count of one kernel's SASS."""
    loads, stores = set(), set()
    for op, suffixes in _MEM_OP.findall(sass):
        (loads if op in _LOAD_OPS else stores).add(_width(suffixes))
    return {"ldg_widths": tuple(sorted(loads)), "stg_widths": tuple(sorted(stores)),
            "tensor_core_ops": tuple(sorted(set(_TENSOR_OP.findall(sass)))),
            "sass_instructions": len(_SASS_INSTRUCTION.findall(sass))}


def inspect_compiled(kernel, label: str, num_warps: int, num_stages: int,
                     requires_tensor_cores: bool = False) -> KernelReport:
    cubin = kernel.asm["cubin"]
    res = _cuobjdump(cubin, "-res-usage")
    match = _RES_USAGE.search(res)
    if match is None:
        raise RuntimeError(f"{label}: no resource usage in cuobjdump output:\n{res}")
    reg, stack, shared, local = map(int, match.groups())
    sass = _cuobjdump(cubin, "-sass")
    target = re.search(r"\.target\s+(sm_\w+)", sass)
    arch = target.group(1) if target else arch_name(kernel.metadata.target.arch)
    return KernelReport(
        spec=label, kernel=kernel.name, arch=arch,
        num_warps=num_warps, num_stages=num_stages, registers=reg, local_bytes=local, stack_bytes=stack,
        static_shared_bytes=shared, dynamic_shared_bytes=int(kernel.metadata.shared),
        requires_tensor_cores=requires_tensor_cores, **sass_features(sass))


def inspect_specs(specs, archs=DEFAULT_ARCHS) -> list[KernelReport]:
    """Compile every spec for every arch (compute capabilities, e.g. (80, 90)) and inspect it."""
    reports = []
    for spec in specs:
        for cap in archs:
            kernel = compile_spec(spec, cap)
            reports.append(inspect_compiled(kernel, spec.label, spec.num_warps, spec.num_stages,
                                            spec.requires_tensor_cores))
    return reports


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


# ---------------------------------------------------------------------------------------------
# CUDA sources: nvcc --resource-usage and the SASS of the object's cubins
# ---------------------------------------------------------------------------------------------

# setup.py's nvcc flags for rlhf_fast._C, and what torch's BuildExtension adds to every nvcc call
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
FALLBACK_COMMON_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                              "--expt-relaxed-constexpr"]
_RES_FUNCTION = re.compile(r"Function ([\w$]+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_sources() -> list[Path]:
    """csrc/cuda/*.cu of the source checkout this package is installed from (editable install); [] for a
    wheel, which ships no sources."""
    root = Path(__file__).resolve().parent.parent
    return sorted((root / "csrc" / "cuda").glob("*.cu"))


def nvcc_command(nvcc: str, source: Path, out: Path, capability: int) -> list[str]:
    """nvcc compiling the device code of `source` alone into a cubin for sm_<capability> (no host
    compilation of the torch headers: ~10 s a file), with setup.py's flags and --resource-usage."""
    from torch.utils import cpp_extension

    root = source.parent.parent.parent
    include_dirs = [str(root / "csrc" / "include")] + cpp_extension.include_paths()
    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", FALLBACK_COMMON_NVCC_FLAGS))
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    if not any((Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for d in include_dirs):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU-only torch ships no generated header
    return ([nvcc, "-cubin", str(source), "-o", str(out), f"-arch=sm_{capability}"] + [f"-I{d}" for d in include_dirs]
            + common + defines + NVCC_FLAGS + ["--resource-usage"])


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return list(names)
    return [re.sub(r"^void |\(.*\)$", "", re.sub(r"rlhf_fast::cuda::(\(anonymous namespace\)::)?", "", n)) for n in out]


def _split_functions(sass: str) -> dict[str, str]:
    chunks = re.split(r"^\s*Function : ([\w$]+)\s*$", sass, flags=re.MULTILINE)
    return {chunks[i]: chunks[i + 1] for i in range(1, len(chunks) - 1, 2)}


def inspect_cuda_source(source: Path, nvcc: str, archs=DEFAULT_ARCHS) -> list[KernelReport]:
    """nvcc-compile one .cu for each arch and report every kernel in it: registers, spills and shared
    memory from nvcc's --resource-usage (read back from the cubin), load widths and tensor-core
    instructions from its SASS."""
    reports = []
    for cap in archs:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / f"{source.stem}.sm_{cap}.cubin"
            proc = subprocess.run(nvcc_command(nvcc, source, cubin, cap), capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                output = (proc.stdout + proc.stderr)[-4000:]
                raise RuntimeError(f"nvcc failed on {source.name} for sm_{cap} ({proc.returncode}):\n{output}")
            res = _cuobjdump_file(str(cubin), "-res-usage")
            functions = _split_functions(_cuobjdump_file(str(cubin), "-sass"))
        found = _RES_FUNCTION.findall(res)
        if not found:
            raise RuntimeError(f"{source.name} sm_{cap}: no kernel in cuobjdump -res-usage:\n{res[-2000:]}")
        for (mangled, reg, stack, shared, local), name in zip(found, _demangle([f[0] for f in found]), strict=True):
            reports.append(KernelReport(
                spec=name, kernel=mangled, arch=f"sm_{cap}", num_warps=None, num_stages=None, registers=int(reg),
                local_bytes=int(local), stack_bytes=int(stack), static_shared_bytes=int(shared),
                dynamic_shared_bytes=0, source=source.name, **sass_features(functions.get(mangled, ""))))
    return reports


# ---------------------------------------------------------------------------------------------
# Analytic cost model: FLOPs and compulsory bytes, time at peak
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peak:
    name: str
    bandwidth: float          # HBM bytes/s
    tensor_flops: dict        # dense tensor-core FLOP/s by operand precision
    fp32_flops: float         # FP32 FMA on the CUDA cores (element-wise math, reductions)


# Datasheet peaks (dense, no sparsity). H200: the H100 SXM's compute with HBM3e.
PEAKS = {
    "H100": Peak("H100 SXM", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12}, 67e12),
    "H200": Peak("H200", 4.8e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12}, 67e12),
}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Operand precision of the tensor-core GEMMs per input dtype: fp32 inputs run on TF32 tensor cores
# (linear_logprobs as tf32x3: three TF32 products, counted in kernel_cost).
TENSOR_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "tf32"}


@dataclass(frozen=True)
class Cost:
    """FLOPs (`tensor_flops` on tensor cores, `flops` on CUDA cores) and compulsory HBM bytes."""

    bytes: float
    tensor_flops: float = 0.0
    flops: float = 0.0
    precision: str = "bf16"   # operand precision of the tensor-core FLOPs

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.tensor_flops + other.tensor_flops, self.flops + other.flops,
                    self.precision)

    @property
    def total_flops(self) -> float:
        return self.tensor_flops + self.flops

    def seconds(self, peak: Peak) -> dict:
        # tensor cores and CUDA cores work side by side: the lower bound is the busier of the two
        compute = max(self.tensor_flops / peak.tensor_flops[self.precision], self.flops / peak.fp32_flops)
        memory = self.bytes / peak.bandwidth
        return {"compute_s": compute, "memory_s": memory, "s": max(compute, memory),
                "bound": "compute" if compute >= memory else "memory"}


def _pairs_causal(t: int, s: int) -> int:
    """Visible (query, key) pairs of one head under the bottom-right causal mask: query i sees
    min(S, i + S - T + 1) keys (none when that is <= 0)."""
    if t <= s:
        return t * (s - t) + t * (t + 1) // 2
    return s * (s + 1) // 2


def attention_shape(kind: str, *, heads: int, head_dim: int, kv_heads: int | None = None, batch: int = 1,
                    seqlen: int = 0, causal: bool = True, lengths=(), groups: int = 0, prompt: int = 0,
                    k: int = 0, answer: int = 0, dtype: str = "bf16") -> dict:
    """Shape parameters of one attention call for op_cost("attention", ...): query/key tokens and the
    (query, key) pairs every head computes, for kind "dense" (batch x seqlen, causal or full), "varlen"
    (packed causal sequences of `lengths`) or "shared_prefix" (groups of one prompt + k answers)."""
    if kind == "dense":
        pairs = batch * (_pairs_causal(seqlen, seqlen) if causal else seqlen * seqlen)
        tokens = batch * seqlen
    elif kind == "varlen":
        pairs, tokens = sum(_pairs_causal(n, n) for n in lengths), sum(lengths)
    elif kind == "shared_prefix":
        pairs = groups * (_pairs_causal(prompt, prompt) + k * (answer * prompt + _pairs_causal(answer, answer)))
        tokens = groups * (prompt + k * answer)
    else:
        raise ValueError(f"attention shape kind {kind!r}: expected dense, varlen or shared_prefix")
    return dict(heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim, q_tokens=tokens, k_tokens=tokens,
                pairs=pairs, dtype=dtype)


def _attention_parts(heads, kv_heads, head_dim, q_tokens, k_tokens, pairs, dtype="bf16"):
    e = DTYPE_BYTES[dtype]
    q = q_tokens * heads * head_dim * e          # q, o, dO, dq each
    kv = k_tokens * kv_heads * head_dim * e      # k, v, dk, dv each
    row = q_tokens * heads * 4                   # lse, delta (fp32 per query row and head)
    mac = 2.0 * heads * head_dim * pairs         # FLOPs of one (T x S x D) GEMM over the visible pairs
    return q, kv, row, mac, TENSOR_PRECISION[dtype]


def op_cost(op: str, mode: str, **p) -> Cost:
    """FLOPs and compulsory bytes of one call of `op` in `mode` ("fwd", "bwd" or "fwd+bwd"; a no-grad
    forward costs as "fwd") at shape `p` (the keyword arguments each op documents below; dtype is
    "bf16", "fp16" or "fp32").

    FLOPs are those of the fused algorithm as the literature counts them: attention as flash-attention-2
    (forward 2 GEMMs = 4 pairs D per head; backward 5 GEMMs with the recompute of S = 10 pairs D, so
    fwd+bwd = 3.5x the forward; the softmax's exp and max, ~1/D of that, are not counted),
    linear_logprobs with its backward recomputing the logits (1 + 3 GEMMs); element-wise ops count a
    few FP32 operations per element (they are bandwidth-bound by a wide margin either way).
    Bytes: every input read once and every output written once (the HBM floor); what a kernel re-reads
    from L2 is not counted.
    """
    if mode == "nograd":
        mode = "fwd"
    if mode == "fwd+bwd":
        return op_cost(op, "fwd", **p) + op_cost(op, "bwd", **p)
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode {mode!r}: expected nograd, fwd, bwd or fwd+bwd")
    fwd = mode == "fwd"
    e = DTYPE_BYTES[p.get("dtype", "fp32")]
    if op == "gather_logprobs":  # n rows, vocab; entropy
        n, v, ent = p["n"], p["vocab"], bool(p.get("entropy", False))
        logits = n * v * e
        per_elem = 4 + 3 * ent  # max, subtract, exp, add (+ p * x, add, multiply for the entropy)
        if fwd:  # read logits, labels; write logprobs (+ entropy)
            return Cost(logits + 8 * n + 4 * n * (1 + ent), flops=per_elem * n * v)
        # read logits, labels, lse, grad (+ entropy and its grad); write grad_logits
        return Cost(2 * logits + 16 * n + 8 * n * ent, flops=(per_elem + 2) * n * v)
    if op in ("linear_logprobs", "linear_ppo_loss"):  # n (tokens), hidden, vocab
        n, h, v = p["n"], p["hidden"], p["vocab"]
        gemm = 2.0 * n * h * v
        weights = (n + v) * h * e
        per_token = 12 if op == "linear_logprobs" else 12 + 3 * e + 1  # + old/ref log-probs, advantages, mask
        if fwd:
            return Cost(weights + per_token * n, tensor_flops=gemm, flops=6.0 * n * v,
                        precision=TENSOR_PRECISION[p.get("dtype", "fp32")])
        # linear_logprobs recomputes the logits, then dH = G W, dW = G^T H; linear_ppo_loss forms G in
        # its forward pass (3 GEMMs in all). Both write dH and dW.
        gemms = 3 if op == "linear_logprobs" else 2
        return Cost(2 * weights + 8 * n, tensor_flops=gemms * gemm, flops=6.0 * n * v,
                    precision=TENSOR_PRECISION[p.get("dtype", "fp32")])
    if op == "linear":  # m rows, k inputs, n outputs: x (m, k) @ weight (n, k).T
        m, k, n = p["m"], p["k"], p["n"]
        gemm, prec = 2.0 * m * k * n, TENSOR_PRECISION[p.get("dtype", "fp32")]
        if fwd:  # read x, weight; write the output
            return Cost((m * k + n * k + m * n) * e, tensor_flops=gemm, precision=prec)
        # read grad, x, weight; write grad_x, grad_weight (two GEMMs)
        return Cost((m * n + 2 * m * k + 2 * n * k) * e, tensor_flops=2 * gemm, precision=prec)
    if op in ("kl_penalty", "ppo_policy_loss", "value_loss"):  # tokens
        t = p["tokens"]
        inputs = {"kl_penalty": 2, "ppo_policy_loss": 3, "value_loss": 3}[op]
        mask = 0 if op == "kl_penalty" else 1
        if fwd:  # read the inputs (+ mask); write the per-token result / forward-written gradient (fp32)
            return Cost(t * (inputs * e + mask + 4), flops=20.0 * t)
        return Cost(t * (4 + e), flops=2.0 * t)  # read the per-token gradient, write grad of the input
    if op == "gae":  # tokens; whiten
        t, whiten = p["tokens"], bool(p.get("whiten", False))
        if not fwd:
            return Cost(0.0)  # GAE has no backward
        return Cost(t * (2 * e + 1 + 8) + whiten * t * (4 + 1 + 4), flops=(15.0 + 6 * whiten) * t)
    if op == "ranking_loss":  # prompts, k; ranked (int64 ranks and candidate counts)
        n, k, ranked = p["prompts"], p["k"], bool(p.get("ranked", False))
        reads = n * k * e + ranked * (8 * n * k + 8 * n)
        pairs = n * k * (k - 1) / 2
        if fwd:
            return Cost(reads + 4, flops=20.0 * pairs)
        return Cost(reads + n * k * e, flops=25.0 * pairs)
    if op == "group_advantages":  # prompts, k; batch (batch scaling: a second pass, float64 in between)
        n, batch = p["prompts"] * p["k"], bool(p.get("batch", False))
        if not fwd:
            return Cost(0.0)  # advantages have no backward
        # read scores and mask, write fp32; with batch scaling write float64, read it, scores and mask again
        return Cost(n * (2 * e + 2 + 20) if batch else n * (e + 1 + 4), flops=(15.0 + 6 * batch) * n)
    if op == "attention":  # attention_shape(...)
        shape = {k: p[k] for k in ("heads", "kv_heads", "head_dim", "q_tokens", "k_tokens", "pairs")}
        q, kv, row, mac, prec = _attention_parts(**shape, dtype=p.get("dtype", "bf16"))
        if fwd:  # read q, k, v; write o, lse
            return Cost(2 * q + 2 * kv + row, tensor_flops=2 * mac, precision=prec)
        # read q, k, v, o, dO, lse; delta written and read; write dq, dk, dv
        return Cost(3 * q + 2 * kv + row + 2 * row + q + 2 * kv, tensor_flops=5 * mac, precision=prec)
    raise ValueError(f"no cost model for op {op!r}")


# Which op and phase each Triton kernel (KernelSpec.name without its [variant] and +flags) computes.
KERNEL_OPS = {
    "gather_logprobs_fwd": "gather_logprobs", "gather_logprobs_bwd": "gather_logprobs",
    "linear_logprobs_fwd": "linear_logprobs", "linear_logprobs_bwd": "linear_logprobs",
    "linear_logprobs_combine": "linear_logprobs",
    "kl_penalty_fwd": "kl_penalty", "ppo_policy_loss_fwd": "ppo_policy_loss", "value_loss_fwd": "value_loss",
    "policy_finalize": "ppo_policy_loss", "value_finalize": "value_loss",
    "gae_fwd": "gae", "gae_merge_moments": "gae", "gae_whiten": "gae",
    "ranking_loss_fwd": "ranking_loss", "ranking_loss_bwd": "ranking_loss", "ranking_loss_finalize": "ranking_loss",
    "attention_fwd": "attention", "attention_bwd_preprocess": "attention", "attention_bwd_dkdv": "attention",
    "attention_bwd_dq": "attention",
    "group_advantages_fwd": "group_advantages", "group_advantages_batch": "group_advantages",
}


def kernel_base(name: str) -> tuple[str, set[str]]:
    """("gather_logprobs_fwd", {"entropy"}) from "gather_logprobs_fwd+entropy"; variants in [...] dropped."""
    base = re.split(r"[\[+]", name, maxsplit=1)[0]
    return base, set(re.findall(r"\+(\w+)", name))


def kernel_cost(name: str, **p) -> Cost:
    """FLOPs and compulsory bytes of ONE kernel launch (`name` as in KernelSpec.name) at the op shape `p`
    (op_cost's keywords): what that kernel executes, recomputation included, e.g. the attention backward
    here is a dK/dV kernel (S, dV, dP, dK: 4 GEMMs) and a dQ kernel (S, dP, dQ: 3 GEMMs), 7 GEMMs where
    op_cost counts flash-attention-2's 5."""
    base, flags = kernel_base(name)
    op = KERNEL_OPS.get(base)
    if op is None:
        raise ValueError(f"no cost model for kernel {name!r}")
    e = DTYPE_BYTES[p.get("dtype", "fp32")]
    if op == "gather_logprobs":
        p = dict(p, entropy="entropy" in flags)
        return op_cost(op, "fwd" if base.endswith("_fwd") else "bwd", **p)
    if op == "linear_logprobs":
        n = p["n"]
        if base.endswith("combine"):  # per row and vocabulary split: max, sum (+ entropy term) in fp32
            splits = p.get("splits", 16)
            return Cost(n * splits * 4 * (3 + ("entropy" in flags)) + 8 * n + 4 * n, flops=10.0 * n * splits)
        cost = op_cost(op, "fwd" if base.endswith("_fwd") else "bwd", **p)
        if base.endswith("_bwd"):  # dH and dW accumulate in fp32 buffers: written as fp32
            cost = Cost(cost.bytes + (p["n"] + p["vocab"]) * p["hidden"] * (4 - e), cost.tensor_flops, cost.flops,
                        cost.precision)
        if p.get("dtype") == "fp32":  # tf32x3: three TF32 products per fp32 product
            cost = Cost(cost.bytes, 3 * cost.tensor_flops, cost.flops, "tf32")
        return cost
    if op in ("kl_penalty", "ppo_policy_loss", "value_loss"):
        if base.endswith("finalize"):  # one program folds the per-block partials
            return Cost(p.get("partials", 64) * 8 * 4.0, flops=8.0 * p.get("partials", 64))
        return op_cost(op, "fwd", **p)
    if op == "gae":
        t = p["tokens"]
        if base == "gae_fwd":
            return Cost(t * (2 * e + 1 + 8) + ("whiten" in flags) * p.get("sequences", 256) * 12, flops=15.0 * t)
        if base == "gae_merge_moments":
            return Cost(p.get("sequences", 256) * 12 + 8, flops=10.0 * p.get("sequences", 256))
        return Cost(t * (4 + 1 + 4), flops=2.0 * t)  # gae_whiten: read adv and mask, write adv
    if op == "group_advantages":
        n = p["prompts"] * p["k"]
        if base == "group_advantages_batch":  # read float64 advantages, scores, mask; write fp32
            return Cost(n * (8 + e + 1 + 4), flops=6.0 * n)
        return Cost(n * (e + 1 + (8 if ",batch]" in name else 4)), flops=15.0 * n)
    if op == "ranking_loss":
        if base.endswith("finalize"):
            return Cost(p.get("programs", 128) * 40 + 4, flops=4.0 * p.get("programs", 128))
        return op_cost(op, "fwd" if base.endswith("_fwd") else "bwd", **p)
    # attention
    shape = {k: p[k] for k in ("heads", "kv_heads", "head_dim", "q_tokens", "k_tokens", "pairs")}
    q, kv, row, mac, prec = _attention_parts(**shape, dtype=p.get("dtype", "bf16"))
    if base == "attention_fwd":
        return op_cost("attention", "fwd", **p)
    if base == "attention_bwd_preprocess":  # delta = rowsum(dO * O)
        return Cost(2 * q + row, flops=2.0 * p["q_tokens"] * p["heads"] * p["head_dim"])
    if base == "attention_bwd_dkdv":  # read q, k, v, dO, lse, delta; write dk, dv
        return Cost(2 * q + 4 * kv + 2 * row, tensor_flops=4 * mac, precision=prec)
    if base == "attention_bwd_dq":  # read q, k, v, dO, lse, delta; write dq
        return Cost(3 * q + 2 * kv + 2 * row, tensor_flops=3 * mac, precision=prec)
    raise ValueError(f"no cost model for kernel {name!r}")


# The GPU benchmark shapes of every op (bench/ runs these on a GPU; the README's estimate tables and
# inspect's per-kernel estimates use them).
_VARLEN = (2048, 512, 1024, 4096, 256, 3072, 1536, 768, 2048, 1280, 640, 896, 1792, 384, 2304, 1024)
GPU_SHAPES: dict[str, list[tuple[str, dict]]] = {
    "gather_logprobs": [
        ("N=8192 V=32000 bf16", dict(n=8192, vocab=32000, dtype="bf16")),
        ("N=8192 V=128256 bf16", dict(n=8192, vocab=128256, dtype="bf16")),
        ("N=8192 V=128256 bf16 +entropy", dict(n=8192, vocab=128256, dtype="bf16", entropy=True)),
    ],
    "linear_logprobs": [
        ("N=8192 H=4096 V=128256 bf16", dict(n=8192, hidden=4096, vocab=128256, dtype="bf16")),
        ("N=8192 H=4096 V=32000 bf16", dict(n=8192, hidden=4096, vocab=32000, dtype="bf16")),
    ],
    "linear_ppo_loss": [("N=8192 H=4096 V=128256 bf16", dict(n=8192, hidden=4096, vocab=128256, dtype="bf16"))],
    "kl_penalty": [("B=256 T=4096 bf16", dict(tokens=256 * 4096, dtype="bf16"))],
    "ppo_policy_loss": [("B=256 T=4096 bf16", dict(tokens=256 * 4096, dtype="bf16"))],
    "value_loss": [("B=256 T=4096 bf16", dict(tokens=256 * 4096, dtype="bf16"))],
    "gae": [("B=256 T=2048 fp32", dict(tokens=256 * 2048, sequences=256, dtype="fp32")),
            ("B=256 T=2048 fp32 +whiten", dict(tokens=256 * 2048, sequences=256, dtype="fp32", whiten=True))],
    "ranking_loss": [("P=1024 K=9 bf16 ranked", dict(prompts=1024, k=9, dtype="bf16", ranked=True))],
    "group_advantages": [("P=16384 K=16 fp32", dict(prompts=16384, k=16, dtype="fp32")),
                         ("P=65536 K=8 fp32 batch", dict(prompts=65536, k=8, dtype="fp32", batch=True))],
    "attention": [
        ("dense causal B=8 H=32 T=2048 D=128",
         attention_shape("dense", batch=8, heads=32, seqlen=2048, head_dim=128)),
        ("dense full B=8 H=32 T=2048 D=128",
         attention_shape("dense", batch=8, heads=32, seqlen=2048, head_dim=128, causal=False)),
        ("dense causal B=8 H=32 T=2048 D=64", attention_shape("dense", batch=8, heads=32, seqlen=2048, head_dim=64)),
        ("dense causal GQA B=8 H=32/8 T=2048 D=128",
         attention_shape("dense", batch=8, heads=32, kv_heads=8, seqlen=2048, head_dim=128)),
        (f"varlen causal 16 seqs ({sum(_VARLEN)} tok) H=32 D=128",
         attention_shape("varlen", lengths=_VARLEN, heads=32, head_dim=128)),
        ("shared prefix G=8 prompt=1024 K=9 answer=256 H=32 D=128",
         attention_shape("shared_prefix", groups=8, prompt=1024, k=9, answer=256, heads=32, head_dim=128)),
        ("separate K=9 x G=8 T=1280 (same RM batch) H=32 D=128",
         attention_shape("dense", batch=72, heads=32, seqlen=1280, head_dim=128)),
    ],
}
# flash-attention-2's fwd+bwd throughput at D = 128 on an H100: the goal of the Triton attention kernels
FA2_CLASS_FLOPS = 330e12


def estimate(cost: Cost, peaks=("H100", "H200")) -> dict:
    """GFLOP, MB, FLOP/byte and, per machine, the time at peak in microseconds and what bounds it."""
    row = {"GFLOP": cost.total_flops / 1e9, "MB": cost.bytes / 1e6,
           "FLOP/byte": cost.total_flops / cost.bytes if cost.bytes else float("inf")}
    for name in peaks:
        s = cost.seconds(PEAKS[name])
        row[f"{name}_us"] = s["s"] * 1e6
        row[f"{name}_bound"] = s["bound"]
    return row


def op_estimates(ops=None) -> list[dict]:
    """op_cost at every GPU benchmark shape and mode, timed at the H100 and H200 peaks."""
    rows = []
    for op, shapes in GPU_SHAPES.items():
        if ops and op not in ops:
            continue
        modes = ("fwd",) if op in ("gae", "group_advantages") else ("fwd", "bwd", "fwd+bwd")
        for label, shape in shapes:
            for mode in modes:
                rows.append({"op": op, "shape": label, "mode": mode, **estimate(op_cost(op, mode, **shape))})
    return rows


def kernel_estimates(names) -> list[dict]:
    """kernel_cost of each distinct kernel name at its op's GPU benchmark shapes (dtype taken from the shape)."""
    rows = []
    for name in dict.fromkeys(names):
        base, flags = kernel_base(name)
        op = KERNEL_OPS.get(base)
        if op is None:
            continue
        for label, shape in GPU_SHAPES[op]:
            # a shape with an optional output (entropy, whitening) goes with the kernels that compute it
            if any(f in shape and bool(shape[f]) != (f in flags) for f in ("entropy", "whiten")):
                continue
            rows.append({"kernel": name, "shape": label, **estimate(kernel_cost(name, **shape))})
    return rows


def attention_table() -> list[dict]:
    """Issue-5 yardstick: FLOPs and bytes per call of the attention GPU benchmark shapes, the time at the
    H100's 989 TFLOP/s / 3.35 TB/s, and at the 330 TFLOP/s of flash-attention-2-class kernels."""
    rows = []
    for label, shape in GPU_SHAPES["attention"]:
        for mode in ("fwd", "fwd+bwd"):
            cost = op_cost("attention", mode, **shape)
            s = cost.seconds(PEAKS["H100"])
            rows.append({"shape": label, "mode": mode, "GFLOP": cost.total_flops / 1e9, "MB": cost.bytes / 1e6,
                         "FLOP/byte": cost.total_flops / cost.bytes, "ms @989TF": s["compute_s"] * 1e3,
                         "ms @3.35TB/s": s["memory_s"] * 1e3, "ms @330TF": cost.tensor_flops / FA2_CLASS_FLOPS * 1e3,
                         "bound": s["bound"]})
    return rows


# ---------------------------------------------------------------------------------------------
# Tables and command line
# ---------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def text_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [columns] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report_rows(reports: list[KernelReport]) -> list[dict]:
    rows = []
    for r in reports:
        bits = lambda widths: "/".join(map(str, widths)) or "-"
        occ = r.occupancy
        rows.append({"kernel": r.spec, "arch": r.arch, "warps": "-" if r.num_warps is None else r.num_warps,
                     "regs": r.registers, "local": r.local_bytes, "stack": r.stack_bytes, "shared": r.shared_bytes,
                     "occupancy": f"{occ['occupancy']:.0%}" + ("" if r.num_warps else " (regs)"),
                     "limiter": occ["limiter"], "ldg bits": bits(r.ldg_widths), "stg bits": bits(r.stg_widths),
                     "tc": ",".join(r.tensor_core_ops) or "none",
                     "check": "SPILL" if r.spills else ("NO MMA" if r.missing_tensor_cores else "ok")})
    return rows


def format_table(reports: list[KernelReport]) -> str:
    return text_table(report_rows(reports))


def summary_rows(reports: list[KernelReport]) -> list[dict]:
    """One row per kernel family (name without variants) and arch: worst case over its configurations."""
    groups: dict[tuple, list[KernelReport]] = {}
    for r in reports:
        family = kernel_base(r.spec.split(" [")[0])[0] if r.source == "triton" else re.sub(r"<.*", "", r.spec)
        groups.setdefault((r.source, family, r.arch), []).append(r)
    rows = []
    for (source, family, arch), rs in groups.items():
        occ = [x.occupancy["occupancy"] for x in rs]
        rows.append({"source": source, "kernel": family, "arch": arch, "configs": len(rs),
                     "regs": f"{min(x.registers for x in rs)}-{max(x.registers for x in rs)}"
                     if len({x.registers for x in rs}) > 1 else str(rs[0].registers),
                     "spills": sum(x.spills for x in rs), "max shared": max(x.shared_bytes for x in rs),
                     "occupancy": f"{min(occ):.0%}-{max(occ):.0%}" if min(occ) != max(occ) else f"{occ[0]:.0%}",
                     "ldg128": f"{sum(x.ldg128 for x in rs)}/{len(rs)}",
                     "tensor cores": ",".join(sorted({op for x in rs for op in x.tensor_core_ops})) or
                     ("MISSING" if any(x.requires_tensor_cores for x in rs) else "none")})
    return rows


def inspect_all(archs=DEFAULT_ARCHS, cuda: bool | None = None, ops=None, kernels: str | None = None) -> dict:
    """The whole report: Triton kernels, CUDA kernels (cuda=None: when nvcc and the sources exist),
    per-kernel and per-op estimates, and the failures that make the exit status 1."""
    specs = [s for s in all_specs() if (not ops or KERNEL_OPS.get(kernel_base(s.name)[0]) in ops)
             and (not kernels or re.search(kernels, s.label))]
    triton_reports = inspect_specs(specs, archs)
    cuda_reports, cuda_note = [], None
    nvcc, sources = find_nvcc(), cuda_sources()
    if cuda is None:
        cuda = nvcc is not None and bool(sources)
        if not cuda:
            cuda_note = "skipped: " + ("nvcc not found" if nvcc is None
                                       else "no csrc/cuda sources (not a source checkout)")
    elif cuda and (nvcc is None or not sources):
        raise RuntimeError("--cuda: " + ("nvcc not found" if nvcc is None
                                         else "no csrc/cuda/*.cu next to this package"))
    if cuda:
        for source in sources:
            if ops and not any(source.stem.startswith(o.split("_")[0]) for o in ops):
                continue
            cuda_reports += inspect_cuda_source(source, nvcc, archs)
    else:
        cuda_note = cuda_note or "skipped (--no-cuda)"
    reports = triton_reports + cuda_reports
    failures = ([f"{r.spec} on {r.arch}: spills (LOCAL {r.local_bytes} B, STACK {r.stack_bytes} B)"
                 for r in reports if r.spills]
                + [f"{r.spec} on {r.arch}: no tensor-core instructions" for r in reports if r.missing_tensor_cores])
    return {"triton": [r.as_dict() for r in triton_reports], "cuda": [r.as_dict() for r in cuda_reports],
            "cuda_note": cuda_note, "summary": summary_rows(reports),
            "kernel_estimates": kernel_estimates(s.name for s in specs),
            "op_estimates": op_estimates(ops), "peaks": {k: asdict(v) for k, v in PEAKS.items()},
            "failures": failures, "_reports": reports}


def _parse_shape(items: list[str]) -> dict:
    shape = {}
    for item in items:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--estimate: expected key=value, got {item!r}")
        try:
            shape[key] = int(value)
        except ValueError:
            shape[key] = {"true": True, "false": False}.get(value.lower(), value)
    return shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-fast inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability to compile for, repeatable (default: 80 and 90)")
    parser.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    parser.add_argument("--ops", nargs="*", help="only the kernels of these ops (e.g. gather_logprobs attention)")
    parser.add_argument("--kernels", help="only the Triton configurations whose label matches this regular expression")
    cuda = parser.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                      help="also compile csrc/cuda/*.cu with nvcc (default: when nvcc and the sources are found)")
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false", help="Triton kernels only")
    parser.add_argument("--summary", action="store_true", help="one line per kernel family instead of per config")
    parser.add_argument("--estimate", nargs="+", metavar="OP KEY=VALUE",
                        help="only print the cost of one op at a shape, e.g. --estimate gather_logprobs n=8192 "
                             "vocab=128256 dtype=bf16 (attention: kind=dense batch=8 heads=32 seqlen=2048 "
                             "head_dim=128)")
    opts = parser.parse_args(argv)
    if opts.estimate:
        op, shape = opts.estimate[0], _parse_shape(opts.estimate[1:])
        if op == "attention" and "pairs" not in shape:
            shape = attention_shape(shape.pop("kind", "dense"), **shape)
        rows = [{"op": op, "mode": m, **estimate(op_cost(op, m, **shape))} for m in ("fwd", "bwd", "fwd+bwd")]
        print(json.dumps(rows, indent=1) if opts.json else text_table(rows))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled ahead of time)",
              file=sys.stderr)
        return 2
    report = inspect_all(tuple(opts.arch or DEFAULT_ARCHS), opts.cuda, opts.ops, opts.kernels)
    reports = report.pop("_reports")
    if opts.json:
        print(json.dumps(report, indent=1))
    else:
        if opts.summary:
            print(text_table(report["summary"]))
        else:
            print(format_table(reports))
        if report["cuda_note"]:
            print(f"\nCUDA sources: {report['cuda_note']}")
        print("\nTime at peak of each kernel at its op's GPU benchmark shapes (roofline lower bound, us):\n")
        print(text_table(report["kernel_estimates"],
                         ["kernel", "shape", "GFLOP", "MB", "H100_us", "H100_bound", "H200_us", "H200_bound"]))
    for failure in report["failures"]:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
