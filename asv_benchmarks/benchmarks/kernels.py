"""The hot kernels at MNIST-MLP sizes (batch 128, 784 -> 300 -> 10), each beside plain numpy doing the same maths.

Inputs live at module level and every kernel runs once at import: asv times these microsecond
benchmarks without a setup, and compilation is not throughput. The parallel kernels run on numba's
threads with SciPy's OpenBLAS on one, as training runs them once an input is sparse.
"""
import numpy as np

from fastgrad import backend, kernels

backend.set_threads('numba')
PARTS = backend.sparse_parts()

_rng = np.random.default_rng(0)
X = _rng.random((128, 784), dtype=np.float32)
X_SPARSE = np.where(_rng.random(X.shape) < 0.19, X, 0).astype(np.float32)  # MNIST's share of nonzero pixels
W = (_rng.standard_normal((300, 784)) * 0.05).astype(np.float32)
W_T = np.ascontiguousarray(W.T)  # (in, out): what fastgrad's column-major w gives without a copy
B = np.zeros(300, np.float32)
Y, _ = kernels.linear_forward(X, W_T, B, kernels.RELU)
Y_SPARSE, NONZEROS = kernels.linear_forward(X_SPARSE, W_T, B, kernels.RELU, PARTS)
G = _rng.standard_normal((128, 300)).astype(np.float32)
LOGITS = (_rng.standard_normal((128, 10)) * 3).astype(np.float32)
TARGETS = _rng.integers(0, 10, 128)
PROBS = kernels.cross_entropy_forward(LOGITS, TARGETS)[1]
P = W.reshape(-1).copy()
GRAD = (_rng.standard_normal(P.size) * 1e-3).astype(np.float32)
BUF, M, V = np.zeros_like(P), np.zeros_like(P), np.zeros_like(P)
F32 = np.float32
kernels.linear_backward(X, W_T, Y, G, kernels.RELU, False)
kernels.linear_backward(X_SPARSE, W_T, Y_SPARSE, G, kernels.RELU, False, NONZEROS)
kernels.cross_entropy_backward(PROBS, TARGETS, 1 / 128)
SGD = np.array([0.01, 0.9, 0, 0, 0, 0], np.float32)
ADAM = np.array([1e-3 / (1 - 0.9 ** 10), 0.9, 0.999, 1e-8, 0, 1 / np.sqrt(1 - 0.999 ** 10)], np.float32)
UPDATE_PARTS = backend.numba_parts(P.size)
kernels.update(kernels.RULES['sgd'], P.copy(), GRAD, BUF.copy(), P[:0], SGD, UPDATE_PARTS)
kernels.update(kernels.RULES['adam'], P.copy(), GRAD, M.copy(), V.copy(), ADAM, UPDATE_PARTS)


def time_linear_relu_forward_fastgrad():
    kernels.linear_forward(X, W_T, B, kernels.RELU)


def time_linear_relu_forward_numpy():
    np.maximum(X @ W_T + B, 0)


def time_linear_relu_backward_fastgrad():
    kernels.linear_backward(X, W_T, Y, G, kernels.RELU, False)


def time_linear_relu_backward_numpy():
    gz = G * (Y > 0)
    X.T @ gz, gz.sum(axis=0)


def time_sparse_input_linear_relu_forward_fastgrad():
    """Deciding and finding the nonzeros included: what the first layer pays for an MNIST-like batch."""
    kernels.linear_forward(X_SPARSE, W_T, B, kernels.RELU, PARTS if kernels.sparse_enough(X_SPARSE) else 0)


def time_sparse_input_linear_relu_backward_fastgrad():
    kernels.linear_backward(X_SPARSE, W_T, Y_SPARSE, G, kernels.RELU, False, NONZEROS)


def time_cross_entropy_forward_fastgrad():
    kernels.cross_entropy_forward(LOGITS, TARGETS)


def time_cross_entropy_forward_numpy():
    shifted = LOGITS - LOGITS.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=1, keepdims=True, dtype=np.float64)
    (np.log(s[:, 0]) - shifted[np.arange(128), TARGETS]).sum(), e / s


def time_cross_entropy_backward_fastgrad():
    kernels.cross_entropy_backward(PROBS, TARGETS, 1 / 128)


def time_cross_entropy_backward_numpy():
    g = PROBS / 128
    g[np.arange(128), TARGETS] -= 1 / 128


def time_sgd_momentum_step_fastgrad():
    kernels.update(kernels.RULES['sgd'], P, GRAD, BUF, P[:0], SGD, UPDATE_PARTS)


def time_sgd_momentum_step_numpy():
    BUF.__imul__(F32(0.9))
    BUF.__iadd__(GRAD)
    P.__isub__(F32(0.01) * BUF)


def time_adam_step_fastgrad():
    kernels.update(kernels.RULES['adam'], P, GRAD, M, V, ADAM, UPDATE_PARTS)


def time_adam_step_numpy():
    M.__imul__(F32(0.9))
    M.__iadd__(F32(0.1) * GRAD)
    V.__imul__(F32(0.999))
    V.__iadd__(F32(0.001) * GRAD * GRAD)
    P.__isub__(F32(1e-3 / (1 - 0.9 ** 10)) * M / (np.sqrt(V) / F32(np.sqrt(1 - 0.999 ** 10)) + F32(1e-8)))
