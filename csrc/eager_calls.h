// Methods of the rlhf_fast._C module (csrc/eager_calls.cpp).
#pragma once

#include <Python.h>

namespace rlhf_fast {
PyMethodDef* eager_call_methods();  // null-terminated
}  // namespace rlhf_fast
