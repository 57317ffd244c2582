"""Inspection of the compiled GPU kernels, without a GPU: what ``rlhf-fast inspect`` reports.

Triton. Every spec of rlhf_fast.kernels._aot is compiled for sm_80 and sm_90a by default, the cubin is
read back with the ``cuobjdump`` shipped in the triton wheel, and we report per kernel and arch:

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

``inspect_all`` returns the whole report (with the per-kernel and per-op estimates of
rlhf_fast.kernels._cost); a kernel that spills or lacks the tensor-core instructions it requires is a
failure.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_fast.kernels._aot import all_specs, compile_spec, triton
from rlhf_fast.kernels._cost import KERNEL_OPS, PEAKS, kernel_base, kernel_estimates, op_estimates

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
# Compiled Triton kernels: cuobjdump's resource usage and SASS
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


def _inspect_one(spec, cap: int) -> KernelReport:
    kernel = compile_spec(spec, cap)
    return inspect_compiled(kernel, spec.label, spec.num_warps, spec.num_stages, spec.requires_tensor_cores)


_WORKER_SPECS: dict = {}


def _worker_init() -> None:
    _WORKER_SPECS.update((s.label, s) for s in all_specs())


def _worker_inspect(label: str, cap: int) -> KernelReport:
    return _inspect_one(_WORKER_SPECS[label], cap)


def inspect_specs(specs, archs=DEFAULT_ARCHS, jobs: int | None = None) -> list[KernelReport]:
    """Compile every spec for every arch (compute capabilities, e.g. (80, 90)) and inspect it, in `jobs`
    worker processes (default: one per CPU core; each compile is single-threaded Python, MLIR and ptxas).
    Specs of :func:`all_specs` go to the workers by label; any other spec is compiled here."""
    work = [(spec, cap) for spec in specs for cap in archs]
    jobs = max(1, min(len(work), jobs or os.cpu_count() or 1))
    known = {s.label for s in all_specs()} if jobs > 1 else set()
    if jobs == 1 or not all(spec.label in known for spec, _ in work):
        return [_inspect_one(spec, cap) for spec, cap in work]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_init) as pool:
        return list(pool.map(_worker_inspect, [s.label for s, _ in work], [c for _, c in work]))


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
    root = Path(__file__).resolve().parents[2]  # rlhf_fast/kernels/_inspect.py -> the checkout
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
# Tables and the whole report
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
