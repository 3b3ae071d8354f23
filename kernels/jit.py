"""The decorators every kernel uses.

cache=True: later processes load the compiled code instead of compiling it again.
error_model='numpy': a float division by zero gives inf/nan as in numpy; numba's default checks every
division and raises ZeroDivisionError, and that check stops LLVM from vectorising the loop.
parallel_kernel: for the few loops worth splitting over cores (the sparse-input products, the images of a
convolution or max-pool, and the updates of big parameters); starting a parallel region costs
microseconds, so small loops stay serial. How many threads a parallel kernel uses is its caller's choice
(a `parts` argument): kernels never ask numba or BLAS for thread counts (numba's get_num_threads inside a
kernel would also stop it from being cached).
"""
from numba import njit

kernel = njit(cache=True, error_model='numpy')
parallel_kernel = njit(cache=True, error_model='numpy', parallel=True)
