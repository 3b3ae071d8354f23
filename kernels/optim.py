"""In-place optimizer updates on flattened (1-D, contiguous) parameter views: torch.optim's rules.

Hyperparameters arrive as scalars of the parameter's dtype, so a float32 update stays in float32 and the
loops vectorise; the branches sit outside the loops for the same reason.
"""
import numpy as np

from .jit import kernel


@kernel
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


@kernel
def adam_step(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt):
    """Adam (L2 weight decay added to the gradient, as torch.optim.Adam) with the bias corrections
    precomputed by the caller: step_size = lr / (1 - beta1^t), inv_bias2_sqrt = 1 / sqrt(1 - beta2^t)."""
    one_b1 = 1 - beta1
    one_b2 = 1 - beta2
    for i in range(p.shape[0]):
        d = g[i] + weight_decay * p[i]
        mi = beta1 * m[i] + one_b1 * d
        vi = beta2 * v[i] + one_b2 * d * d
        m[i] = mi
        v[i] = vi
        p[i] -= step_size * mi / (np.sqrt(vi) * inv_bias2_sqrt + eps)
