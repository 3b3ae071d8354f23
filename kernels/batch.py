"""A batch gathered from a dataset's rows (a compiled epoch's first step of every batch), and the check of the
row indices it is gathered by."""
from numba import prange

from .jit import kernel, parallel_kernel


@kernel
def indices_within(indices, n):
    """Whether every entry of indices (1-D integers) is in 0..n-1: one pass that vectorises, where numpy's
    min() and max() take two."""
    outside = False
    for i in range(indices.shape[0]):
        outside |= (indices[i] < 0) | (indices[i] >= n)
    return not outside


@parallel_kernel
def gather_rows(src, order, start, dst, parts):
    """dst[r] = src[order[start + r]] for every row r of dst (2-D arrays), the rows split over `parts`
    threads: the rows come from all over a big dataset, and two cores wait for memory side by side."""
    n = dst.shape[0]
    for t in prange(parts):
        for r in range(n * t // parts, n * (t + 1) // parts):
            d, s = dst[r], src[order[start + r]]
            for q in range(d.shape[0]):
                d[q] = s[q]
