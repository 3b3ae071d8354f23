"""The one boundary between fastgrad's ops and optimizers and the numba kernels (fastgrad.kernels).

- OP_KERNELS: the kernels each built-in op runs, forward and backward (an op not in it runs on numpy);
- prepare(): the arrays as the kernels take them, one floating dtype, C-contiguous;
- update(): the optimizers' one kernel;
- who owns the cores: numba's parallel kernels or SciPy's OpenBLAS (threads(), set_threads()).

Threads. numba's parallel loops and OpenBLAS's workers both spin while they wait; on a small machine two
pools stole each other's cores and a step took several times as long. So one of them owns the cores at a
time: 'blas' (OpenBLAS keeps its threads for the dense products; no numba threads run: the sparse-input
path is off, optimizer updates and convolutions are serial) or 'numba' (SciPy's OpenBLAS on one thread; the
sparse-input products, convolutions (an image per thread at a time), the updates of big parameters and a
dense layer's two backward products (one on each thread) run on numba's threads). The default policy,
'auto', starts with 'blas' and hands the cores to numba for the rest of the process the first time a
sparse input, a convolution or a max-pool comes, since then those kernels dominate a step. numpy's own
BLAS is never touched.
"""
import contextlib
import os
from typing import Callable, NamedTuple

import numba
import numpy as np

from . import kernels
from .kernels.optim import update_parallel, update_serial


class OpKernels(NamedTuple):
    forward: Callable
    backward: Callable = None  # None: backward is numpy arithmetic in the op


OP_KERNELS = {
    'MatrixMultiply': OpKernels(kernels.matmul, kernels.matmul),
    'BatchMM': OpKernels(kernels.matmul, kernels.matmul),
    'Linear': OpKernels(kernels.linear_forward, kernels.linear_backward),
    'Sigmoid': OpKernels(kernels.activation_forward, kernels.activation_backward),
    'ReLU': OpKernels(kernels.activation_forward, kernels.activation_backward),
    'Tanh': OpKernels(kernels.activation_forward, kernels.activation_backward),
    'Softmax': OpKernels(kernels.softmax),
    'LogSoftmax': OpKernels(kernels.log_softmax, kernels.log_softmax_backward),
    'CrossEntropy': OpKernels(kernels.cross_entropy_forward, kernels.cross_entropy_backward),
    'Conv2d': OpKernels(kernels.conv2d_forward, kernels.conv2d_backward),
    'MaxPool2d': OpKernels(kernels.maxpool2d_forward, kernels.maxpool2d_backward),
}

_FLOAT64 = np.dtype(np.float64)


def floating(dtype):
    """The dtype the kernels compute in for inputs of `dtype`: float32 stays float32, the rest is float64."""
    return dtype if dtype.kind == 'f' else _FLOAT64


def prepare(*arrays, dtype=None):
    """The arrays C-contiguous in one floating dtype (`dtype`, or the arrays' common one: float32 with
    float32 stays float32, integers compute in float64); copies only what must change. One array in,
    one array out."""
    if len(arrays) == 1:  # the common case, kept short: ops call this several times a step
        a = arrays[0]
        return np.ascontiguousarray(a, dtype=(a.dtype if a.dtype.kind == 'f' else _FLOAT64) if dtype is None else dtype)
    if dtype is None:
        dtype = np.result_type(*[floating(a.dtype) for a in arrays])
    return tuple([np.ascontiguousarray(a, dtype=dtype) for a in arrays])


# -- the thread policy
POLICIES = ('auto', 'blas', 'numba')
PARALLEL_MIN_SIZE = 1 << 16  # a loop of fewer elements (numba_parts) stays serial: starting threads costs more
_policy = {'policy': 'auto', 'owner': 'blas', 'blas_threads': None}  # blas_threads: OpenBLAS's count to give back
_scipy_blas = None


def scipy_blas():
    """threadpoolctl's controllers of the BLAS that SciPy (hence numba) links, found once."""
    global _scipy_blas
    if _scipy_blas is None:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library so that threadpoolctl can see it)
        from threadpoolctl import ThreadpoolController

        scipy_dir = os.path.dirname(scipy.__file__)  # its wheel ships its BLAS in scipy.libs beside it
        # numpy's wheel ships a library of a similar name in numpy.libs, and a system BLAS may be shared
        # with numpy: those are left alone
        _scipy_blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == 'blas'
                       and lib.filepath.startswith((scipy_dir + os.sep, scipy_dir + '.libs' + os.sep))]
    return _scipy_blas


def _set_blas_threads(count):
    for lib in scipy_blas():
        if lib.num_threads != count:
            lib.set_num_threads(count)


