"""Matrix products through numba's np.dot (SciPy's OpenBLAS), and who owns the threads.

OpenBLAS keeps its own worker threads and lets them spin for a while after each call; numba's parallel loops
(the sparse-input kernels, and the optimizer updates of big parameters once those have run) keep theirs. On
two cores the two pools took turns stealing each other's core: an MLP 784-1024-10 epoch on MNIST took
4.6-5.6 s against 1.1-1.4 s with OpenBLAS on one thread (batch 512: 1.97 s against 0.35 s). So the first time a sparse
kernel is about to run, SciPy's OpenBLAS is set to one thread for the rest of the process (numpy's own BLAS is
left alone). A process that never meets a sparse input keeps OpenBLAS's threads for its dense products
(128x784 @ 784x300: 0.57 ms on two threads, 0.83-0.92 ms on one). Splitting dense products by rows over
numba's threads instead (one single-threaded BLAS call per part) was tried and not kept: 0.60-0.67 ms at
128x784x300, 3.8 ms against OpenBLAS's 2.5 ms at 128x1024x1024.
"""
import os

from .jit import kernel


@kernel
def matmul(a, b):
    """a @ b for 2-D arrays of one dtype (C- or F-contiguous)."""
    return a @ b


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


def scipy_blas_single_threaded():
    """Whether SciPy's BLAS is on one thread (so numba's threads have the cores to themselves)."""
    return all(lib.num_threads == 1 for lib in scipy_blas())


def limit_scipy_blas():
    """Sets SciPy's BLAS to one thread (a microsecond when it already is)."""
    for lib in scipy_blas():
        if lib.num_threads != 1:
            lib.set_num_threads(1)
