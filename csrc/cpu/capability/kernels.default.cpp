// DEFAULT build of every CPU kernel. setup.py compiles this file with the DEFAULT flags and
// CPU_CAPABILITY=DEFAULT; the kernels themselves live in csrc/cpu/kernels/.
#include "register.h"
