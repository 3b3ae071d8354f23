"""In-place optimizer updates on flattened (1-D, contiguous) parameter views, or row by row on 2-D ones
(apply_row_update): torch.optim's rules.

Every rule runs through one launcher, `update`, serial or split over `parts` threads: an update rule is
an inline loop over a slice (below), a code in RULES, and a branch in `apply_update`. Hyperparameters arrive as
one small array of the parameter's dtype (one argument, not six: each costs the dispatcher time), so a
float32 update stays in float32 and the loops vectorise; the branches sit outside the loops for the same
reason. Each element is updated by exactly one thread with the
same operations, so the result does not depend on the number of parts.

A state value (momentum, Adam's moments while its eps is not tiny: see _adam) smaller in magnitude than the
dtype's smallest normal number is stored as zero, as a CPU flushing denormals would: a momentum whose
gradient stays zero (an input that is rarely nonzero, such as MNIST's border pixels) decays through the
denormal range for hundreds of steps, and x86 takes microcode assists on denormal arithmetic. Its share of
the parameter's step is then below the parameter's own rounding, so the parameters move as under
torch.optim.
"""
import numpy as np
from numba import njit, prange

from .jit import kernel, parallel_kernel

SGD, NESTEROV, ADAM = 0, 1, 2
RULES = {'sgd': SGD, 'nesterov': NESTEROV, 'adam': ADAM}


@njit(inline='always')
def _flushed(v, tiny):
    """v, or zero where |v| < tiny (a denormal; NaN stays NaN)."""
    return v if not abs(v) < tiny else v * 0


# The loops run over whole (sliced) arrays from index 0: with a start index numba cannot prove
# non-negative, every access gets a negative-index check and the loop stops vectorising.
@njit(inline='always')
def _sgd(p, g, buf, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD; buf starts at zeros, so buf = d on the first step (unused without momentum)."""
    tiny = p.dtype.type(np.finfo(p.dtype).tiny)
    if momentum == 0:
        for i in range(p.shape[0]):
            p[i] -= lr * (g[i] + weight_decay * p[i])
    elif nesterov:
        for i in range(p.shape[0]):
            d = g[i] + weight_decay * p[i]
            b = _flushed(momentum * buf[i] + d, tiny)
            buf[i] = b
            p[i] -= lr * (d + momentum * b)
    else:
        for i in range(p.shape[0]):
            b = _flushed(momentum * buf[i] + g[i] + weight_decay * p[i], tiny)
            buf[i] = b
            p[i] -= lr * b


@njit(inline='always')
def _adam(p, g, m, v, step_size, beta1, beta2, eps, weight_decay, inv_bias2_sqrt):
    """torch.optim.Adam (L2 weight decay added to the gradient), with the bias corrections precomputed:
    step_size = lr / (1 - beta1^t), inv_bias2_sqrt = 1 / sqrt(1 - beta2^t)."""
    one_b1 = 1 - beta1
    one_b2 = 1 - beta2
    # Adam divides by sqrt(v) + eps: flushing is safe only where a denormal v's share of that (at most
    # sqrt(tiny) * inv_bias2_sqrt) is below eps's own rounding; with a smaller eps (eps=0 makes Adam
    # scale-invariant, so even tiny gradients take full steps) the moments are kept as they are
    info = np.finfo(p.dtype)
    safe = np.sqrt(info.tiny) * inv_bias2_sqrt <= eps * info.eps
    tiny = p.dtype.type(info.tiny if safe else 0)
    for i in range(p.shape[0]):
        d = g[i] + weight_decay * p[i]
        mi = _flushed(beta1 * m[i] + one_b1 * d, tiny)
        vi = _flushed(beta2 * v[i] + one_b2 * d * d, tiny)
        m[i] = mi
        v[i] = vi
        p[i] -= step_size * mi / (np.sqrt(vi) * inv_bias2_sqrt + eps)


@njit(inline='always')
def apply_update(rule, p, g, s1, s2, h):
    """One parameter's update on this thread, inlined where it is called (a compiled step calls it for each
    parameter too small to split, so that no kernel call remains per parameter)."""
    if rule == ADAM:
        _adam(p, g, s1, s2, h[0], h[1], h[2], h[3], h[4], h[5])
    else:
        _sgd(p, g, s1, h[0], h[1], h[2], rule == NESTEROV)


@kernel
def update_serial(rule, p, g, s1, s2, h):
    apply_update(rule, p, g, s1, s2, h)


@parallel_kernel
def update_parallel(rule, p, g, s1, s2, h, parts):
    n = p.shape[0]
    for t in prange(parts):
        lo, hi = n * t // parts, n * (t + 1) // parts
        # a state that is not used (SGD without momentum) is empty: its slice stays empty
        a, b = s1[min(lo, s1.shape[0]):min(hi, s1.shape[0])], s2[min(lo, s2.shape[0]):min(hi, s2.shape[0])]
        apply_update(rule, p[lo:hi], g[lo:hi], a, b, h)


@njit(inline='always')
def apply_row_update(rule, p, g, s1, s2, h, j):
    """apply_update on row j of 2-D arrays p and its state s1, s2 (like p, or (rows, 0) when unused) from g
    (1-D): their rows may be longer than g (padded to whole cache lines: see linear.sparse_weight_grad_update);
    only the first len(g) entries change."""
    m = g.shape[0]
    apply_update(rule, p[j][:m], g, s1[j][:m], s2[j][:m], h)


@njit(inline='always')
def apply_rows(rule, p, g, s1, s2, h):
    """apply_row_update for every row of g (2-D) on this thread (inlined where it is called, as apply_update)."""
    for j in range(g.shape[0]):
        apply_row_update(rule, p, g[j], s1, s2, h, j)


@parallel_kernel
def update_rows(rule, p, g, s1, s2, h, parts):
    """apply_rows with the rows split over `parts` threads (parts > 1)."""
    n = g.shape[0]
    for t in prange(parts):
        for j in range(n * t // parts, n * (t + 1) // parts):
            apply_row_update(rule, p, g[j], s1, s2, h, j)


def update(rule, p, g, s1, s2, hyper, parts=1):
    """Updates p (and its state s1, s2: arrays like p, or empty when the rule does not use them) in place
    from its gradient g, on `parts` threads. hyper: an array of six numbers of p's dtype, the rule's hyperparameters
    in its loop's order, padded with zeros (SGD: lr, momentum, weight_decay; Adam: step_size, beta1,
    beta2, eps, weight_decay, inv_bias2_sqrt)."""
    if parts > 1:
        update_parallel(rule, p, g, s1, s2, hyper, parts)
    else:
        update_serial(rule, p, g, s1, s2, hyper)
