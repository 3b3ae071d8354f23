"""Dense layers: y = act(x @ wt + b), with the weight passed transposed: wt is (in, out), C-contiguous (the
sparse kernels also take rows longer than out: see sparse_affine).

The Linear op stores w (out, in) column-major, so w.T is that array without a copy, and x @ wt and the
weight gradient x.T @ gz are BLAS calls without a transposed output (x.T @ gz is the quicker of the two
ways to get it).

Sparse inputs (MNIST pixels are 81 % zeros) take another path when the input needs no gradient: the
nonzeros of each row are found once, the forward adds up only the weight rows they select, and the weight
gradient sums only over them. A zero input then contributes exactly nothing, also against an inf/nan weight
(as in torch.sparse), where the dense product would give nan.
"""
import numpy as np
from numba import njit, prange

from .activations import IDENTITY, RELU, act_derivative, activate_inplace
from .blas import matmul
from .jit import CACHE_LINE, kernel, parallel_kernel
from .nonzero import nonzero_columns
from .optim import apply_row_update

# The sparse pair beats the dense pair up to about 30 % nonzeros; small inputs stay dense, because
# starting the parallel loops costs more than they save.
SPARSE_MAX_DENSITY = 0.25
SPARSE_MIN_SIZE = 4096
SAMPLE_ROWS = 16


@kernel
def affine(x, wt, b, relu):
    """x (n, in), wt (in, out), b (out,) -> x @ wt + b, shape (n, out), with relu fused into the bias loop."""
    y = x @ wt
    n, m = y.shape
    for i in range(n):
        for j in range(m):
            v = y[i, j] + b[j]
            y[i, j] = v if (v > 0 or not relu) else v * 0
    return y


@kernel
def _nonzero_share(x, rows):
    c = 0
    for i in range(rows):
        for j in range(x.shape[1]):
            c += x[i, j] != 0
    return c / (rows * x.shape[1])


def sparse_enough(x):
    """Whether the sparse kernels should take x (n, in): big enough, and at most SPARSE_MAX_DENSITY of its
    first SAMPLE_ROWS rows nonzero (a shuffled batch's first rows speak for it; a batch that is denser
    than its sample is still computed right, only slower)."""
    return x.size >= SPARSE_MIN_SIZE and _nonzero_share(x, min(SAMPLE_ROWS, x.shape[0])) <= SPARSE_MAX_DENSITY


# Both sparse kernels split the input features into `parts`, one per thread, the same split as the
# threaded optimizer update's (contiguous rows of wt), so that each core reads and writes only its own rows
# of the weight, its gradient and its momentum: they stay in that core's L2 from one step to the next
# instead of crossing between cores. Within its part, a thread walks the features in blocks, so that the
# weight rows of one block (at most SPARSE_BLOCK_BYTES) stay in L2 while every row of the batch adds its
# nonzeros from that block. A block of few weight rows (a very wide layer) saves less than re-reading the
# output rows for every block costs: below SPARSE_MIN_BLOCK rows a part is one block.
SPARSE_BLOCK_BYTES = 256 << 10
SPARSE_MIN_BLOCK = 64


def sparse_block(n_in, m, itemsize):
    """Input features per block of the sparse forward for n_in inputs, m outputs of itemsize bytes."""
    block = SPARSE_BLOCK_BYTES // max(m * itemsize, 1)
    return block if block >= SPARSE_MIN_BLOCK else max(n_in, 1)


