import os

# Triton kernels run on CPU tensors only in Triton's interpreter, which must be switched on before
# triton is imported. Ahead-of-time GPU compilation is tested in subprocesses without it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter runs tl.dot as a numpy matmul: OpenBLAS threads only add overhead at tile sizes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("RLHF_FAST_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402

import rlhf_fast  # noqa: E402

# Backends that can run on this machine's CPU tensors.
CPU_BACKENDS = [name for name, reasons in rlhf_fast.backends_available("cpu").items() if not reasons]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
