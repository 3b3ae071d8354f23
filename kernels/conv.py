"""2-D convolution and max-pooling on NCHW arrays, one image at a time, images split over `parts` threads.

Convolution is one BLAS product per image on the image's shifted rows. The image is zero-padded (Hp x Wp)
and its rows laid end to end; then for every output row r and column t in [0, Wp) of a "wide" output,
  y_wide[o, r*Wp + t] = sum over (c, i, j) of w[o, c, i, j] * xp[c, (r*sh + i)*Wp + t + j],
so each row (c, i, j) of the patch matrix cols (C*kh*kw, OH*Wp) is a run of xp copied whole (one run per
image for stride 1), and its adjoint adds runs back. The output is y_wide's columns t = q*sw for q < OW;
the other Wp - OW columns (a few wasted products) are dropped, and their gradients are zero. Forward is
w2 @ cols, the weight gradient (cols @ g.T).T and the patches' gradient w2.T @ g, each one sgemm through
numba's np.dot (SciPy's OpenBLAS, the one BLAS of a step, which must be on one thread when parts > 1).
Everything an image needs stays in cache; backward builds the patches again rather than keeping them.

Activations: relu can be fused into the output loop; backward then masks the incoming gradient with the
saved output.
"""
import numpy as np
from numba import prange

from .jit import kernel, parallel_kernel


