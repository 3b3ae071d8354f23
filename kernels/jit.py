"""The decorators every kernel uses.

cache=True: later processes load compiled code instead of compiling (see DESIGN.md for the costs).
error_model='numpy': a float division by zero gives inf/nan as in numpy instead of a per-element check
that raises ZeroDivisionError; that check also stops LLVM from vectorising the loop (Adam's update on
235k floats: 1.2 ms with it, 0.34 ms without).
parallel_kernel: for the few loops that are worth splitting over cores (the sparse-input products, a few
hundred microseconds each, and the optimizer updates of big parameters); a parallel region costs
microseconds to start, so small loops stay serial.
"""
from numba import njit

kernel = njit(cache=True, error_model='numpy')
parallel_kernel = njit(cache=True, error_model='numpy', parallel=True)
