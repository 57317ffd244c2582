"""Build of rlhf_fast and its native extension rlhf_fast._C.

The C++ CPU kernels are always built (unless skipped); the CUDA kernels are added when the installed
torch has CUDA and nvcc is found. Knobs (environment variables):

  RLHF_FAST_SKIP_NATIVE=1        build no extension; the package then runs on its torch/Triton backends
  RLHF_FAST_CPU_CAPABILITIES     which SIMD variants of the CPU kernels to build, default
                                 "DEFAULT;AVX2;AVX512" (x86-64); the fastest one the CPU supports is
                                 picked at run time, the same way ATen picks its own kernels
  RLHF_FAST_CUDA_ARCHS           CUDA targets, e.g. "8.0;9.0" (default "8.0;9.0"; sets TORCH_CUDA_ARCH_LIST)
  RLHF_FAST_FORCE_CUDA=1         build the CUDA sources even if nvcc's presence cannot be confirmed
  MAX_JOBS                       parallel compile jobs (read by torch's ninja build)
"""

import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

# Every package under rlhf_fast/ (ops, kernels, pipeline, integrations, bench, ...) is found, not listed, so a
# new subpackage cannot be left out of the wheel. Nothing installs at the top level but rlhf_fast (a top-level
# `kernels` would shadow the package of that name that transformers imports). bench/ (pytest-benchmark
# suites) and tests/ stay in the source checkout.
PACKAGES = find_packages(include=["rlhf_fast", "rlhf_fast.*"])

# Per-capability compiler flags, matching the ones ATen uses for its own kernels. A source named
# `*.avx2.cpp` is compiled with these flags and `CPU_CAPABILITY=AVX2`, so at::vec::Vectorized
# really uses 256-bit registers; without the defines at::vec silently falls back to scalar code.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def _cpu_capabilities():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["DEFAULT"]
    wanted = os.environ.get("RLHF_FAST_CPU_CAPABILITIES", "DEFAULT;AVX2;AVX512")
    caps = [c.strip().upper() for c in wanted.replace(",", ";").split(";") if c.strip()]
    unknown = sorted(set(caps) - set(CPU_CAPABILITY_FLAGS))
    if unknown:
        raise SystemExit(f"RLHF_FAST_CPU_CAPABILITIES: unknown capability {unknown}, expected a subset of "
                         f"{sorted(CPU_CAPABILITY_FLAGS)}")
    if "DEFAULT" not in caps:
        caps.insert(0, "DEFAULT")  # the fallback every machine can run
    return caps


def _capability_of(source):
    """`csrc/cpu/kernels.avx512.cpp` -> "AVX512"; plain sources -> None."""
    parts = os.path.basename(source).split(".")
    return parts[-2].upper() if len(parts) >= 3 and parts[-2].upper() in CPU_CAPABILITY_FLAGS else None


def _native_extensions():
    if os.environ.get("RLHF_FAST_SKIP_NATIVE", "0") == "1":
        print("rlhf_fast: RLHF_FAST_SKIP_NATIVE=1, building no native extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    caps = _cpu_capabilities()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # One translation unit per SIMD capability; csrc/cpu/capability/kernels.cpp includes every kernel.
    sources += [f"csrc/cpu/capability/kernels.{c.lower()}.cpp" for c in caps]
    define_macros = [("RLHF_FAST_CPU_CAPABILITIES", '"' + ";".join(caps) + '"')]
    define_macros += [(f"RLHF_FAST_HAVE_{c}", "1") for c in caps]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    link_flags = ["-fopenmp"]

    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    with_cuda = torch.version.cuda is not None and (
        (nvcc is not None and os.path.exists(nvcc)) or os.environ.get("RLHF_FAST_FORCE_CUDA") == "1")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("RLHF_FAST_CUDA_ARCHS", "8.0;9.0"))
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("RLHF_FAST_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "rlhf_fast._C", sources, define_macros=define_macros, include_dirs=[os.path.abspath("csrc/include")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link_flags)
    else:
        print(f"rlhf_fast: building CPU kernels only (torch CUDA: {torch.version.cuda}, nvcc: {nvcc})")
        ext = CppExtension(
            "rlhf_fast._C", sources, define_macros=define_macros, include_dirs=[os.path.abspath("csrc/include")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    class BuildNative(BuildExtension):
        """Compiles each `*.<capability>.cpp` source with that capability's flags and defines."""

        def build_extension(self, ext):
            compile_all = self.compiler.compile

            def compile_by_capability(sources, *args, extra_postargs=None, **kwargs):
                objects = []
                groups = {}
                for src in sources:
                    groups.setdefault(_capability_of(src), []).append(src)
                for cap, group in groups.items():
                    post = extra_postargs
                    if cap is not None:
                        flags = CPU_CAPABILITY_FLAGS[cap] + [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
                        if isinstance(post, dict):
                            post = dict(post, cxx=list(post.get("cxx", [])) + flags)
                        else:
                            post = list(post or []) + flags
                    objects += compile_all(group, *args, extra_postargs=post, **kwargs)
                return objects

            self.compiler.compile = compile_by_capability
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_all

    return [ext], {"build_ext": BuildNative}


ext_modules, cmdclass = _native_extensions()

setup(
    packages=PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
