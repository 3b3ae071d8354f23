"""Matrix products through numba's np.dot, which calls SciPy's OpenBLAS.

Every matmul of a training step, evaluation included, goes through this one BLAS: numpy's `@` calls
numpy's own BLAS, and two BLAS thread pools in one loop fight over the cores. Which threads BLAS may
use is fastgrad's thread policy (fastgrad/backend.py), not the kernels'.
"""
from .jit import kernel


@kernel
def matmul(a, b):
    """a @ b for 2-D arrays of one dtype (C- or F-contiguous)."""
    return a @ b
