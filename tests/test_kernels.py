"""Each kernel against a plain-numpy reference of the same maths, for both dtypes and awkward shapes."""
import re
import subprocess
import sys

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import kernels

DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1), (1, 7), (9, 1), (13, 7), (128, 10), (3, 33)]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}

ACT = {'identity': lambda z: z, 'relu': lambda z: np.maximum(z, 0), 'sigmoid': lambda z: 1 / (1 + np.exp(-z)),
       'tanh': np.tanh}
DACT = {'identity': lambda y: np.ones_like(y), 'relu': lambda y: (y > 0).astype(y.dtype),
        'sigmoid': lambda y: y * (1 - y), 'tanh': lambda y: 1 - y * y}


def data(shape, dtype, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def log_softmax_ref(x):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def check_linear(x, wt, b, g, name, sparse_parts=0):
    """linear_forward/backward (dense, or the sparse kernels on sparse_parts threads) against numpy in float64."""
    dtype = x.dtype.type
    tol = dict(TOL[dtype], atol=TOL[dtype]['atol'] * max(x.shape))  # sums of up to 784 products
    code = kernels.ACTIVATION_CODES[name]
    y, nonzeros = kernels.linear_forward(x, wt, b, code, sparse_parts)
    x64, wt64 = x.astype(np.float64), wt.astype(np.float64)
    ref = ACT[name](x64 @ wt64 + b)
    assert y.dtype == dtype and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, **tol)
    gx, gwt, gb = kernels.linear_backward(x, wt, y, g, code, True, nonzeros)
    gz = g.astype(np.float64) * DACT[name](y.astype(np.float64))
    for got, want in ((gx, gz @ wt64.T), (gwt, x64.T @ gz), (gb, gz.sum(axis=0))):
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, **tol)
    gx_skipped, _, _ = kernels.linear_backward(x, wt, y, g, code, False, nonzeros)
    assert gx_skipped is None
    if nonzeros is None:  # the two products one on each of two threads: the same BLAS calls, the same bits
        from fastgrad import backend
        with backend.threads_restored():
            backend.set_threads('numba')  # as the backend runs them: BLAS on one thread
            for got, want in zip(kernels.linear_backward(x, wt, y, g, code, True, None, 2), (gx, gwt, gb)):
                np.testing.assert_array_equal(got, want)
    return nonzeros


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('name', list(ACT))
def test_linear_forward_backward(dtype, shape, name):
    n, k = shape
    m = k + 2
    check_linear(data((n, k), dtype, 1), data((k, m), dtype, 2), data(m, dtype, 3), data((n, m), dtype, 4), name)


def sparse_data(shape, dtype, density, seed):
    x = data(shape, dtype, seed)
    x[np.random.default_rng(seed + 1).random(shape) >= density] = 0
    return x


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape', [(1, 1), (1, 7), (9, 1), (13, 7), (3, 33), (128, 784), (37, 129)])
@pytest.mark.parametrize('density', [0.0, 0.05, 0.2, 1.0])
@pytest.mark.parametrize('name', ['relu', 'sigmoid', 'identity'])
def test_sparse_linear_matches_numpy(dtype, shape, density, name):
    """The sparse kernels, forced on any shape and density (rows with 0-3 and 4k+r nonzeros included)."""
    n, k = shape
    m = 300 if k == 784 else k + 5
    x = sparse_data(shape, dtype, density, 11)
    cols, count = check_linear(x, data((k, m), dtype, 12), data(m, dtype, 13), data((n, m), dtype, 14), name, 2)
    check_nonzeros(x, cols, count)


def check_nonzeros(x, cols, count):
    """Each part's nonzeros of each row are the nonzeros of x in that part's input features."""
    parts, n_in = len(cols), x.shape[1]
    for t in range(parts):
        lo, hi = n_in * t // parts, n_in * (t + 1) // parts
        for i in range(len(x)):
            np.testing.assert_array_equal(cols[t, i, :count[t, i]], lo + np.flatnonzero(x[i, lo:hi]))