@kernel
def conv_output_size(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


@kernel
def pad_image(x, ph, pw, kw, xp):
    """xp (C, Hp*Wp + kw): each channel of x (C, H, W) zero-padded by ph rows and pw columns each side,
    its rows end to end, then kw zeros (read by the dropped columns of the last output row)."""
    c, h, w = x.shape
    wp = w + 2 * pw
    xp[:] = 0
    for ci in range(c):
        dst = xp[ci]
        for r in range(h):
            at, row = (r + ph) * wp + pw, x[ci, r]
            for q in range(w):
                dst[at + q] = row[q]


@kernel
def shifted_cols(xp, kh, kw, sh, oh, wp, cols):
    """cols (C*kh*kw, OH*Wp): cols[(c*kh + i)*kw + j, r*Wp + t] = xp[c, (r*sh + i)*Wp + t + j]."""
    c = xp.shape[0]
    run = oh * wp
    for ci in range(c):
        src = xp[ci]
        for i in range(kh):
            for j in range(kw):
                row = cols[(ci * kh + i) * kw + j]
                if sh == 1:  # the output rows' runs follow each other: one copy
                    start = i * wp + j
                    for t in range(run):
                        row[t] = src[start + t]
                else:
                    for r in range(oh):
                        at, start = r * wp, (r * sh + i) * wp + j
                        for t in range(wp):
                            row[at + t] = src[start + t]


@kernel
def shifted_cols_adjoint(cols, kh, kw, sh, oh, wp, gxp):
    """The adjoint of shifted_cols: gxp (C, Hp*Wp + kw) = the sum of cols' entries at their places. For
    stride 1 the kw rows of one kernel row first add up in a short buffer that stays in the L1 cache."""
    c = gxp.shape[0]
    run = oh * wp
    gxp[:] = 0
    acc = np.empty(run + kw, gxp.dtype)
    for ci in range(c):
        dst = gxp[ci]
        for i in range(kh):
            if sh == 1:
                acc[:] = 0
                for j in range(kw):
                    row = cols[(ci * kh + i) * kw + j]
                    for t in range(run):
                        acc[j + t] += row[t]
                start = i * wp
                for t in range(run + kw - 1):
                    dst[start + t] += acc[t]
            else:
                for j in range(kw):
                    row = cols[(ci * kh + i) * kw + j]
                    for r in range(oh):
                        at, start = r * wp, (r * sh + i) * wp + j
                        for t in range(wp):
                            dst[start + t] += row[at + t]


@parallel_kernel
def conv2d_forward(x, w2, b, kh, kw, sh, sw, ph, pw, relu, parts):
    """x (N, C, H, W), w2 (O, C*kh*kw), b (O,) -> y (N, O, OH, OW) = conv(x, w) + b, relu fused when relu."""
    n, c, h, w = x.shape
    o = w2.shape[0]
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    wp = w + 2 * pw
    y = np.empty((n, o, oh, ow), x.dtype)
    for part in prange(parts):
        xp = np.empty((c, (h + 2 * ph) * wp + kw), x.dtype)
        cols = np.empty((c * kh * kw, oh * wp), x.dtype)
        wide = np.empty((o, oh * wp), x.dtype)
        for bi in range(part * n // parts, (part + 1) * n // parts):
            pad_image(x[bi], ph, pw, kw, xp)
            shifted_cols(xp, kh, kw, sh, oh, wp, cols)
            np.dot(w2, cols, wide)
            for oi in range(o):
                src, bias, dst = wide[oi], b[oi], y[bi, oi]
                for r in range(oh):
                    for q in range(ow):
                        v = src[r * wp + q * sw] + bias
                        dst[r, q] = v if (v > 0 or not relu) else v * 0  # v * 0 keeps NaN, as torch.relu
    return y


@parallel_kernel
def conv2d_backward(x, w2, y, gy, relu, kh, kw, sh, sw, ph, pw, need_x, need_w, need_b, parts):
    """Gradients of conv2d_forward from gy (N, O, OH, OW): (gx (N, C, H, W), gw2 (O, C*kh*kw), gb (O,)),
    each with a first dimension of 0 when not needed (no patches are built without need_w, no patches'
    gradient without need_x)."""
    n, c, h, w = x.shape
    _, o, oh, ow = gy.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    ckk = c * kh * kw
    # the weight gradient is summed transposed, cols @ g.T with g.T a C-contiguous array of its own: for
    # these shapes, faster than g @ cols.T with a transposed operand
    gwt_parts = np.zeros((parts, ckk, o), gy.dtype)
    gb_parts = np.zeros((parts, o), np.float64)  # each bias gradient sums N*OH*OW terms: in float64
    gx = np.empty((n if need_x else 0, c, h, w), gy.dtype)
    for part in prange(parts):
        xp = np.empty((c, hp * wp + kw), x.dtype)
        cols = np.empty((ckk, oh * wp), x.dtype)
        g = np.zeros((o, oh * wp), gy.dtype)  # the dropped columns stay zero
        gt = np.zeros((oh * wp, o), gy.dtype)
        gwt = np.empty((ckk, o), gy.dtype)
        gcols = np.empty((ckk, oh * wp), gy.dtype)
        for bi in range(part * n // parts, (part + 1) * n // parts):
            for oi in range(o):
                src, out, dst = gy[bi, oi], y[bi, oi], g[oi]
                total = 0.0
                for r in range(oh):
                    for q in range(ow):
                        v = src[r, q]
                        if relu and not out[r, q] > 0:
                            v = v * 0
                        dst[r * wp + q * sw] = v
                        gt[r * wp + q * sw, oi] = v
                        total += v
                gb_parts[part, oi] += total
            if need_w:
                pad_image(x[bi], ph, pw, kw, xp)
                shifted_cols(xp, kh, kw, sh, oh, wp, cols)
                np.dot(cols, gt, gwt)
                gwt_parts[part] += gwt
            if need_x:
                np.dot(w2.T, g, gcols)
                shifted_cols_adjoint(gcols, kh, kw, sh, oh, wp, xp)
                for ci in range(c):
                    src, dst = xp[ci], gx[bi, ci]
                    for r in range(h):
                        at = (r + ph) * wp + pw
                        for q in range(w):
                            dst[r, q] = src[at + q]
    for part in range(1, parts):
        gwt_parts[0] += gwt_parts[part]
    gw = np.ascontiguousarray(gwt_parts[0].T)
    gb = np.empty(o if need_b else 0, gy.dtype)
    for oi in range(gb.shape[0]):
        gb[oi] = gb_parts[:, oi].sum()
    return gx, gw[:o if need_w else 0], gb


@kernel
def conv2d_direct(x, w, b, sh, sw, ph, pw):
    """The same forward as plain loops over every output and kernel entry (no relu): a reference for tests."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(wd, kw, sw, pw)
    y = np.empty((n, o, oh, ow), x.dtype)
    for bi in range(n):
        for oi in range(o):
            for r in range(oh):
                for q in range(ow):
                    total = b[oi]
                    for ci in range(c):
                        for i in range(kh):
                            for j in range(kw):
                                row, col = r * sh + i - ph, q * sw + j - pw
                                if 0 <= row < h and 0 <= col < wd:
                                    total += w[oi, ci, i, j] * x[bi, ci, row, col]
                    y[bi, oi, r, q] = total
    return y


@parallel_kernel
def maxpool2d_forward(x, kh, kw, sh, sw, parts):
    """y (N, C, OH, OW): the maximum of each kh x kw window (no padding, OH = (H - kh) // sh + 1), and
    where it is, as a flat index into the window's H x W plane. Ties: the first maximum in row-major
    order wins; a NaN in a window is its maximum (both as PyTorch on the CPU)."""
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = np.empty((n, c, oh, ow), x.dtype)
    where = np.empty((n, c, oh, ow), np.int32)
    for part in prange(parts):
        for b in range(part * n // parts, (part + 1) * n // parts):
            for ci in range(c):
                xp, yp, wp = x[b, ci], y[b, ci], where[b, ci]
                for r in range(oh):
                    if kh == 2 and kw == 2:  # the common window, unrolled
                        top, bottom = xp[r * sh], xp[r * sh + 1]
                        for q in range(ow):
                            j = q * sw
                            best, at = top[j], j
                            v = top[j + 1]
                            if v > best or v != v:
                                best, at = v, j + 1
                            v = bottom[j]
                            if v > best or v != v:
                                best, at = v, w + j
                            v = bottom[j + 1]
                            if v > best or v != v:
                                best, at = v, w + j + 1
                            yp[r, q] = best
                            wp[r, q] = r * sh * w + at
                        continue
                    for q in range(ow):
                        at = r * sh * w + q * sw
                        best = xp[r * sh, q * sw]
                        for i in range(kh):
                            for j in range(kw):
                                v = xp[r * sh + i, q * sw + j]
                                if v > best or v != v:
                                    best = v
                                    at = (r * sh + i) * w + q * sw + j
                        yp[r, q] = best
                        wp[r, q] = at
    return y, where


@parallel_kernel
def maxpool2d_backward(where, gy, h, w, parts):
    """gx (N, C, H, W): each window's gradient added at its maximum (overlapping windows add up)."""
    n, c, oh, ow = gy.shape
    gx = np.zeros((n, c, h * w), gy.dtype)
    for part in prange(parts):
        for b in range(part * n // parts, (part + 1) * n // parts):
            for ci in range(c):
                gp, wp, gyp = gx[b, ci], where[b, ci], gy[b, ci]
                for r in range(oh):
                    for q in range(ow):
                        gp[wp[r, q]] += gyp[r, q]
    return gx.reshape(n, c, h, w)
