"""Compile (or load from numba's cache) every kernel for one dtype, before timing or serving anything;
and say so while numba compiles, which on a cold cache (the first run on a machine) takes a while."""
import contextlib
import functools
import sys
import threading
import time

import numpy as np
from numba.core import event

from . import backend, kernels
from . import functions as F
from .core import TensorNode
from .kernels.batch import indices_within
from .kernels.linear import (act_bias_grad_rows, cache_line_rows, cache_line_width, first_columns, sparse_affine,
                             sparse_weight_grad_update)
from .kernels.optim import update_rows
from .modules import MLP, Linear
from .ops import BatchMM, MatrixMultiply
from .optim import SGD, Adam


def _tasks(dtype, training):
    """(what, call) pairs that run each kernel once on tiny inputs of `dtype`, through the calls training makes:
    all of them, or (training='dense' or 'sparse') those an MLP's training and evaluation run on such inputs."""
    x = TensorNode(np.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4))
    targets = np.array([0, 1, 1])
    model = MLP(4, 2, hidden=5, activation='relu', dtype=dtype, rng=0)
    pixels = np.zeros((16, 256), dtype=dtype)  # big and sparse enough for the sparse-input kernels
    pixels[:, ::10] = 1
    # and a weight big enough for the threaded optimizer updates (which run once the sparse path has run)
    sparse_layer = Linear(256, backend.PARALLEL_MIN_SIZE // 256, dtype=dtype, rng=0)
    params = model.parameters() + sparse_layer.parameters()

    def backward(loss):
        return lambda: loss().backward()

    def step(optimizer):
        return lambda: optimizer().step()

    mlp = [('linear and cross-entropy', backward(lambda: F.cross_entropy(model(x), targets))),
           ('sparse-input check', lambda: kernels.sparse_enough(pixels))]
    sparse = [('sparse-input linear', backward(lambda: F.cross_entropy(
        sparse_layer(TensorNode(pixels, requires_grad=False), activation='relu'), np.zeros(16, dtype=np.int64))))]
    updates = [('sgd', step(lambda: SGD(params, lr=0.1)))]  # one kernel for every rule (threaded once sparse ran)
    compiled = [('compiled-step activations',
                 lambda: kernels.activate_loop(np.zeros(2, dtype), np.zeros(2, dtype), kernels.SIGMOID)),
                ('compiled-epoch order check', lambda: indices_within(np.arange(3), 3))]

    def fused_update():  # a compiled step's update of a sparse-input weight (compile(..., keep_grads=False))
        wt, rule, h = np.zeros((256, 4), dtype), np.int64(kernels.RULES['sgd']), np.zeros(6, dtype)
        _, cols, count = sparse_affine(pixels, wt, wt[0], True, 1, 256)
        gz, _ = act_bias_grad_rows(np.zeros((16, 4), dtype), np.zeros((16, 4), dtype), kernels.RELU)
        sparse_weight_grad_update(pixels, cols, count, gz, 4, rule, wt, wt.copy(), wt[:, :0].copy(), h)
        update_rows(rule, first_columns(wt, 4), wt, wt.copy(), wt[:, :0].copy(), h, 1)  # its dense batches
        cache_line_rows(4, cache_line_width(4, wt.itemsize), wt.dtype)  # step.run's aligned rows
    sparse_compiled = [('compiled-step sparse update', fused_update)]
    if training == 'dense':
        return mlp + updates + compiled
    if training == 'sparse':
        return mlp + sparse + updates + compiled + sparse_compiled
    if training is not None:
        raise ValueError(f"warmup: training must be None, 'dense' or 'sparse', not {training!r}")
    return mlp + sparse + [
        ('log-softmax', backward(lambda: F.logceloss(F.logsoftmax(x), targets))),
        ('softmax', backward(lambda: F.celoss(F.softmax(x), targets))),
        ('activations', backward(lambda: (F.sigmoid(x) + F.relu(x) + F.tanh(x)).sum())),
        ('matmul', backward(lambda: (MatrixMultiply.do_forward(x, x.T) + BatchMM.do_forward(x, x)).sum())),
        *updates,
        ('momentum', step(lambda: SGD(params, lr=0.1, momentum=0.9))),
        ('nesterov', step(lambda: SGD(params, lr=0.1, momentum=0.9, nesterov=True))),
        ('adam', step(lambda: Adam(params))),
        *compiled,
        *sparse_compiled,
    ]


def warmup(dtype=np.float32, progress=False, training=None):
    """Runs every kernel once on tiny inputs of `dtype`, through the same calls training makes; with
    training='dense' or 'sparse', only those an MLP's training needs on dense or sparse inputs (the parallel
    sparse-input and threaded-update kernels, a third of a cold compile, only for 'sparse'; a dense layer's
    backward is a parallel kernel for both).

    The thread policy is left as it was found (the sparse-input path would hand the cores to numba).
    Returns the seconds it took: a cold compile the first time on a machine, a cache load after that.
    Inside announce_compiles (fastgrad train), the moment numba starts compiling it says so on stderr,
    and with progress=True shows a bar over the kernels.
    """
    start = time.perf_counter()
    dtype = np.dtype(dtype)
    notices = _notices.current
    with backend.threads_restored():
        backend.set_threads('auto')  # so that the sparse path and the threaded updates run and compile
        tasks = _tasks(dtype, training)
        if notices is not None:
            notices.warming = (dtype, tasks, progress)
        try:
            for k, (what, call) in enumerate(tasks):
                if notices is not None:
                    notices.task(k, what)
                call()
        finally:
            if notices is not None:
                notices.warmed()
    return time.perf_counter() - start


class CompileNotices(event.Listener):
    """Says on stderr when numba starts compiling, the first time in a warmup and once per function after
    that (the compiled training step compiles at its second call)."""

    def __init__(self):
        self.depth = 0
        self.warming = None  # (dtype, tasks, progress) while warmup runs
        self.bar = None
        self.started = None  # when warmup's first compile started
        self.said = set()

    def task(self, k, what):
        if self.bar is not None:
            self.bar.n = k
            self.bar.set_postfix_str(what, refresh=True)

    def warmed(self):
        if self.started is not None:
            if self.bar is not None:
                self.bar.n = self.bar.total
                self.bar.close()
            _say(f'compiled in {time.perf_counter() - self.started:.1f} s; '
                 'later runs load the kernels from numba\'s cache')
        self.warming, self.bar, self.started = None, None, None

    def on_start(self, ev):
        self.depth += 1
        if self.depth > 1:
            return
        if self.warming is not None:
            if self.started is None:
                dtype, tasks, progress = self.warming
                self.started = time.perf_counter()
                _say(f"compiling fastgrad's kernels for {dtype.name}, first run only (later runs load them "
                     f"from numba's cache)")
                if progress:
                    from tqdm import tqdm
                    self.bar = tqdm(total=len(tasks), desc='compiling', unit='kernel group', leave=False)
            return
        function = getattr((ev.data or {}).get('dispatcher'), 'py_func', None)
        name = getattr(function, '__name__', 'a function')
        if getattr(function, '__module__', '').startswith('fastgrad_step_'):  # fastgrad.compile's generated code
            name = f'the compiled training step ({name})'
        if name not in self.said:
            self.said.add(name)
            _say(f'compiling {name}, first run only (numba caches it for later runs)')

    def on_end(self, ev):
        self.depth -= 1


def _say(message):
    print(f'fastgrad: {message}', file=sys.stderr, flush=True)


class _Current(threading.local):
    current = None  # the CompileNotices active in this thread


_notices = _Current()


@contextlib.contextmanager
def compile_notices():
    """Within the block, say on stderr when numba starts compiling (see CompileNotices)."""
    if _notices.current is not None:  # nested: the outer one speaks
        yield _notices.current
        return
    listener = CompileNotices()
    _notices.current = listener
    event.register('numba:compile', listener)
    try:
        yield listener
    finally:
        event.unregister('numba:compile', listener)
        _notices.current = None


def announce_compiles(function):
    """Decorator: the function runs inside compile_notices()."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with compile_notices():
            return function(*args, **kwargs)
    return wrapper
