// AVX2 build of every CPU kernel. setup.py compiles this file with the AVX2 flags and
// CPU_CAPABILITY=AVX2; the kernels themselves live in csrc/cpu/kernels/.
#include "register.h"
