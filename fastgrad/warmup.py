"""Compile (or load from numba's cache) every kernel for one dtype, before timing or serving anything."""
import time

import numpy as np

from . import backend, kernels
from . import functions as F
from .core import TensorNode
from .modules import MLP, Linear
from .ops import BatchMM, MatrixMultiply
from .optim import SGD, Adam


def warmup(dtype=np.float32):
    """Runs every kernel once on tiny inputs of `dtype`, through the same calls training makes.

    The thread policy is left as it was found (the sparse-input path would hand the cores to numba).
    Returns the seconds it took: a cold compile the first time on a machine, a cache load after that.
    """
    start = time.perf_counter()
    dtype = np.dtype(dtype)
    with backend.threads_restored():
        backend.set_threads('auto')  # so that the sparse path and the threaded updates run and compile
        x = TensorNode(np.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4))
        targets = np.array([0, 1, 1])
        model = MLP(4, 2, hidden=5, activation='relu', dtype=dtype, rng=0)
        pixels = np.zeros((16, 256), dtype=dtype)  # big and sparse enough for the sparse-input kernels
        pixels[:, ::10] = 1
        # and a weight big enough for the threaded optimizer updates (which run once the sparse path has run)
        sparse_layer = Linear(256, backend.PARALLEL_MIN_SIZE // 256, dtype=dtype, rng=0)
        losses = [F.cross_entropy(model(x), targets),
                  F.cross_entropy(sparse_layer(TensorNode(pixels, requires_grad=False), activation='relu'),
                                  np.zeros(16, dtype=np.int64)),
                  F.logceloss(F.logsoftmax(x), targets), F.celoss(F.softmax(x), targets),
                  (F.sigmoid(x) + F.relu(x) + F.tanh(x)).sum(),
                  (MatrixMultiply.do_forward(x, x.T) + BatchMM.do_forward(x, x)).sum()]
        for loss in losses:
            loss.backward()
        params = model.parameters() + sparse_layer.parameters()
        for optimizer in (SGD(params, lr=0.1), SGD(params, lr=0.1, momentum=0.9),
                          SGD(params, lr=0.1, momentum=0.9, nesterov=True), Adam(params)):
            optimizer.step()
        kernels.activate_loop(np.zeros(2, dtype), kernels.SIGMOID)  # the activations of compiled steps
    return time.perf_counter() - start
