"""vugrad.mnist: init() and load() as in vugrad, from fastgrad's checked offline MNIST (fastgrad.data),
without vugrad's download from yann.lecun.com and its mnist.pkl in the working directory."""
from ..data import mnist_arrays


def init():
    """Makes MNIST available (fastgrad caches it on first use; see fastgrad.data)."""
    mnist_arrays()


def load():
    """(training images (60000, 784), training labels (60000,), test images (10000, 784), test labels
    (10000,)), all uint8 as in vugrad: pixels 0-255, labels 0-9."""
    a = mnist_arrays()
    flat = {key: a[key].reshape(len(a[key]), -1) for key in ('train_images', 'test_images')}
    return flat['train_images'], a['train_labels'], flat['test_images'], a['test_labels']
