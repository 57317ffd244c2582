// Included once per CPU capability (kernels.<cap>.cpp): compiles every kernel of csrc/cpu/kernels/
// for CPU_CAPABILITY; each kernel header registers itself in its op's stub (see csrc/cpu/dispatch.h).
#pragma once

#if !defined(CPU_CAPABILITY)
#error "compile through setup.py, which sets CPU_CAPABILITY for each kernels.<cap>.cpp"
#endif

#include "../kernels/gather_logprobs_kernel.h"
#include "../kernels/ppo_losses_kernel.h"
#include "../kernels/linear_logprobs_kernel.h"
#include "../kernels/gae_kernel.h"
#include "../kernels/ranking_loss_kernel.h"
