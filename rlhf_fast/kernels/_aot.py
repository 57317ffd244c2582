"""Ahead-of-time compilation of the Triton kernels, without a GPU.

Each op module of rlhf_fast.kernels exposes ``aot_specs()``: the kernel configurations its launchers use
(signature as triton.jit specializes it at launch, constexprs, num_warps, num_stages), built with
``spec_from_args`` and deduplicated by ``SpecSet``. ``compile_spec`` compiles one with ``triton.compile``
for a ``GPUTarget`` (sm_80, sm_90a, ...); ``all_specs`` gathers every op's specs.

What is read from the compiled kernels is in rlhf_fast.kernels._inspect, the analytic cost model in
rlhf_fast.kernels._cost, and the command line (``rlhf-fast inspect``) in rlhf_fast.kernels._inspect_cli.
Compiling needs a process without ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` returns
interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

# Triton warns once per process that the FP fusion default will change; the kernels are written for
# fused multiply-adds (the CUDA default), so say so explicitly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton  # noqa: E402
except ImportError:  # the specs' dataclasses need no triton; building and compiling them do
    triton = None


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
# Compile
# ---------------------------------------------------------------------------------------------

def _require_compiler(spec: KernelSpec) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("rlhf_fast.kernels cannot compile ahead of time under TRITON_INTERPRET=1: @triton.jit then "
                           "builds interpreter objects. Run it in a process without TRITON_INTERPRET, e.g. "
                           "`env -u TRITON_INTERPRET rlhf-fast inspect`.")
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
