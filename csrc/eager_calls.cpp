// Direct calls from Python into CPU entry points, for ops whose Python wrapper costs as much as their
// kernel. rlhf_fast.gae at (256, 2048) scans 9 MB in ~0.3 ms; from cold caches, validating, flattening
// and choosing a backend in Python and calling through torch.ops took another ~0.2 ms.
//
// Each function here takes the public function's arguments and returns None unless the call is the
// plain case it handles: exact torch.Tensor arguments on the CPU with the dtypes and layout its kernel
// takes, valid scalars, and no torch-function mode, dispatch mode (FakeTensorMode, ...) or functorch
// transform active. The Python caller then goes its usual way, which validates, raises the documented
// errors and dispatches through the custom op, so these never change what a call returns or raises,
// only how fast the plain case gets there. The caller must not call them while torch.compile traces.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>

#include "cpu/gae.h"
#include "eager_calls.h"

namespace rlhf_fast {
namespace {

// No Python mode or functorch transform is active on this thread: torch-function modes have their own
// flag, dispatch modes (FakeTensorMode, ...) a stack, and transforms and modes add these keys to the
// thread's included set.
bool plain_thread_state() {
  using K = c10::DispatchKey;
  static const c10::DispatchKeySet modal({K::Python, K::PythonTLSSnapshot, K::Functionalize,
                                          K::FuncTorchDynamicLayerBackMode, K::FuncTorchDynamicLayerFrontMode,
                                          K::FuncTorchVmapMode, K::PreDispatch, K::PythonDispatcher});
  return !at::impl::torch_function_mode_enabled() && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !c10::impl::tls_local_dispatch_key_set().included_.has_any(modal);
}

// `obj` is an exact torch.Tensor, a dense strided contiguous CPU tensor with no dispatch key beyond
// those of a plain CPU tensor (no subclass, functorch wrapper, functional, conjugate or negative view).
const at::Tensor* plain_cpu_tensor(PyObject* obj) {
  using K = c10::DispatchKey;
  static const c10::DispatchKeySet usual({K::ADInplaceOrView, K::AutogradCPU, K::AutocastCPU});
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.key_set() - usual != c10::DispatchKeySet(K::CPU) || !t.is_contiguous()) return nullptr;
  return &t;
}

struct WithoutGil {
  PyThreadState* saved = PyEval_SaveThread();
  WithoutGil() = default;
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;
  ~WithoutGil() { PyEval_RestoreThread(saved); }
};

bool is_unit_float(PyObject* obj, double* out) {
  if (!PyFloat_CheckExact(obj)) return false;
  *out = PyFloat_AS_DOUBLE(obj);
  return std::isfinite(*out) && *out >= 0.0 && *out <= 1.0;
}

PyObject* wrap_pair(std::tuple<at::Tensor, at::Tensor>&& out) {
  PyObject* first = THPVariable_Wrap(std::move(std::get<0>(out)));
  if (first == nullptr) return nullptr;
  PyObject* second = THPVariable_Wrap(std::move(std::get<1>(out)));
  if (second == nullptr) {
    Py_DECREF(first);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, first, second);
  Py_DECREF(first);
  Py_DECREF(second);
  return pair;
}

// gae(rewards, values, mask, cu_seqlens, gamma, lam, whiten) -> (advantages, returns) or None. Padded:
// rewards (B, T) and cu_seqlens None; packed: rewards (N,) and cu_seqlens (S+1,) int64, whose values the
// entry point checks, raising the errors the cpu backend raises on the usual path.
PyObject* gae(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError,
                    "gae: expected 7 arguments (rewards, values, mask, cu_seqlens, gamma, lam, whiten)");
    return nullptr;
  }
  double gamma = 0, lam = 0;
  const bool packed = args[3] != Py_None;
  const at::Tensor* rewards = plain_cpu_tensor(args[0]);
  const at::Tensor* values = plain_cpu_tensor(args[1]);
  const at::Tensor* mask = plain_cpu_tensor(args[2]);
  const at::Tensor* cu_seqlens = packed ? plain_cpu_tensor(args[3]) : nullptr;
  if (rewards == nullptr || values == nullptr || mask == nullptr || (packed && cu_seqlens == nullptr) ||
      !is_unit_float(args[4], &gamma) || !is_unit_float(args[5], &lam) || (args[6] != Py_True && args[6] != Py_False) ||
      !plain_thread_state()) {
    Py_RETURN_NONE;
  }
  const auto dt = rewards->scalar_type();
  if (rewards->dim() != (packed ? 1 : 2) || values->sizes() != rewards->sizes() || mask->sizes() != rewards->sizes() ||
      values->scalar_type() != dt || mask->scalar_type() != at::kBool ||
      (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf) ||
      (packed && (cu_seqlens->dim() != 1 || cu_seqlens->numel() < 1 || cu_seqlens->scalar_type() != at::kLong))) {
    Py_RETURN_NONE;
  }
  const bool whiten = args[6] == Py_True;
  HANDLE_TH_ERRORS
  std::tuple<at::Tensor, at::Tensor> out;
  {
    WithoutGil unlocked;  // the kernel touches no Python object
    out = packed ? cpu::gae_fwd_cpu(*rewards, *values, *mask, *cu_seqlens, gamma, lam, whiten)
                 : cpu::gae_padded_cpu(*rewards, *values, *mask, gamma, lam, whiten);
  }
  return wrap_pair(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"gae", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&gae)), METH_FASTCALL,
     "gae(rewards, values, mask, cu_seqlens, gamma, lam, whiten): rlhf_fast.gae's plain CPU case, or None "
     "(see csrc/eager_calls.cpp)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* eager_call_methods() { return methods; }

}  // namespace rlhf_fast
