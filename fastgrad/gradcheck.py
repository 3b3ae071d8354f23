"""Finite-difference check of backward."""
import numpy as np

from .core import TensorNode, no_grad


class GradcheckError(AssertionError):
    """backward disagrees with finite differences; the message names the worst element."""


def gradcheck(fn, *arrays, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0):
    """Runs fn on float64 nodes made from `arrays` and compares backward with central differences.

    A non-scalar output is reduced to sum(output * R) with a fixed random R, so every output element counts.
    Returns True, or raises GradcheckError naming the input, the element and both values.
    """
    values = [np.array(a, dtype=np.float64) for a in arrays]
    nodes = [TensorNode(v) for v in values]
    out = fn(*nodes)
    weights = np.ones(out.shape) if out.value.size == 1 else np.random.default_rng(seed).standard_normal(out.shape)

    def scalar(output):
        return float((np.asarray(output.value, dtype=np.float64) * weights).sum())

    loss = out if out.value.size == 1 else (out * TensorNode(weights, requires_grad=False)).sum()
    loss.backward()
    worst = None
    for k, (node, value) in enumerate(zip(nodes, values)):
        analytic = node.grad
        for index in np.ndindex(value.shape):
            original = value[index]
            with no_grad():
                value[index] = original + eps
                up = scalar(fn(*[TensorNode(v) for v in values]))
                value[index] = original - eps
                down = scalar(fn(*[TensorNode(v) for v in values]))
            value[index] = original
            numeric = (up - down) / (2 * eps)
            excess = abs(analytic[index] - numeric) - (atol + rtol * abs(numeric))
            if excess > 0 and (worst is None or excess > worst[0]):
                worst = (excess, k, index, analytic[index], numeric)
    if worst is not None:
        _, k, index, a, n = worst
        raise GradcheckError(f'gradcheck: input {k} element {index}: backward gives {a:.8g}, '
                             f'finite differences give {n:.8g}')
    return True
