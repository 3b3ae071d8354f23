"""In-place optimizer updates on flattened (1-D, contiguous) parameter views: torch.optim's rules.

Hyperparameters arrive as scalars of the parameter's dtype, so a float32 update stays in float32 and the
loops vectorise; the branches sit outside the loops for the same reason.

A big parameter is updated on all of numba's threads, but only while SciPy's OpenBLAS is on one thread
(blas.py: once the sparse kernels run, numba owns the cores; before that, OpenBLAS's spinning workers would
fight numba's). Measured on 2 cores, float32: SGD with momentum on 235k elements (MNIST 784x300) 61-73 ->
38-50 us, on 3.2M (784x4096) 3.1-3.5 -> 2.2-2.3 ms; Adam on 235k 336-347 -> 208-220 us. Each element is
updated by exactly one thread with the same operations, so the result does not depend on the thread count.
"""
import numpy as np
from numba import get_num_threads, njit, prange

from .blas import scipy_blas_single_threaded
from .jit import kernel, parallel_kernel

# Below this many elements starting the threads (a few microseconds) costs more than splitting saves
# (SGD at 32k elements: 7-9 us either way; at 64k: 16 -> 12 us).
PARALLEL_MIN_SIZE = 1 << 16


def update_parts(n):
    """How many threads an update of n elements uses: all of numba's for a big one that may use them, else 1."""
    if n < PARALLEL_MIN_SIZE or not scipy_blas_single_threaded():
        return 1
    return get_num_threads()


# The loops run over whole (sliced) arrays from index 0: with a start index numba cannot prove
# non-negative, every access gets a negative-index check and the loop stops vectorising (7x slower).
@njit(inline='always')
def _sgd(p, g, buf, lr, momentum, weight_decay, nesterov):
    if momentum == 0:
        for i in range(p.shape[0]):
            p[i] -= lr * (g[i] + weight_decay * p[i])
    elif nesterov:
        for i in range(p.shape[0]):
            d = g[i] + weight_decay * p[i]
            buf[i] = momentum * buf[i] + d
            p[i] -= lr * (d + momentum * buf[i])
    else:
        for i in range(p.shape[0]):
            buf[i] = momentum * buf[i] + g[i] + weight_decay * p[i]
            p[i] -= lr * buf[i]


@kernel
def _sgd_serial(p, g, buf, lr, momentum, weight_decay, nesterov):
    _sgd(p, g, buf, lr, momentum, weight_decay, nesterov)


@parallel_kernel
def _sgd_parallel(p, g, buf, lr, momentum, weight_decay, nesterov, parts):
    n = p.shape[0]
    for t in prange(parts):
        lo, hi = n * t // parts, n * (t + 1) // parts
        _sgd(p[lo:hi], g[lo:hi], buf[lo:hi], lr, momentum, weight_decay, nesterov)


def sgd_step(p, g, buf, lr, momentum, weight_decay, nesterov):
    """SGD with weight decay and (Nesterov) momentum; buf starts at zeros, so buf = g on the first step."""
    parts = update_parts(p.shape[0])
    if parts > 1:
        _sgd_parallel(p, g, buf, lr, momentum, weight_decay, nesterov, parts)
    else:
        _sgd_serial(p, g, buf, lr, momentum, weight_decay, nesterov)


@njit(inline='always')
def _adam(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt):
    one_b1 = 1 - beta1
    one_b2 = 1 - beta2
    for i in range(p.shape[0]):
        d = g[i] + weight_decay * p[i]
        mi = beta1 * m[i] + one_b1 * d
        vi = beta2 * v[i] + one_b2 * d * d
        m[i] = mi
        v[i] = vi
        p[i] -= step_size * mi / (np.sqrt(vi) * inv_bias2_sqrt + eps)


@kernel
def _adam_serial(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt):
    _adam(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt)


@parallel_kernel
def _adam_parallel(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt, parts):
    n = p.shape[0]
    for t in prange(parts):
        lo, hi = n * t // parts, n * (t + 1) // parts
        _adam(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt)


def adam_step(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt):
    """Adam (L2 weight decay added to the gradient, as torch.optim.Adam) with the bias corrections
    precomputed by the caller: step_size = lr / (1 - beta1^t), inv_bias2_sqrt = 1 / sqrt(1 - beta2^t)."""
    parts = update_parts(p.shape[0])
    if parts > 1:
        _adam_parallel(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt, parts)
    else:
        _adam_serial(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt)
