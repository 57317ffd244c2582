"""Compile-only check of the CUDA kernels with nvcc: no GPU needed, skipped without nvcc.

Every csrc/cuda/*.cu (today ranking_loss.cu alone) is compiled once (`nvcc -c`, no link) for sm_80
and sm_90 with the flags setup.py's CUDAExtension uses, and ptxas's report (`-Xptxas -v`) is read: every kernel of every
file must build for every arch without register spills, and the kernels listed in KERNELS must be
there for every dtype. Run with `-s` to see the nvcc command
and the registers per kernel.

With a CPU-only torch (the development machines) the c10/cuda headers are shipped but the generated
c10/cuda/impl/cuda_cmake_macros.h is not; -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips that include (all
it defines is a Windows DLL-export switch), and is added only when the header is missing.
"""

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhf_fast.kernels._inspect import _demangle

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
# setup.py: CUDAExtension(extra_compile_args={"nvcc": [...]})
SETUP_NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
# What torch's BuildExtension adds to every nvcc call (torch.utils.cpp_extension.COMMON_NVCC_FLAGS),
# used if that private constant ever disappears.
FALLBACK_COMMON_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                              "--expt-relaxed-constexpr"]
# ranking_loss_fwd_kernel<T> and ranking_loss_bwd_kernel<T>: one instance per dtype of the rewards.
# Per source file: kernel name -> number of template variants expected per dtype.
KERNELS = {"ranking_loss.cu": {"ranking_loss_fwd_kernel": 1, "ranking_loss_bwd_kernel": 1}}
DTYPES = {"float": "If", "bfloat16": "IN3c108BFloat16E", "float16": "IN3c104HalfE"}

pytestmark = pytest.mark.slow


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@dataclass
class KernelReport:
    mangled: str
    arch: str
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1


@dataclass
class Build:
    source: Path
    command: list
    returncode: int
    output: str
    seconds: float
    kernels: list = field(default_factory=list)


def parse_ptxas(output):
    """ptxas -v prints, per entry function and arch:
         ptxas info    : Compiling entry function '<mangled>' for 'sm_80'
         ptxas info    : Function properties for <mangled>
             0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
         ptxas info    : Used 40 registers, used 1 barriers, ...
    (nvcc prints each arch's ptxas report in one piece, also with --threads)."""
    kernels, cur = [], None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = KernelReport(m.group(1), m.group(2))
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
    return kernels


_BUILDS = {}


@pytest.fixture(scope="module", params=SOURCES, ids=lambda p: p.name)
def build(request, tmp_path_factory):
    source = request.param
    if source not in _BUILDS:
        _BUILDS[source] = compile_source(source, tmp_path_factory.mktemp("nvcc"))
    return _BUILDS[source]


def compile_source(source, out_dir):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor in $CUDA_HOME/bin): the CUDA sources cannot be compiled here")
    from torch.utils import cpp_extension

    include_dirs = [str(ROOT / "csrc" / "include")] + cpp_extension.include_paths()
    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", FALLBACK_COMMON_NVCC_FLAGS))
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    if not any((Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for d in include_dirs):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU-only torch, see the module docstring
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    out = out_dir / (source.stem + ".o")
    command = ([nvcc, "-c", str(source), "-o", str(out)] + [f"-I{d}" for d in include_dirs] + common + defines
               + ["--compiler-options", "-fPIC"] + SETUP_NVCC_FLAGS + gencode
               + ["-Xptxas", "-v", "--threads", "0"])  # --threads 0: one ptxas per arch in parallel
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    result = Build(source, command, proc.returncode, output, seconds, parse_ptxas(output))
    print(f"\n{' '.join(command)}\nnvcc: exit {proc.returncode} after {seconds:.1f} s")
    return result


def test_nvcc_compiles(build):
    assert build.returncode == 0, "nvcc failed:\n" + build.output[-6000:]


def test_no_warnings_in_our_source(build):
    ours = [line for line in build.output.splitlines() if build.source.name in line and "warning" in line.lower()]
    assert not ours, "\n".join(ours)


def test_every_kernel_is_built_for_every_arch(build):
    assert build.returncode == 0, "nvcc failed, see test_nvcc_compiles"
    for arch in ARCHS:
        names = [k.mangled for k in build.kernels if k.arch == arch]
        assert names, f"{arch}: no kernel in {build.source.name}"
        for kernel, variants in KERNELS.get(build.source.name, {}).items():
            for dtype, code in DTYPES.items():
                found = [n for n in names if kernel + code in n]
                assert len(found) == variants, f"{arch}: expected {variants} {kernel} for {dtype}, got {found}"
    assert all(k.registers > 0 and k.spill_stores >= 0 for k in build.kernels), "unparsed ptxas report"


def test_no_register_spills(build):
    assert build.returncode == 0, "nvcc failed, see test_nvcc_compiles"
    assert build.kernels, "no ptxas report in nvcc's output:\n" + build.output[-3000:]
    names = _demangle([k.mangled for k in build.kernels])
    width = max(len(n) for n in names)
    print(f"\n{'kernel':<{width}}  arch   regs  stack  spill st/ld")
    for name, k in sorted(zip(names, build.kernels, strict=True), key=lambda nk: (nk[1].arch, nk[0])):
        print(f"{name:<{width}}  {k.arch}  {k.registers:4d}  {k.stack:5d}  {k.spill_stores}/{k.spill_loads}")
    spilled = [f"{n} ({k.arch}): {k.spill_stores} B stores, {k.spill_loads} B loads"
               for n, k in zip(names, build.kernels, strict=True) if k.spill_stores or k.spill_loads]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
