"""vugrad.functions: the data loaders with vugrad's data, and fastgrad's functions under vugrad's names.

softmax and logsoftmax are fastgrad's stable ops (vugrad's softmax overflows for logits above ~700)."""
import numpy as np

from ..data import synth_labels
from ..functions import celoss, logceloss, sigmoid, softmax, logsoftmax
from .mnist import init, load


MNIST_VALIDATION = 5_000  # vugrad validates on the last 5,000 training images


def load_synth(num_train=60_000, num_val=10_000):
    """vugrad's synthetic task, float64, drawn from numpy's global random state (seed it with np.random.seed):
    2 standard-normal features, class 1 where x^T [[1, .5], [1, .2]] x > 0.6.

    Returns (xtrain, ytrain), (xval, yval), 2."""
    x = np.random.randn(num_train + num_val, 2)
    y = synth_labels(x)
    return (x[:num_train], y[:num_train]), (x[num_train:], y[num_train:]), 2


def load_mnist(final=False, flatten=True):
    """vugrad's MNIST: raw uint8 pixels (0-255) and uint8 labels. final=False: the first 55,000 training
    images train and the last 5,000 validate; final=True: all 60,000 train and the 10,000 test images
    validate. flatten=True gives images of shape (n, 784), flatten=False (n, 28, 28).

    Returns (xtrain, ytrain), (xval, yval), 10."""
    xtrain, ytrain, xtest, ytest = load()
    if not flatten:
        xtrain, xtest = xtrain.reshape(-1, 28, 28), xtest.reshape(-1, 28, 28)
    if not final:
        cut = len(xtrain) - MNIST_VALIDATION
        return (xtrain[:cut], ytrain[:cut]), (xtrain[cut:], ytrain[cut:]), 10
    return (xtrain, ytrain), (xtest, ytest), 10
