"""The decorators every kernel uses.

cache=True: later processes load the compiled code instead of compiling it again.
error_model='numpy': a float division by zero gives inf/nan as in numpy; numba's default checks every
division and raises ZeroDivisionError, and that check stops LLVM from vectorising the loop.
parallel_kernel: for the few loops worth splitting over cores (the sparse-input products, the images of a
convolution or max-pool, the updates of big parameters, a dense layer's two backward products); starting
a parallel region costs microseconds, so small loops stay serial. How many threads a parallel kernel uses
is its caller's choice (a `parts` argument): kernels never ask numba or BLAS for thread counts (numba's
get_num_threads inside a kernel would also stop it from being cached).
Vector width: on a CPU with AVX-512, LLVM's tuning for Intel's server cores keeps loops on 256-bit vectors.
The sparse kernels run over weight rows held in L2 and are quicker on 512-bit ones, so before numba sets up
its code generator the feature string it compiles with gets '-prefer-256-bit' (see wide_vectors).
The cache: numba checks a cached function against its own file only, but kernels inline helpers from other
files of this folder (the optimizer updates into the fused weight gradient, the nonzero listing into the
sparse forward), so for the functions of this folder the check is against all of its files (SOURCE_HASH).
"""
import hashlib
import os

import numba
from numba import njit
from numba.core import caching
from numba.core.codegen import get_host_cpu_features
from numba.core.registry import cpu_target

CACHE_LINE = 64  # bytes: an x86 cache line


def _source_hash(folder):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith('.py'):
            with open(os.path.join(folder, name), 'rb') as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


FOLDER = os.path.dirname(os.path.abspath(__file__))
SOURCE_HASH = _source_hash(FOLDER)  # of every .py file here


class _FolderStamp:
    """A numba cache locator for the functions of this folder whose source stamp is SOURCE_HASH."""

    def get_source_stamp(self):
        return SOURCE_HASH

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != FOLDER:
            return None
        return super().from_function(py_func, py_file)


# in front of numba's own locators (and in their order): the ones that cache beside a source file. These are
# numba internals (0.59 to 0.68): a numba without them keeps its own per-file check.
_LOCATORS = getattr(getattr(caching, 'CacheImpl', None), '_locator_classes', None)
_FILE_BACKED = getattr(caching, '_SourceFileBackedLocatorMixin', None)
if isinstance(_LOCATORS, list) and _FILE_BACKED is not None:
    _LOCATORS[:0] = [type('Kernels' + c.__name__.lstrip('_'), (_FolderStamp, c), {})
                     for c in _LOCATORS if issubclass(c, _FILE_BACKED)]

kernel = njit(cache=True, error_model='numpy')
parallel_kernel = njit(cache=True, error_model='numpy', parallel=True)


def wide_vectors():
    """Lets LLVM use 512-bit vectors on a CPU with AVX-512, unless NUMBA_CPU_FEATURES is set (the user's
    choice, left as it is) or numba set up its code generator before fastgrad was imported (any @njit
    function defined first does; numba then keeps its features). Loops compiled without fastmath keep the
    order of their operations at any width, so the kernels' results do not change, only their speed.
    Returns the features numba compiles with."""
    features = get_host_cpu_features()  # numba's: '' where LLVM cannot tell, no AVX with NUMBA_ENABLE_AVX=0
    if numba.config.CPU_FEATURES is None and '+avx512f' in features.split(','):
        numba.config.CPU_FEATURES = features + ',-prefer-256-bit'
        if cpu_target.target_context.codegen().magic_tuple()[2] != numba.config.CPU_FEATURES:
            numba.config.CPU_FEATURES = None  # the codegen was made before: these features are not in use
    return cpu_target.target_context.codegen().magic_tuple()[2]


CPU_FEATURES = wide_vectors()
