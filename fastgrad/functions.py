"""Functions over nodes, with vugrad's names; each builds graph from the ops."""
import numpy as np

from .core import TensorNode
from .ops import CrossEntropy, Log, LogSoftmax, ReLU, Select, Sigmoid, Softmax, Sum, Tanh


def _targets(targets):
    return targets.value if isinstance(targets, TensorNode) else np.asarray(targets)


def sigmoid(x):
    return Sigmoid.do_forward(x)


def relu(x):
    return ReLU.do_forward(x)


def tanh(x):
    return Tanh.do_forward(x)


def softmax(x, axis=-1):
    """Softmax over `axis` (the last by default), stable for large logits."""
    return Softmax.do_forward(x) if axis == -1 else x.softmax(axis)


def logsoftmax(x, axis=-1):
    """log(softmax(x)) over `axis` (the last by default), computed as x - logsumexp(x)."""
    return LogSoftmax.do_forward(x) if axis == -1 else x.log_softmax(axis)


def celoss(probs, targets):
    """vugrad's cross-entropy of probabilities (n, classes) against integer targets, summed over the batch."""
    return logceloss(Log.do_forward(probs), targets)


def logceloss(logprobs, targets):
    """Cross-entropy from log-probabilities (n, classes), summed over the batch."""
    return Sum.do_forward(Select.do_forward(logprobs, indices=_targets(targets))) * -1.0


def cross_entropy(logits, targets, reduction='mean'):
    """Softmax cross-entropy straight from logits in one fused, stable op (PyTorch's F.cross_entropy)."""
    return CrossEntropy.do_forward(logits, targets=_targets(targets), reduction=reduction)
