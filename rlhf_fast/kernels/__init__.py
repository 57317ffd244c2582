"""Triton kernels of rlhf_fast, installed as the subpackage ``rlhf_fast.kernels``.

One module per op, named after it; each holds its cost model, the ``@triton.jit`` kernels and the
plain-Python launchers that allocate outputs and choose block sizes. Importing a module here imports
triton; the op layer does it lazily, only when the triton backend is chosen.
"""
