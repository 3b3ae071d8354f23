"""Row-wise softmax, log-softmax and fused softmax-cross-entropy on 2-D arrays (n, classes).

Every row is shifted by its maximum before exp; sums are accumulated in float64.
"""
import numpy as np

from .jit import kernel


@kernel
def log_softmax(x):
    """log softmax of each row of x, in x's dtype."""
    n, c = x.shape
    out = np.empty_like(x)
    for i in range(n):
        mx = x[i, 0]
        for j in range(1, c):
            if x[i, j] > mx:
                mx = x[i, j]
        s = 0.0
        for j in range(c):
            s += np.exp(np.float64(x[i, j]) - mx)
        lse = mx + np.log(s)
        for j in range(c):
            out[i, j] = x[i, j] - lse
    return out


@kernel
def softmax(x):
    """softmax of each row of x, in x's dtype."""
    return np.exp(log_softmax(x))


@kernel
def log_softmax_backward(logp, g):
    """dL/dx = g - softmax(x) * rowsum(g), from the saved log-probabilities."""
    n, c = g.shape
    gx = np.empty_like(g)
    for i in range(n):
        s = 0.0
        for j in range(c):
            s += g[i, j]
        for j in range(c):
            gx[i, j] = g[i, j] - np.exp(logp[i, j]) * s
    return gx


# The rows' softmax denominators (each between 1 and the number of classes) are multiplied together and
# their log taken once the product passes LOG_PRODUCT_MAX, instead of one log per row.
LOG_PRODUCT_MAX = 1e280


@kernel
def cross_entropy_forward(logits, targets):
    """Summed negative log-likelihood of targets under softmax(logits) (float64), the probabilities, and
    the position of the first target outside [0, classes) (-1 if none; nothing is computed then).

    exp runs in the logits' dtype, sums in float64. A compiled step's small layers write the same arithmetic
    out as loops (fastgrad/compiled.py, _loop_cross_entropy)."""
    n, c = logits.shape
    probs = np.empty_like(logits)
    total = 0.0
    for i in range(n):
        if targets[i] < 0 or targets[i] >= c:
            return total, probs, i
    product = 1.0
    for i in range(n):
        mx = logits[i, 0]
        for j in range(1, c):
            if logits[i, j] > mx:
                mx = logits[i, j]
        s = 0.0
        for j in range(c):
            e = np.exp(logits[i, j] - mx)
            probs[i, j] = e
            s += e
        for j in range(c):
            probs[i, j] = probs[i, j] / s
        total += np.float64(mx) - logits[i, targets[i]]
        product *= s
        if product > LOG_PRODUCT_MAX:
            total += np.log(product)
            product = 1.0
    return total + np.log(product), probs, -1


@kernel
def cross_entropy_backward(probs, targets, scale):
    """(probs - onehot(targets)) * scale: the gradient of the loss over the logits."""
    n, c = probs.shape
    g = np.empty_like(probs)
    for i in range(n):
        for j in range(c):
            g[i, j] = probs[i, j] * scale
        g[i, targets[i]] -= scale
    return g