@njit(inline='always', cache=True)
def cache_line_width(m, itemsize):
    """The row length, in entries of itemsize bytes, that holds m of them in whole cache lines."""
    return -(-m * itemsize // CACHE_LINE) * CACHE_LINE // itemsize


@njit(inline='always', cache=True)
def cache_line_rows(n, width, dtype):
    """An uninitialised (n, width) array of dtype that starts on a cache line (numba and numpy align big
    arrays to 32 or 16 bytes only)."""
    flat = np.empty(n * width + CACHE_LINE, dtype)  # CACHE_LINE entries to spare: at least as many bytes
    skip = (-flat.ctypes.data % CACHE_LINE) // flat.itemsize
    return flat[skip:skip + n * width].reshape(n, width)


@parallel_kernel
def sparse_affine(x, wt, b, relu, parts, block):
    """x @ wt + b (relu fused) adding only the rows of wt that the nonzeros of x select; returns y and the
    nonzeros it found: part t's (input features n_in * t // parts up to the next part's) of row i are
    cols[t, i, :count[t, i]] (in order, NaN included).

    Each thread sums its part's nonzeros of every row into a partial output (in rows that start on cache
    lines), four weight rows per pass over the output row (each vector of it loaded and stored once for four
    weight rows), part 0 starting from the bias; then each row of y is its parts' partial outputs added up in
    order (so y's last bits depend on the number of parts).

    wt's rows may be longer than b: only their first m = len(b) entries are read (a compiled epoch passes
    the weight with its rows padded to whole cache lines)."""
    n, n_in = x.shape
    m = b.shape[0]
    parts = max(1, min(n_in, parts))
    width = -(-n_in // parts)
    # each part sums into rows that start on cache lines (a row of m floats is not a whole number of them)
    lines = cache_line_width(m, wt.itemsize)
    partial = cache_line_rows(parts * n, lines, wt.dtype).reshape(parts, n, lines)
    cols = np.empty((parts, n, width), np.int32)
    count = np.empty((parts, n), np.int64)
    for t in prange(parts):
        lo, hi = n_in * t // parts, n_in * (t + 1) // parts
        out, ct = partial[t], cols[t]
        added = np.zeros(n, np.int64)  # per row: how many of its nonzeros are in the partial output already
        for end in range(lo + block, max(hi, lo + 1) + block, block):  # at least once: no inputs still need the bias
            for i in range(n):
                yi, xi, ci = out[i], x[i], ct[i]
                if end == lo + block:  # the row's first block: find its nonzeros, start from the bias or zero
                    count[t, i] = nonzero_columns(xi, lo, hi, ci)
                    if t == 0:
                        for k in range(m):
                            yi[k] = b[k]
                    else:
                        for k in range(m):
                            yi[k] = 0
                c, p = count[t, i], added[i]
                while p + 4 <= c and ci[p + 3] < end:
                    j0, j1, j2, j3 = ci[p], ci[p + 1], ci[p + 2], ci[p + 3]
                    v0, v1, v2, v3 = xi[j0], xi[j1], xi[j2], xi[j3]
                    r0, r1, r2, r3 = wt[j0], wt[j1], wt[j2], wt[j3]
                    for k in range(m):
                        yi[k] += v0 * r0[k] + v1 * r1[k] + v2 * r2[k] + v3 * r3[k]
                    p += 4
                while p < c and ci[p] < end:
                    v, r = xi[ci[p]], wt[ci[p]]
                    for k in range(m):
                        yi[k] += v * r[k]
                    p += 1
                added[i] = p
    y = np.empty((n, m), wt.dtype)
    for t in prange(parts):
        for i in range(n * t // parts, n * (t + 1) // parts):
            # the relu in the loop that adds the last part (relu in place would be a masked store: see
            # activations.activate_loop)
            yi, p0, last = y[i], partial[0, i], partial[parts - 1, i]
            if parts == 1:
                for k in range(m):
                    v = p0[k]
                    yi[k] = v if (v > 0) | (not relu) else v * 0
                continue
            for k in range(m):
                yi[k] = p0[k]
            for s in range(1, parts - 1):
                ps = partial[s, i]
                for k in range(m):
                    yi[k] += ps[k]
            for k in range(m):
                v = yi[k] + last[k]
                yi[k] = v if (v > 0) | (not relu) else v * 0
    return y, cols, count


@njit(inline='always')
def _feature_rows(ct, nt, lo, hi):
    """Per feature j of the part lo..hi, the rows where it is nonzero, from the part's column lists
    (ct, nt = cols[t], count[t]): rows[start[j - lo]:start[j - lo + 1]], in order."""
    start = np.zeros(hi - lo + 1, np.int64)
    for i in range(nt.shape[0]):
        for q in range(nt[i]):
            start[ct[i, q] - lo + 1] += 1
    for j in range(hi - lo):
        start[j + 1] += start[j]
    filled = start[:hi - lo].copy()
    rows = np.empty(start[hi - lo], np.int32)
    for i in range(nt.shape[0]):
        for q in range(nt[i]):
            j = ct[i, q] - lo
            rows[filled[j]] = i
            filled[j] += 1
    return start, rows


@njit(inline='always')
def _feature_grad(x, j, rj, gz, gj):
    """gj = sum over the rows rj (where feature j is nonzero) of x[i, j] * gz[i], four rows at a time."""
    c = rj.shape[0]
    for k in range(gj.shape[0]):
        gj[k] = 0
    p = 0
    while p + 4 <= c:
        i0, i1, i2, i3 = rj[p], rj[p + 1], rj[p + 2], rj[p + 3]
        v0, v1, v2, v3 = x[i0, j], x[i1, j], x[i2, j], x[i3, j]
        r0, r1, r2, r3 = gz[i0], gz[i1], gz[i2], gz[i3]
        for k in range(gj.shape[0]):
            gj[k] += v0 * r0[k] + v1 * r1[k] + v2 * r2[k] + v3 * r3[k]
        p += 4
    for q in range(p, c):
        v, r = x[rj[q], j], gz[rj[q]]
        for k in range(gj.shape[0]):
            gj[k] += v * r[k]


@parallel_kernel
def sparse_weight_grad(x, cols, count, gz):
    """x.T @ gz, (in, out), summing only over the nonzeros of x that sparse_affine found, on as many threads
    as it had parts, each one the same input features (so the same rows of the gradient) as there.

    Each thread first lists, per feature of its part, the rows where it is nonzero, then sums four of them
    at a time."""
    n_in, m = x.shape[1], gz.shape[1]
    parts = cols.shape[0]
    gwt = np.empty((n_in, m), gz.dtype)
    for t in prange(parts):
        lo, hi = n_in * t // parts, n_in * (t + 1) // parts
        start, rows = _feature_rows(cols[t], count[t], lo, hi)
        for j in range(lo, hi):
            _feature_grad(x, j, rows[start[j - lo]:start[j - lo + 1]], gz, gwt[j])
    return gwt


@parallel_kernel
def sparse_weight_grad_update(x, cols, count, gz, m, rule, p, s1, s2, h):
    """sparse_weight_grad, each row of the gradient handed to the optimizer update (kernels.optim) as soon as
    it is summed, so that the gradient is never written out: p (the weight wt, (in, m)) and its state s1,
    s2 (like p, or (in, 0) when the rule does not use them) change exactly as update(rule, p, gwt, s1, s2, h)
    would change them after sparse_weight_grad (a compiled step with keep_grads=False). The rows of gz, p,
    s1 and s2 may be longer than m (padded to whole cache lines, as a compiled epoch passes them): only their
    first m entries are read and written."""
    n_in = x.shape[1]
    parts = cols.shape[0]
    for t in prange(parts):
        lo, hi = n_in * t // parts, n_in * (t + 1) // parts
        start, rows = _feature_rows(cols[t], count[t], lo, hi)
        gj = np.empty(m, gz.dtype)  # _feature_grad reads m entries of each row of gz
        for j in range(lo, hi):
            _feature_grad(x, j, rows[start[j - lo]:start[j - lo + 1]], gz, gj)
            apply_row_update(rule, p, gj, s1, s2, h, j)


@kernel
def first_columns(w, m):
    """w (2-D, C-contiguous) without the padding of its rows past column m: w itself when it has none."""
    return w if w.shape[1] == m else np.ascontiguousarray(w[:, :m])


def linear_forward(x, wt, b, code, sparse_parts=0):
    """act(x @ wt + b) -> (y, nonzeros): one numba kernel, the sparse one on `sparse_parts` threads when
    that is positive (see sparse_enough), then sigmoid/tanh in place on numpy's SIMD ufuncs. nonzeros
    (None on the dense path) is what linear_backward needs to take the sparse path too."""
    relu = code == RELU
    if sparse_parts:
        y, cols, count = sparse_affine(x, wt, b, relu, sparse_parts, sparse_block(*wt.shape, wt.itemsize))
        nonzeros = cols, count
    else:
        y, nonzeros = affine(x, wt, b, relu), None
    return (y if code in (IDENTITY, RELU) else activate_inplace(y, code)), nonzeros


@njit(inline='always')
def _column_sums(a, m):
    """The sums of a's first m columns over its rows, accumulated in float64 row after row, in a's dtype."""
    total = np.zeros(m)
    for i in range(a.shape[0]):
        for j in range(m):
            total[j] += a[i, j]
    out = np.empty(m, a.dtype)
    for j in range(m):  # not out[:] = total: its shape check compiles numba's string formatting, slow cold
        out[j] = total[j]
    return out


@kernel
def act_bias_grad(y, g, code):
    """gz = g * act'(from y) and gb = gz summed over rows (accumulated in float64, row after row).

    Two loops, not one: the elementwise product over the flat arrays vectorises, and the column sums run
    over whole rows; fused, the short inner loops of a narrow layer cost more than their arithmetic."""
    gz = np.empty_like(g)  # a new array also for the identity: aliasing g made numba's code several times slower
    gzf, gf, yf = gz.reshape(-1), g.reshape(-1), y.reshape(-1)
    if code == IDENTITY:
        for q in range(gf.shape[0]):
            gzf[q] = gf[q]
    else:
        for q in range(gf.shape[0]):
            gzf[q] = gf[q] * act_derivative(yf[q], code)
    return gz, _column_sums(gz, g.shape[1])


@kernel
def act_bias_grad_rows(y, g, code):
    """act_bias_grad with gz in rows that start on cache lines and are whole lines long, the padding left
    unset: the weight gradient of a compiled epoch's fused update reads a row of gz per nonzero, and on such
    rows its vector loads do not straddle lines."""
    n, m = g.shape
    gz = cache_line_rows(n, cache_line_width(m, g.itemsize), g.dtype)
    for i in range(n):
        gzi, gi, yi = gz[i], g[i], y[i]
        if code == IDENTITY:
            for j in range(m):
                gzi[j] = gi[j]
        else:
            for j in range(m):
                gzi[j] = gi[j] * act_derivative(yi[j], code)
    return gz, _column_sums(gz, m)


@parallel_kernel
def dense_backward(x, wt, y, g, code, need_gx, parts):
    """act_bias_grad, then gwt = x.T @ gz and (when need_gx, else an empty array) gx = gz @ wt.T. With parts
    > 1 the two products run at once, one on each of two threads: for when numba owns the cores and BLAS
    runs on one thread (the same BLAS calls as one after the other, so the same results)."""
    gz, gb = act_bias_grad(y, g, code)
    gwt = np.empty((x.shape[1], gz.shape[1]), g.dtype)
    gx = np.empty((gz.shape[0], wt.shape[0]) if need_gx else (0, 0), g.dtype)
    if need_gx and parts > 1:
        for t in prange(2):
            if t == 0:
                np.dot(x.T, gz, gwt)
            else:
                np.dot(gz, wt.T, gx)
    else:
        np.dot(x.T, gz, gwt)
        if need_gx:
            np.dot(gz, wt.T, gx)
    return gx, gwt, gb


def linear_backward(x, wt, y, g, code, need_gx, nonzeros=None, parts=1):
    """From g = dL/dy: returns (gx or None, gwt = dL/dwt (in, out), gb (out,)).

    The activation derivative is taken from the saved output y and fused with the bias sum; with the
    `nonzeros` the forward used, the weight gradient sums over them only. `parts`: the threads for the
    dense path's two products (see dense_backward)."""
    if nonzeros is None:
        gx, gwt, gb = dense_backward(x, wt, y, g, code, need_gx, parts)
        return (gx if need_gx else None), gwt, gb
    gz, gb = act_bias_grad(y, g, code)
    cols, count = nonzeros
    gwt = sparse_weight_grad(x, cols, count, gz)
    return (matmul(gz, wt.T) if need_gx else None), gwt, gb