def _hand_cores_to(owner):
    if owner == _policy['owner']:
        return
    if owner == 'numba':
        _policy['blas_threads'] = max((lib.num_threads for lib in scipy_blas()), default=1)
        _set_blas_threads(1)
    elif _policy['blas_threads'] is not None:
        _set_blas_threads(_policy['blas_threads'])
    _policy['owner'] = owner


def sparse_allowed():
    """Whether the sparse-input kernels may run (they need numba's threads: not while BLAS owns the cores)."""
    return _policy['policy'] != 'blas'


def sparse_parts():
    """The threads for the sparse-input kernels, which are about to run: under 'auto' this hands the
    cores to numba (SciPy's OpenBLAS to one thread) for the rest of the process."""
    if _policy['owner'] != 'numba':
        _hand_cores_to('numba')
    return numba.get_num_threads()


def conv_parts():
    """The threads for the convolution and max-pooling kernels, which are about to run: 1 under 'blas' (the
    kernels then open no parallel region, and BLAS keeps its threads); otherwise numba's, and under 'auto'
    this hands the cores to numba for the rest of the process."""
    if _policy['policy'] == 'blas':
        return 1
    if _policy['owner'] != 'numba':
        _hand_cores_to('numba')
    return numba.get_num_threads()


def numba_parts(size):
    """The threads for a loop of `size` elements or multiply-adds (an optimizer update, the gather of a
    compiled epoch's batch, a dense layer's two backward products): numba's when they own the cores (BLAS is
    then on one thread) and the loop is big enough to gain from them, else 1."""
    if size < PARALLEL_MIN_SIZE or _policy['owner'] != 'numba':
        return 1
    return numba.get_num_threads()


def update(rule, p, g, s1, s2, scalars):
    """One optimizer update in place (kernels.update; scalars: an array of six numbers of p's dtype): on
    numba's threads when they own the cores and p is big."""
    parts = numba_parts(p.shape[0])
    if parts == 1:
        update_serial(rule, p, g, s1, s2, scalars)
    else:
        update_parallel(rule, p, g, s1, s2, scalars, parts)


def threads():
    """Who has the cores: {'policy': 'auto'|'blas'|'numba', 'owner': 'blas'|'numba', 'numba': numba's
    threads (for the calling thread), 'scipy_blas': SciPy's OpenBLAS threads (numba's matmuls),
    'numpy_blas': numpy's own BLAS threads (untouched by fastgrad)}."""
    from threadpoolctl import threadpool_info
    scipy_paths = {lib.filepath for lib in scipy_blas()}
    numpy_blas = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'
                  and i['filepath'] not in scipy_paths]
    return {'policy': _policy['policy'], 'owner': _policy['owner'], 'numba': numba.get_num_threads(),
            'scipy_blas': max((lib.num_threads for lib in scipy_blas()), default=None),
            'numpy_blas': max(numpy_blas, default=None)}


def set_threads(policy=None, numba_threads=None, blas_threads=None):
    """Sets who owns the cores (`policy`: 'auto', 'blas' or 'numba', see the module docstring) and how
    many threads each uses: numba_threads for numba's parallel kernels (numba.set_num_threads, which
    numba keeps per calling thread; at most numba.config.NUMBA_NUM_THREADS), blas_threads for SciPy's
    OpenBLAS while it owns the cores (under 'numba' it stays on one thread). Returns threads()."""
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"set_threads: policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    for name, count in (('numba_threads', numba_threads), ('blas_threads', blas_threads)):
        if count is not None and (not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1):
            raise ValueError(f'set_threads: {name} must be a positive integer, not {count!r}')
    if numba_threads is not None:
        if numba_threads > numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f'set_threads: numba_threads={numba_threads}, but numba started '
                             f'{numba.config.NUMBA_NUM_THREADS} (set NUMBA_NUM_THREADS before starting Python)')
        numba.set_num_threads(int(numba_threads))
    if policy is not None:
        _policy['policy'] = policy
        _hand_cores_to('numba' if policy == 'numba' else 'blas')
    if blas_threads is not None:
        _policy['blas_threads'] = int(blas_threads)
        if _policy['owner'] == 'blas':
            _set_blas_threads(int(blas_threads))
    return threads()


@contextlib.contextmanager
def threads_restored():
    """Runs the block, then puts the policy, the owner and SciPy's OpenBLAS thread counts back as they
    were (for warmup, which runs every kernel, the parallel ones included)."""
    saved, counts = dict(_policy), [lib.num_threads for lib in scipy_blas()]
    try:
        yield
    finally:
        _policy.update(saved)
        for lib, count in zip(scipy_blas(), counts):
            lib.set_num_threads(count)
