"""In-place optimizer updates on flattened (1-D, contiguous) parameter views: torch.optim's rules.

Hyperparameters arrive as scalars of the parameter's dtype, so a float32 update stays in float32 and the
loops vectorise; the branches sit outside the loops for the same reason.
"""
import numpy as np
from numba import njit


@njit(cache=True)
def sgd_step(p, g, buf, lr, momentum, weight_decay, nesterov):
    """SGD with weight decay and (Nesterov) momentum; buf starts at zeros, so buf = g on the first step."""
    n = p.shape[0]
    if momentum == 0:
        for i in range(n):
            p[i] -= lr * (g[i] + weight_decay * p[i])
    elif nesterov:
        for i in range(n):
            d = g[i] + weight_decay * p[i]
            buf[i] = momentum * buf[i] + d
            p[i] -= lr * (d + momentum * buf[i])
    else:
        for i in range(n):
            buf[i] = momentum * buf[i] + g[i] + weight_decay * p[i]
            p[i] -= lr * buf[i]


@njit(cache=True)
def adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """Adam (L2 weight decay added to the gradient, as torch.optim.Adam); step counts from 1."""
    bias1 = 1 - beta1 ** step
    bias2_sqrt = np.sqrt(1 - beta2 ** step)
    step_size = lr / bias1
    for i in range(p.shape[0]):
        d = g[i] + weight_decay * p[i]
        m[i] = beta1 * m[i] + (1 - beta1) * d
        v[i] = beta2 * v[i] + (1 - beta2) * d * d
        p[i] -= step_size * m[i] / (np.sqrt(v[i]) / bias2_sqrt + eps)
