// AVX512 build of every CPU kernel. setup.py compiles this file with the AVX512 flags and
// CPU_CAPABILITY=AVX512; the kernels themselves live in csrc/cpu/kernels/.
#include "register.h"