@pytest.mark.parametrize('dtype', DTYPES)
def test_nonzero_columns_compiled_is_its_python_definition(dtype):
    """The compiled nonzero_columns finds what its Python definition and np.flatnonzero find, in order: NaN
    and inf count, -0.0 does not, denormals do; on ranges that start and end anywhere in a vector or line,
    and on a row that is not contiguous (the plain loop). So does each vector form this CPU can run (a
    cache line at a time on AVX-512, a vector at a time on AVX2), whichever the compiled one takes."""
    from numba import njit
    from fastgrad.kernels import nonzero
    from fastgrad.kernels.nonzero import nonzero_columns
    features = nonzero.CPU_FEATURES.split(',')
    table = nonzero.lane_table(nonzero.VECTOR // np.dtype(dtype).itemsize)
    forms = [njit(lambda xi, lo, hi, ci: nonzero_columns(xi, lo, hi, ci))]
    if '+avx512f' in features:
        forms.append(njit(lambda xi, lo, hi, ci: nonzero.compressed_columns(xi, lo, hi, ci)))
    if '+avx2' in features:
        forms.append(njit(lambda xi, lo, hi, ci: nonzero.packed_columns(xi, lo, hi, ci, table)))
    tiny = np.finfo(dtype).tiny / 4
    row = sparse_data((1, 100), dtype, 0.3, 31)[0]
    row[[3, 17, 40, 41, 63, 64, 99]] = [np.nan, -np.inf, -0.0, tiny, np.inf, -tiny, 1]
    grid = np.zeros((100, 2), dtype)
    grid[:, 0] = row
    for find in forms:
        for xi in (row, grid[:, 0]):
            for lo, hi in [(0, 100), (1, 99), (3, 19), (16, 48), (40, 40), (0, 15), (50, 100), (92, 100)]:
                if find is not forms[0] and not xi.flags.c_contiguous:
                    continue  # the vector forms take contiguous rows only
                want = lo + np.flatnonzero(xi[lo:hi])
                ci, cp = np.full(hi - lo + 16, -1, np.int32), np.full(hi - lo, -1, np.int32)
                assert find(xi, lo, hi, ci[:hi - lo]) == nonzero_columns(xi, lo, hi, cp) == len(want)
                np.testing.assert_array_equal(ci[:len(want)], want)
                np.testing.assert_array_equal(ci[hi - lo:], -1)  # nothing written past what ci must hold
                np.testing.assert_array_equal(cp[:len(want)], want)


def test_flat_is_a_view_of_its_array_in_order():
    """The compiled flat(a) is a.reshape(-1): for a C-contiguous array of any rank (empty, one number, a
    transposed F-ordered one) a 1-D view of the same memory, so writes through it land in a; an array that is
    not contiguous goes to numba's reshape, which refuses it when compiling."""
    from numba import njit
    from numba.core.errors import TypingError
    from fastgrad.kernels.views import flat

    @njit
    def doubled(a):
        v = flat(a)
        for i in range(v.shape[0]):
            v[i] *= 2
        return v

    grid = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for a in (grid, grid[1], grid[1, 2], np.arange(6.0).reshape(2, 3, order='F').T, np.zeros((0, 3)),
              np.array([[5.0]]), np.arange(3, dtype=np.int64)):
        before = a.copy()
        v = doubled(a)
        assert v.ndim == 1 and v.dtype == a.dtype and v.size == a.size
        np.testing.assert_array_equal(v, flat(before) * 2)
        np.testing.assert_array_equal(a, before * 2)  # written through: a view, not a copy
        assert v.size == 0 or np.shares_memory(v, a)
    with pytest.raises(TypingError, match='contiguous'):
        doubled(grid[:, :, ::2])


def test_kernels_are_cached_against_all_of_their_folder():
    """A cached kernel is checked against every source file of kernels/ (it inlines helpers from the
    others), a function elsewhere against its own file as numba does."""
    from numba import njit
    from fastgrad.kernels import jit
    from fastgrad.kernels.linear import sparse_affine
    from fastgrad.kernels.optim import update_serial
    for kernel in (sparse_affine, update_serial):
        assert kernel._cache._impl.locator.get_source_stamp() == jit.SOURCE_HASH
    elsewhere = njit(cache=True)(test_kernels_are_cached_against_all_of_their_folder)
    assert elsewhere._cache._impl.locator.get_source_stamp() != jit.SOURCE_HASH


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('parts', [1, 2, 3, 64, 200])
@pytest.mark.parametrize('block', [1, 3, 5, 64, 129])
def test_sparse_forward_blocks_and_thread_splits(dtype, parts, block):
    """Any block of input features and any split of them over threads gives the product (rows with 0-3
    and 4k+r nonzeros per block included), also from a weight with padded rows, and the weight gradient
    over the same nonzeros; more parts than rows, or than input features, is fine."""
    from fastgrad.kernels.linear import sparse_affine, sparse_weight_grad
    x = sparse_data((37, 129), dtype, 0.2, 21)
    x[3] = 0
    x[5] = data(129, dtype, 22)  # one dense row
    wt, b = data((129, 11), dtype, 23), data(11, dtype, 24)
    y, cols, count = sparse_affine(x, wt, b, True, parts, block)
    ref = np.maximum(x.astype(np.float64) @ wt.astype(np.float64) + b, 0)
    np.testing.assert_allclose(y, ref, **dict(TOL[dtype], atol=TOL[dtype]['atol'] * 129))
    check_nonzeros(x, cols, count)
    padded = np.full((129, 16), np.nan, dtype)  # rows padded as a compiled epoch pads them: never read
    padded[:, :11] = wt
    np.testing.assert_array_equal(sparse_affine(x, padded, b, True, parts, block)[0], y)
    linear = sparse_affine(x, wt, b, False, parts, block)[0]  # no relu: negative entries kept
    np.testing.assert_allclose(linear, x.astype(np.float64) @ wt.astype(np.float64) + b,
                               **dict(TOL[dtype], atol=TOL[dtype]['atol'] * 129))
    gz = data((37, 11), dtype, 25)
    np.testing.assert_allclose(sparse_weight_grad(x, cols, count, gz), x.astype(np.float64).T @ gz,
                               **dict(TOL[dtype], atol=TOL[dtype]['atol'] * 37))
    y, _, count = sparse_affine(np.zeros((2, 0), dtype), wt[:0], b - 1, True, parts, block)  # no inputs at all
    np.testing.assert_array_equal(y, np.maximum(np.broadcast_to(b - 1, (2, 11)), 0))
    np.testing.assert_array_equal(count, [[0, 0]])


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('parts', [1, 2, 3, 200])
@pytest.mark.parametrize('rule, hyper, states', [
    ('sgd', (0.1, 0, 0), 0), ('sgd', (0.1, 0.9, 0.01), 1), ('nesterov', (0.1, 0.9, 0.01), 1),
    ('adam', (0.01, 0.9, 0.999, 1e-8, 0.01, 1.5), 2)])
@pytest.mark.parametrize('pad', [0, 5])
def test_sparse_weight_grad_update_is_the_update_after_the_gradient(dtype, parts, rule, hyper, states, pad):
    """The fused kernel of a compiled step without gradients moves the weight and its state exactly as the
    update after sparse_weight_grad does, for every rule, with a split over parts as the forward's; on rows
    padded past the gradient's width (as a compiled epoch passes them) the same, the padding untouched. The
    dense path's row update (update_rows) does the same. The gradient over the rows (gz) may be padded too."""
    from fastgrad.kernels.linear import sparse_affine, sparse_weight_grad, sparse_weight_grad_update
    from fastgrad.kernels.optim import RULES, update, update_rows
    x = sparse_data((37, 129), dtype, 0.2, 31)
    x[5] = data(129, dtype, 32)
    wt, gz = data((129, 11), dtype, 33), data((37, 11), dtype, 34)
    h = np.zeros(6, dtype)
    h[:len(hyper)] = hyper
    _, cols, count = sparse_affine(x, wt, wt[0], False, parts, 64)
    state = [data(wt.shape, dtype, 35 + k) ** 2 if k < states else np.zeros((129, 0), dtype) for k in range(2)]

    def padded(a):
        out = np.full((a.shape[0], a.shape[1] + pad if a.shape[1] else 0), 7, dtype)
        out[:, :a.shape[1]] = a
        return out
    want = [wt.copy()] + [a.copy() for a in state]
    got, rows = ([padded(a) for a in want] for _ in range(2))
    for _ in range(2):
        g = sparse_weight_grad(x, cols, count, gz)
        update(RULES[rule], want[0].reshape(-1), g.reshape(-1), want[1].reshape(-1), want[2].reshape(-1), h)
        sparse_weight_grad_update(x, cols, count, padded(gz), 11, np.int64(RULES[rule]), *got, h)
        update_rows(np.int64(RULES[rule]), *rows[:1], g, *rows[1:], h, parts)
    for a, b, c in zip(got, rows, want):
        np.testing.assert_array_equal(a[:, :c.shape[1]], c)
        np.testing.assert_array_equal(b[:, :c.shape[1]], c)
        assert (a[:, c.shape[1]:] == 7).all() and (b[:, c.shape[1]:] == 7).all()
    assert not np.array_equal(got[0][:, :11], wt)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('code', [kernels.IDENTITY, kernels.RELU, kernels.SIGMOID, kernels.TANH])
def test_act_bias_grad_rows_is_act_bias_grad_in_padded_rows(dtype, code):
    """The fused update's gz, in rows padded to whole cache lines, holds act_bias_grad's values bit for bit
    (inf and nan included), and the bias gradient is the same."""
    from fastgrad.kernels.linear import act_bias_grad, act_bias_grad_rows
    y, g = data((37, 11), dtype, 41), data((37, 11), dtype, 42)
    y[0, :3], g[1, :2] = (np.inf, np.nan, 0), (np.nan, -np.inf)
    gz, gb = act_bias_grad(y, g, code)
    rows, gb_rows = act_bias_grad_rows(y, g, code)
    assert rows.shape == (37, 16) and gb_rows.dtype == gb.dtype
    np.testing.assert_array_equal(rows[:, :11], gz)
    np.testing.assert_array_equal(gb_rows, gb)


@pytest.mark.parametrize('n, m, dtype', [(1, 1, np.float32), (37, 11, np.float32), (128, 300, np.float32),
                                          (5, 3, np.float64), (0, 7, np.float64)])
def test_cache_line_rows_start_on_a_cache_line_and_are_whole_lines_long(n, m, dtype):
    from fastgrad.kernels.linear import CACHE_LINE, cache_line_rows, cache_line_width
    itemsize = np.dtype(dtype).itemsize
    width = cache_line_width(m, itemsize)
    assert width >= m and width * itemsize % CACHE_LINE == 0 and (width - m) * itemsize < CACHE_LINE
    for _ in range(3):  # wherever the allocator puts it
        rows = cache_line_rows(n, width, np.dtype(dtype))
        assert rows.shape == (n, width) and rows.dtype == dtype and rows.flags.c_contiguous
        assert rows.ctypes.data % CACHE_LINE == 0


VECTOR_WIDTH_CHECK = """
import hashlib, sys
import numpy as np
if sys.argv[1] == 'numba first':
    from numba import njit
    njit(lambda v: v + 1)  # defined, never called: numba's code generator is set up
import numba
import fastgrad
from fastgrad.kernels import jit
from fastgrad.kernels.linear import act_bias_grad_rows, sparse_affine, sparse_weight_grad_update
from fastgrad.kernels.optim import RULES
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 200)).astype(np.float32) * (rng.random((64, 200)) < 0.2)
wt = rng.standard_normal((200, 37)).astype(np.float32)
b = rng.standard_normal(37).astype(np.float32)
s1, s2 = np.zeros_like(wt), np.zeros_like(wt)
h = np.array([0.01, 0.9, 0.999, 1e-8, 0, 1], np.float32)
digest = hashlib.sha256()
for _ in range(3):
    y, cols, count = sparse_affine(x, wt, b, True, 2, 64)
    gz, gb = act_bias_grad_rows(y, np.sin(y), 1)
    sparse_weight_grad_update(x, cols, count, gz, 37, np.int64(RULES['adam']), wt, s1, s2, h)
    digest.update(y.tobytes() + gb.tobytes())
digest.update(wt.tobytes() + s1.tobytes() + s2.tobytes())
wide = jit.CPU_FEATURES.endswith(',-prefer-256-bit')
# numba's config names the features only when they are the ones in use
assert wide == str(numba.config.CPU_FEATURES).endswith(',-prefer-256-bit'), numba.config.CPU_FEATURES
print(wide, digest.hexdigest())
"""


@pytest.mark.slow
def test_kernels_take_512_bit_vectors_on_avx512_unless_told_otherwise_with_the_same_results():
    """fastgrad lets numba use 512-bit vectors where the CPU has AVX-512, leaves NUMBA_CPU_FEATURES and
    NUMBA_ENABLE_AVX=0 as the user set them, and leaves numba's features as they are when numba set up its
    code generator before fastgrad was imported; the sparse kernels and the update give the same bits at
    either width."""
    import os
    from numba.core.codegen import get_host_cpu_features
    host = get_host_cpu_features()
    env = {k: v for k, v in os.environ.items() if not k.startswith('NUMBA_')}

    def run(how, **extra):
        out = subprocess.run([sys.executable, '-c', VECTOR_WIDTH_CHECK, how], capture_output=True, text=True,
                             env={**env, **extra})
        assert out.returncode == 0, out.stdout + out.stderr
        wide, digest = out.stdout.split()
        return wide == 'True', digest
    default, told, numba_first = run('import'), run('import', NUMBA_CPU_FEATURES=host), run('numba first')
    no_avx = run('import', NUMBA_ENABLE_AVX='0')
    assert default[0] == ('+avx512f' in host.split(','))
    assert not told[0] and not numba_first[0] and not no_avx[0]
    assert default[1] == told[1] == numba_first[1] == no_avx[1]


def test_sparse_block_keeps_a_block_of_weight_rows_in_l2():
    from fastgrad.kernels.linear import SPARSE_BLOCK_BYTES, sparse_block
    assert sparse_block(784, 300, 4) == SPARSE_BLOCK_BYTES // 1200  # MNIST's first layer: several blocks
    assert sparse_block(784, 4096, 4) == 784  # wide layers: one block
    assert sparse_block(0, 0, 4) >= 1


def test_sparse_enough_picks_the_sparse_path_only_where_it_wins():
    assert kernels.sparse_enough(sparse_data((128, 784), np.float32, 0.19, 0))  # MNIST-like
    assert not kernels.sparse_enough(sparse_data((128, 784), np.float32, 0.6, 0))  # too dense
    assert not kernels.sparse_enough(sparse_data((4, 8), np.float32, 0.1, 0))  # too small to pay
    x = sparse_data((128, 784), np.float32, 0.05, 0)
    x[:16] = 1  # the sample decides
    assert not kernels.sparse_enough(x)
    assert kernels.sparse_enough(x[16:])


def test_sparse_input_skips_nan_weights_it_never_meets():
    """A zero input contributes nothing (torch.sparse semantics); a nan input still poisons its row."""
    x = np.zeros((2, 3), np.float32)
    x[0, 0], x[1, 1] = 1, np.nan
    wt = np.ones((3, 2), np.float32)
    wt[2] = np.nan
    y, _ = kernels.linear_forward(x, wt, np.zeros(2, np.float32), kernels.IDENTITY, 2)
    np.testing.assert_array_equal(y[0], [1, 1])
    assert np.isnan(y[1]).all()


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', ['relu', 'sigmoid', 'tanh'])
def test_elementwise_activations(dtype, name):
    x = np.concatenate([data(37, dtype), np.array([0, 80, -80, 1e4, -1e4], dtype=dtype)])
    code = kernels.ACTIVATION_CODES[name]
    with np.errstate(over='ignore'):
        ref = ACT[name](x.astype(np.float64))
    y = kernels.activation_forward(x, code)
    assert y.dtype == dtype and np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, **TOL[dtype])
    g = data(x.shape, dtype, 5)
    np.testing.assert_allclose(kernels.activation_backward(y, g, code), g * DACT[name](y), **TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', ['relu', 'sigmoid', 'tanh'])
def test_activate_loop_into_another_array_or_in_place(dtype, name):
    """A compiled step's activation loop, z = act(x): into another array (as the activation op runs it) and
    in place (as a dense layer's sigmoid and tanh run it) give the same bits, equal to the eager kernel's
    (libm's exp and tanh there: to rounding; relu as compiled code defines it, v * 0 below zero), NaN,
    infinities and signed zeros included; x is left as it was when z is another array."""
    special = np.array([0, -0.0, np.nan, np.inf, -np.inf, 80, -80], dtype=dtype)
    x = np.concatenate([data(37, dtype), special]).reshape(4, 11)
    code = kernels.ACTIVATION_CODES[name]
    before = x.copy()
    z = kernels.activate_loop(x, np.empty_like(x), code)
    np.testing.assert_array_equal(x, before)
    inplace = kernels.activate_loop(before, before, code)
    np.testing.assert_array_equal(z.view(f'i{z.itemsize}'), inplace.view(f'i{z.itemsize}'))
    with np.errstate(over='ignore', invalid='ignore'):  # relu as compiled code writes it: -inf * 0 is NaN
        ref = np.where(x < 0, x * 0, x) if name == 'relu' else kernels.activation_forward(x.reshape(-1), code)
    np.testing.assert_allclose(z, ref.reshape(x.shape), **TOL[dtype])


def test_relu_propagates_nan():
    y = kernels.activation_forward(np.array([np.nan, -1.0, 2.0]), kernels.RELU)
    assert np.isnan(y[0]) and y[1] == 0 and y[2] == 2


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('scale', [1.0, 1e4])
def test_softmax_family(dtype, shape, scale):
    x = data(shape, dtype, 6, scale)
    ref = log_softmax_ref(x)
    tol = dict(TOL[dtype], atol=TOL[dtype]['atol'] * scale)
    np.testing.assert_allclose(kernels.log_softmax(x), ref, **tol)
    np.testing.assert_allclose(kernels.softmax(x), np.exp(ref), **TOL[dtype])
    g = data(shape, dtype, 7)
    np.testing.assert_allclose(kernels.log_softmax_backward(kernels.log_softmax(x), g),
                               g - np.exp(ref) * g.sum(axis=1, keepdims=True), **TOL[dtype])
    targets = np.random.default_rng(8).integers(0, shape[1], shape[0])
    total, probs, bad = kernels.cross_entropy_forward(x, targets)
    assert bad == -1 and probs.dtype == dtype and isinstance(total, float)
    np.testing.assert_allclose(total, -ref[np.arange(shape[0]), targets].sum(), rtol=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(probs, np.exp(ref), **TOL[dtype])
    onehot = np.eye(shape[1])[targets]
    np.testing.assert_allclose(kernels.cross_entropy_backward(probs, targets, 0.5), (np.exp(ref) - onehot) * 0.5,
                               **TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
def test_cross_entropy_takes_the_log_of_many_rows_denominators_at_once(dtype):
    """The rows' softmax denominators are multiplied and their log taken when the product passes
    LOG_PRODUCT_MAX: 3000 rows of 1000 equal logits (each denominator 1000) pass it ten times."""
    rng = np.random.default_rng(9)
    x = np.zeros((3000, 1000), dtype)
    x[:, 0] = rng.standard_normal(3000)  # and one row of each kind that a product can trip on
    x[5] = np.inf
    targets = rng.integers(0, 1000, 3000)
    total, probs, _ = kernels.cross_entropy_forward(x[6:], targets[6:])
    ref = log_softmax_ref(x[6:].astype(np.float64))
    np.testing.assert_allclose(total, -ref[np.arange(2994), targets[6:]].sum(),
                               rtol=1e-7 if dtype == np.float32 else 1e-12)  # exp in float32 for float32 logits
    total, probs, _ = kernels.cross_entropy_forward(x, targets)  # an inf logit: NaN, as torch gives
    assert np.isnan(total)


def test_cross_entropy_reports_a_bad_target():
    _, _, bad = kernels.cross_entropy_forward(np.zeros((3, 4)), np.array([0, 4, 1]))
    assert bad == 1


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('momentum,nesterov,wd', [(0.0, False, 0.0), (0.9, False, 0.01), (0.8, True, 0.1)])
def test_sgd_step(dtype, momentum, nesterov, wd):
    p, g, buf = data(29, dtype, 1), data(29, dtype, 2), data(29, dtype, 3)
    rp, rbuf = p.astype(np.float64), buf.astype(np.float64)
    d = g + wd * rp
    if momentum:
        rbuf = momentum * rbuf + d
        d = d + momentum * rbuf if nesterov else rbuf
    rp = rp - 0.1 * d
    rule = kernels.RULES['nesterov' if nesterov else 'sgd']
    kernels.update(rule, p, g, buf if momentum else p[:0], p[:0], np.array([0.1, momentum, wd, 0, 0, 0], dtype))
    np.testing.assert_allclose(p, rp, **TOL[dtype])
    if momentum:
        np.testing.assert_allclose(buf, rbuf, **TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
def test_adam_step(dtype):
    p, g = data(31, dtype, 1), data(31, dtype, 2)
    m, v = np.abs(data(31, dtype, 3)), np.abs(data(31, dtype, 4))
    lr, b1, b2, eps, wd, step = 0.01, 0.9, 0.999, 1e-8, 0.1, 3
    d = g + wd * p.astype(np.float64)
    rm = b1 * m + (1 - b1) * d
    rv = b2 * v + (1 - b2) * d * d
    rp = p - lr / (1 - b1 ** step) * rm / (np.sqrt(rv) / np.sqrt(1 - b2 ** step) + eps)
    kernels.update(kernels.RULES['adam'], p, g, m, v,
                   np.array([lr / (1 - b1 ** step), b1, b2, eps, wd, 1 / np.sqrt(1 - b2 ** step)], dtype))
    for got, want in ((p, rp), (m, rm), (v, rv)):
        np.testing.assert_allclose(got, want, **TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('rule', ['sgd', 'nesterov', 'adam'])
def test_update_stores_denormal_state_as_zero(dtype, rule):
    """A momentum (or Adam moment) decaying below the smallest normal number is stored as zero, not as a
    denormal (slow on x86); normal values, the parameters and NaN are left as the rule makes them."""
    tiny = np.finfo(dtype).tiny
    p = np.array([1.0, 1.0, 1.0, np.nan], dtype)
    g = np.zeros(4, dtype)
    s1 = np.array([4 * tiny, 2 * tiny, tiny, 0], dtype)  # after one step at momentum 0.5: 2, 1, 0.5 tiny, NaN
    s2 = p[:0]
    scalars = np.array([0.1, 0.5, 0, 0, 0, 0], dtype)
    if rule == 'adam':  # m decays as above; v = 0.5 * v, the same
        s2 = s1.copy()
        scalars = np.array([0.1, 0.5, 0.5, 1e-8, 0, 1], dtype)
    kernels.update(kernels.RULES[rule], p, g, s1, s2, scalars)
    for state in (s1, s2) if rule == 'adam' else (s1,):
        np.testing.assert_array_equal(state[:3], np.array([2 * tiny, tiny, 0], dtype))
        assert np.isnan(state[3]) and not np.signbit(state[2])  # the NaN parameter's NaN is kept
    assert np.isnan(p[3]) and np.all(p[:3] <= 1)


@pytest.mark.parametrize('dtype', DTYPES)
def test_adam_with_a_tiny_eps_keeps_denormal_moments(dtype):
    """Adam with eps=0 is scale-invariant: a gradient of 1e-20 (1e-160) still takes a full step of about lr,
    as in torch.optim, so its denormal second moment must not become zero (that step was -inf)."""
    g = np.full(3, 1e-20 if dtype == np.float32 else 1e-160, dtype)
    p, m, v = np.ones(3, dtype), np.zeros(3, dtype), np.zeros(3, dtype)
    lr, b1, b2 = 0.01, 0.9, 0.999
    kernels.update(kernels.RULES['adam'], p, g, m, v,
                   np.array([lr / (1 - b1), b1, b2, 0, 0, 1 / np.sqrt(1 - b2)], dtype))
    assert 0 < v[0] < np.finfo(dtype).tiny  # denormal, kept
    np.testing.assert_allclose(p, 1 - lr, rtol=1e-4)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('parts', [2, 3])
def test_threaded_updates_equal_serial(dtype, parts):
    """Big parameters are updated in parts on numba's threads: bit for bit what the serial loop gives."""
    n = 1001  # not a multiple of the parts
    cases = [('sgd', 0.0, 0.0), ('sgd', 0.9, 0.01), ('nesterov', 0.8, 0.1), ('adam', 0.9, 0.1)]
    for rule, momentum, wd in cases:
        p, g, s1, s2 = data(n, dtype, 1), data(n, dtype, 2), data(n, dtype, 3), np.abs(data(n, dtype, 4))
        if rule != 'adam':
            s2 = p[:0]
            scalars = np.array([0.1, momentum, wd, 0, 0, 0], dtype)
            if not momentum:
                s1 = p[:0]
        else:
            scalars = np.array([0.01, 0.9, 0.999, 1e-8, wd, 1.2], dtype)
        serial, threaded = [a.copy() for a in (p, s1, s2)], [a.copy() for a in (p, s1, s2)]
        kernels.update(kernels.RULES[rule], serial[0], g, serial[1], serial[2], scalars, 1)
        kernels.update(kernels.RULES[rule], threaded[0], g, threaded[1], threaded[2], scalars, parts)
        assert not np.array_equal(serial[0], p)
        for got, want in zip(threaded, serial):
            np.testing.assert_array_equal(got, want)


def test_updates_use_threads_only_when_big_and_numba_owns_the_cores():
    from numba import get_num_threads
    from fastgrad import backend
    with backend.threads_restored():
        backend.set_threads('numba')
        assert backend.numba_parts(backend.PARALLEL_MIN_SIZE) == get_num_threads()
        assert backend.numba_parts(backend.PARALLEL_MIN_SIZE - 1) == 1
        backend.set_threads('blas')  # OpenBLAS's threads would fight numba's
        assert backend.numba_parts(10 * backend.PARALLEL_MIN_SIZE) == 1


@pytest.mark.parametrize('dtype', DTYPES)
def test_ops_accept_non_contiguous_inputs(dtype):
    """Strided, transposed and Fortran-ordered arrays are made contiguous before a kernel sees them."""
    big = data((20, 16), dtype, 9)
    x = big[::2, ::2]                         # strided (10, 8)
    w = np.asfortranarray(data((5, 8), dtype, 10))
    b = data((1, 5), dtype, 11)
    nodes = [fg.TensorNode(a) for a in (x, w, b)]
    out = fg.LinearOp.do_forward(*nodes, activation='tanh')
    ref = np.tanh(x.astype(np.float64) @ w.T + b)
    np.testing.assert_allclose(out.value, ref, **TOL[dtype])
    out.sum().backward()
    gz = 1 - ref ** 2
    np.testing.assert_allclose(nodes[0].grad, gz @ w, **TOL[dtype])
    np.testing.assert_allclose(nodes[1].grad, gz.T @ x, **TOL[dtype])
    logits = big[:, ::3].T                    # transposed view (6, 20)
    t = np.arange(6) % 20
    loss = fg.cross_entropy(fg.TensorNode(logits), t, reduction='sum')
    np.testing.assert_allclose(loss.value, -log_softmax_ref(logits)[np.arange(6), t].sum(), rtol=1e-5)
    np.testing.assert_allclose(fg.softmax(fg.TensorNode(logits)).value, np.exp(log_softmax_ref(logits)), **TOL[dtype])
    np.testing.assert_allclose(fg.relu(fg.TensorNode(logits)).value, np.maximum(logits, 0))
    a = fg.TensorNode(big[:, :7].T)           # (7, 20) @ (20, 16)
    np.testing.assert_allclose((a @ fg.TensorNode(big)).value, big[:, :7].T.astype(np.float64) @ big, **TOL[dtype])


def test_gradcheck_through_fused_ops():
    """The fused Linear and CrossEntropy in an MLP agree with finite differences (gradcheck runs in float64)."""
    x = data((6, 4), np.float64, 12)
    t = np.array([0, 1, 2, 0, 1, 2])
    mlp = fg.MLP(4, 3, hidden=[5], activation='tanh', dtype=np.float64, rng=0)
    w1, b1, w2, b2 = [p.value for p in mlp.parameters()]

    def loss(xn, w1n, w2n):
        h = fg.LinearOp.do_forward(xn, w1n, fg.TensorNode(b1), activation='tanh')
        return fg.cross_entropy(fg.LinearOp.do_forward(h, w2n, fg.TensorNode(b2)), t)

    assert fg.gradcheck(loss, x, w1, w2)


WARMUP_CHECK = """
import sys, numba, numpy as np, fastgrad
from fastgrad.kernels import activations, blas, linear, optim, softmax
fastgrad.warmup(np.float32)
missing = [f'{m.__name__}.{name}' for m in (activations, blas, linear, optim, softmax) for name, f in vars(m).items()
           if isinstance(f, numba.core.registry.CPUDispatcher) and not f.signatures
           and f.targetoptions.get('inline') != 'always']  # inlined into its callers, never called on its own
print(missing)
sys.exit(bool(missing))
"""


@pytest.mark.slow
def test_warmup_compiles_every_kernel():
    """In a fresh process, warmup() alone reaches every kernel (compiled or loaded from the cache)."""
    run = subprocess.run([sys.executable, '-c', WARMUP_CHECK], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert fg.warmup(np.float64) >= 0


BLAS_THREADS_CHECK = """
import numpy as np, fastgrad as fg
from fastgrad import backend
from threadpoolctl import threadpool_info

def threads():
    return {i['filepath']: i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}

def sparse_step():
    x = np.zeros((128, 784), np.float32)
    x[:, ::7] = 1
    layer = fg.Linear(784, 3, rng=0)
    layer(fg.TensorNode(x, requires_grad=False), activation='relu').sum().backward()

scipy_libs = [lib.filepath for lib in backend.scipy_blas()]
assert scipy_libs, threadpool_info()
assert fg.threads()['policy'] == 'auto' and fg.threads()['owner'] == 'blas', fg.threads()
fg.set_threads(blas_threads=2)  # whatever the environment says (a Dask test may have set OPENBLAS_NUM_THREADS=1)
before = threads()
assert all(before[f] == 2 for f in scipy_libs), before
fg.warmup()
assert threads() == before, (before, threads())  # warmup leaves the thread counts as it found them
assert fg.threads()['owner'] == 'blas', fg.threads()
sparse_step()  # auto: the first sparse input hands the cores to numba
after = threads()
assert fg.threads()['owner'] == 'numba' and fg.threads()['scipy_blas'] == 1, fg.threads()
assert all(after[f] == 1 for f in scipy_libs), after
assert all(after[f] == n for f, n in before.items() if f not in scipy_libs), (before, after)  # numpy's
fg.set_threads('blas')  # the user gives the cores back to OpenBLAS: its threads return, the sparse path is off
assert threads() == before and fg.threads()['owner'] == 'blas', (before, threads())
sparse_step()
assert threads() == before and fg.threads()['owner'] == 'blas', fg.threads()
fg.set_threads('numba', numba_threads=1)
assert fg.threads()['numba'] == 1 and fg.threads()['scipy_blas'] == 1, fg.threads()
print('ok')
"""


@pytest.mark.slow
def test_thread_policy_hands_the_cores_over_once_and_leaves_numpys_blas():
    run = subprocess.run([sys.executable, '-c', BLAS_THREADS_CHECK], capture_output=True, text=True)
    assert run.returncode == 0 and 'ok' in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize('kwargs, message', [
    (dict(policy='gpu'), "policy must be one of auto, blas, numba, not 'gpu'"),
    (dict(numba_threads=0), 'numba_threads must be a positive integer, not 0'),
    (dict(blas_threads=1.5), 'blas_threads must be a positive integer, not 1.5'),
    (dict(numba_threads=10 ** 6), 'numba_threads=1000000, but numba started'),
])
def test_set_threads_names_a_bad_argument(kwargs, message):
    before = fg.threads()
    with pytest.raises(ValueError, match=re.escape(message)):
        fg.set_threads(**kwargs)
    assert fg.threads() == before


@pytest.mark.parametrize('parts', [1, 2, 3, 200])
def test_gather_rows_takes_the_batch_from_the_order(parts):
    from fastgrad.kernels.batch import gather_rows
    src = data((50, 7), np.float32, 31)
    order = np.random.default_rng(32).permutation(50)
    dst = np.empty((13, 7), np.float32)
    gather_rows(src, order, 20, dst, parts)
    np.testing.assert_array_equal(dst, src[order[20:33]])


def test_indices_within_finds_any_index_outside_the_rows():
    from fastgrad.kernels.batch import indices_within
    order = np.random.default_rng(33).permutation(50)
    assert indices_within(order, 50) and indices_within(order[:0], 0)
    for k in (0, 17, 49):
        for bad in (-1, 50, np.iinfo(np.int64).min, np.iinfo(np.int64).max):
            wrong = order.copy()
            wrong[k] = bad
            assert not indices_within(wrong, 50)
