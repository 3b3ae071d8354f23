"""Convolutional training: one epoch of LeNet-5 on MNIST (compiled, as `fastgrad train --model lenet` runs it,
and eager, op by op), and LeNet's two convolutions and its first max-pool alone, at batch 128."""
import numpy as np

import fastgrad as fg
from fastgrad import conv

from .common import SEED, Trainer


def lenet_trainer(x, y, batch_size, compiled):
    """LeNet-5 at its default learning rate (0.05), its conv kernels compiled or loaded first."""
    conv.warm(np.float32)
    return Trainer(x, y, fg.LeNet(rng=SEED), batch_size, compiled, lr=0.05)


def mnist_images():
    """The 50,000 MNIST training images as (N, 1, 28, 28)."""
    (x, y), _, _ = fg.load_mnist(flatten=False)
    return x, y


class LeNetEpoch:
    """LeNet-5 (conv 6@5x5 pad 2, pool, conv 16@5x5, pool, 400-120-84-10, relu) on the 50,000 training images."""
    params = ([128], ['compiled', 'eager'])
    param_names = ['batch_size', 'mode']
    number = 1
    repeat = (1, 3, 120.0)
    timeout = 900

    def setup(self, batch_size, mode):
        self.trainer = lenet_trainer(*mnist_images(), batch_size, mode == 'compiled')

    def time_epoch(self, batch_size, mode):
        self.trainer.epoch()

    def track_images_per_second(self, batch_size, mode):
        """The same rate as time_epoch, measured over the first fifth of the epoch to keep the suite short."""
        return self.trainer.rate(len(self.trainer.x) // 5)
    track_images_per_second.unit = 'images/s'

    def peakmem_epoch(self, batch_size, mode):
        self.trainer.rate(len(self.trainer.x) // 5)


class LeNetLayers:
    """LeNet's layers one at a time, forward and backward (the ops' own forward and backward)."""
    params = (['conv1', 'conv2'],)
    param_names = ['layer']

    def setup(self, layer):
        rng = np.random.default_rng(SEED)
        shape, wshape, self.padding = {'conv1': ((128, 1, 28, 28), (6, 1, 5, 5), 2),
                                       'conv2': ((128, 6, 14, 14), (16, 6, 5, 5), 0)}[layer]
        self.x = fg.TensorNode(rng.random(shape, dtype=np.float32), requires_grad=layer != 'conv1')
        self.w = fg.TensorNode(rng.standard_normal(wshape).astype(np.float32) * 0.1)
        self.b = fg.TensorNode(np.zeros(wshape[0], np.float32))
        self.y = fg.conv2d(self.x, self.w, self.b, 1, self.padding, 'relu')
        self.g = rng.standard_normal(self.y.shape).astype(np.float32)
        self.pool_x = fg.TensorNode(np.ascontiguousarray(self.y.value))
        self.pool_y = fg.max_pool2d(self.pool_x, 2)
        self.pool_g = rng.standard_normal(self.pool_y.shape).astype(np.float32)
        self.time_forward(layer)
        self.time_backward(layer)
        self.time_max_pool_forward(layer)
        self.time_max_pool_backward(layer)

    def time_forward(self, layer):
        fg.conv2d(self.x, self.w, self.b, 1, self.padding, 'relu')

    def time_backward(self, layer):
        """Weight and bias gradients; conv2's input gradient too (conv1's input is the data)."""
        self.y.source.op.backward(self.y.source.context, self.g)

    def time_max_pool_forward(self, layer):
        fg.max_pool2d(self.pool_x, 2)

    def time_max_pool_backward(self, layer):
        self.pool_y.source.op.backward(self.pool_y.source.context, self.pool_g)
