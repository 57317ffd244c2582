// RLHF_FAST_HD marks the row math shared by the CPU and CUDA kernels: __host__ __device__ under
// nvcc/hipcc, plain inline for the C++ compiler.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLHF_FAST_HD __host__ __device__ __forceinline__
#else
#define RLHF_FAST_HD inline
#endif
