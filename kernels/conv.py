"""2-D convolution and max-pooling on NCHW arrays, one image at a time, images split over `parts` threads.

Convolution is one BLAS product per image on the image's shifted rows. The image is zero-padded (Hp x Wp)
and its rows laid end to end; then for every output row r and column t in [0, Wp) of a "wide" output,
  y_wide[o, r*Wp + t] = sum over (c, i, j) of w[o, c, i, j] * xp[c, (r*sh + i)*Wp + t + j],
so each row (c, i, j) of the patch matrix cols (C*kh*kw, OH*Wp) is a run of xp copied whole (one run per
image for stride 1), and its adjoint adds runs back. The output is y_wide's columns t = q*sw for q < OW;
the other Wp - OW columns (a few wasted products) are dropped, and their gradients are zero. Forward is
w2 @ cols, the weight gradient g @ cols.T (or its transpose) and the patches' gradient w2.T @ g, each one
sgemm through numba's np.dot (SciPy's OpenBLAS, the one BLAS of a step). With parts > 1 the images run
in a numba parallel region, inside which OpenBLAS must be on one thread (fastgrad's thread policy sees to
that); with parts == 1 no parallel region is opened. Everything an image needs stays in cache; backward
builds the patches again rather than keeping them.

Activations: relu can be fused into the output loop; backward then masks the incoming gradient with the
saved output. Non-finite values: the dropped columns multiply real pixels by zero gradients, so an inf
pixel that no output reads (stride > 1) can still make the weight gradient NaN where PyTorch's is finite;
relu maps -inf to NaN (v * 0) where PyTorch gives 0. Finite inputs agree with PyTorch.
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
        for r in range(h):
            at = (r + ph) * wp + pw
            dst, row = xp[ci, at:at + w], x[ci, r]
            for q in range(w):
                dst[q] = row[q]


# The loops below index slices taken first (dst[t] = src[t]) rather than arrays at computed offsets
# (dst[t] = src[start + t]): numba then has no negative index to allow for, and the copies vectorise fully.
@kernel
def shifted_cols(xp, kh, kw, sh, oh, wp, cols):
    """cols (C*kh*kw, OH*Wp): cols[(c*kh + i)*kw + j, r*Wp + t] = xp[c, (r*sh + i)*Wp + t + j]."""
    c = xp.shape[0]
    run = oh * wp
    for ci in range(c):
        for i in range(kh):
            for j in range(kw):
                row = cols[(ci * kh + i) * kw + j]
                if sh == 1:  # the output rows' runs follow each other: one copy
                    src = xp[ci, i * wp + j:i * wp + j + run]
                    for t in range(run):
                        row[t] = src[t]
                else:
                    for r in range(oh):
                        start = (r * sh + i) * wp + j
                        src, dst = xp[ci, start:start + wp], row[r * wp:(r + 1) * wp]
                        for t in range(wp):
                            dst[t] = src[t]


@kernel
def shifted_cols_adjoint(cols, kh, kw, sh, oh, wp, gxp):
    """The adjoint of shifted_cols: gxp (C, Hp*Wp + kw) = the sum of cols' entries at their places. For
    stride 1 the kw rows of one kernel row first add up in a buffer of one patch row, then go to gxp at once."""
    c = gxp.shape[0]
    run = oh * wp
    gxp[:] = 0
    acc = np.empty(run + kw - 1, gxp.dtype)
    for ci in range(c):
        for i in range(kh):
            if sh == 1:
                acc[:] = 0
                for j in range(kw):
                    row, part = cols[(ci * kh + i) * kw + j], acc[j:j + run]
                    for t in range(run):
                        part[t] += row[t]
                dst = gxp[ci, i * wp:i * wp + run + kw - 1]
                for t in range(run + kw - 1):
                    dst[t] += acc[t]
            else:
                for j in range(kw):
                    row = cols[(ci * kh + i) * kw + j]
                    for r in range(oh):
                        start = (r * sh + i) * wp + j
                        src, dst = row[r * wp:(r + 1) * wp], gxp[ci, start:start + wp]
                        for t in range(wp):
                            dst[t] += src[t]


@kernel
def unpad_image(xp, ph, pw, x):
    """The inverse of pad_image: x (C, H, W) = the interior of xp (C, Hp*Wp + kw)."""
    c, h, w = x.shape
    wp = w + 2 * pw
    for ci in range(c):
        for r in range(h):
            at = (r + ph) * wp + pw
            src, dst = xp[ci, at:at + w], x[ci, r]
            for q in range(w):
                dst[q] = src[q]


@kernel
def _forward_images(x, w2, b, kh, kw, sh, sw, ph, pw, relu, lo, hi, y):
    """conv2d_forward of images lo..hi-1 into y, with scratch of their own."""
    _, c, h, w = x.shape
    _, o, oh, ow = y.shape
    wp = w + 2 * pw
    xp = np.empty((c, (h + 2 * ph) * wp + kw), x.dtype)
    cols = np.empty((c * kh * kw, oh * wp), x.dtype)
    wide = np.empty((o, oh * wp), x.dtype)
    for bi in range(lo, hi):
        pad_image(x[bi], ph, pw, kw, xp)
        shifted_cols(xp, kh, kw, sh, oh, wp, cols)
        np.dot(w2, cols, wide)
        for oi in range(o):
            bias = b[oi]
            for r in range(oh):
                dst = y[bi, oi, r]
                if sw == 1 and relu:  # a contiguous slice: the loop vectorises
                    run = wide[oi, r * wp:r * wp + ow]
                    for q in range(ow):
                        v = run[q] + bias
                        dst[q] = v if v > 0 else v * 0  # v * 0 keeps NaN, as torch.relu
                    continue
                src = wide[oi, r * wp:r * wp + (ow - 1) * sw + 1:sw]
                for q in range(ow):
                    v = src[q] + bias
                    dst[q] = v if (v > 0) | (not relu) else v * 0


@parallel_kernel
def conv2d_forward(x, w2, b, kh, kw, sh, sw, ph, pw, relu, parts):
    """x (N, C, H, W), w2 (O, C*kh*kw), b (O,) -> y (N, O, OH, OW) = conv(x, w) + b, relu fused when relu."""
    n, _, h, w = x.shape
    y = np.empty((n, w2.shape[0], conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)), x.dtype)
    if parts == 1:  # no parallel region at all: BLAS may then use threads of its own
        _forward_images(x, w2, b, kh, kw, sh, sw, ph, pw, relu, 0, n, y)
    else:
        for part in prange(parts):
            _forward_images(x, w2, b, kh, kw, sh, sw, ph, pw, relu, part * n // parts, (part + 1) * n // parts, y)
    return y


# The weight gradient as OpenBLAS computes it faster (measured; see the commit that chose this): g @ cols.T
# for a few output channels over short patches, else transposed, cols @ g.T, with g.T an array of its own.
THIN_MAX_CHANNELS, THIN_MAX_PATCH = 7, 160


@kernel
def _backward_images(x, w2, y, gy, relu, kh, kw, sh, sw, ph, pw, need_x, need_w, lo, hi, gx, gwt, gb):
    """conv2d_backward of images lo..hi-1: adds their weight gradient (transposed) into gwt (C*kh*kw, O) and
    their bias gradient into gb (O,), and writes their input gradient into gx when need_x."""
    _, c, h, w = x.shape
    _, o, oh, ow = gy.shape
    wp = w + 2 * pw
    ckk = c * kh * kw
    thin = o <= THIN_MAX_CHANNELS and ckk <= THIN_MAX_PATCH
    xp = np.empty((c, (h + 2 * ph) * wp + kw), x.dtype)
    cols = np.empty((ckk, oh * wp), x.dtype)
    g = np.zeros((o, oh * wp), gy.dtype)  # the dropped columns stay zero
    gt = np.zeros((oh * wp, o), gy.dtype)
    gwt_image = np.empty((ckk, o), gy.dtype)
    gw_image = np.empty((o, ckk), gy.dtype)
    gcols = np.empty((ckk, oh * wp), gy.dtype)
    for bi in range(lo, hi):
        for oi in range(o):
            total = 0.0
            for r in range(oh):
                src, out = gy[bi, oi, r], y[bi, oi, r]
                end = r * wp + (ow - 1) * sw + 1
                dst, dst_t = g[oi, r * wp:end:sw], gt[r * wp:end:sw, oi]
                for q in range(ow):
                    v = src[q]
                    if relu:
                        v = v if out[q] > 0 else v * 0
                    dst[q] = v
                    dst_t[q] = v
                    total += v
            gb[oi] += total
        if need_w:
            pad_image(x[bi], ph, pw, kw, xp)
            shifted_cols(xp, kh, kw, sh, oh, wp, cols)
            if thin:
                np.dot(g, cols.T, gw_image)
                gwt += gw_image.T
            else:
                np.dot(cols, gt, gwt_image)
                gwt += gwt_image
        if need_x:
            np.dot(w2.T, g, gcols)
            shifted_cols_adjoint(gcols, kh, kw, sh, oh, wp, xp)
            unpad_image(xp, ph, pw, gx[bi])


@parallel_kernel
def conv2d_backward(x, w2, y, gy, relu, kh, kw, sh, sw, ph, pw, need_x, need_w, need_b, parts):
    """Gradients of conv2d_forward from gy (N, O, OH, OW): (gx (N, C, H, W), gw2 (O, C*kh*kw), gb (O,)),
    each with a first dimension of 0 when not needed (no patches are built without need_w, no patches'
    gradient without need_x). The threads' partial sums of gw2 and gb are added at the end."""
    n, c, h, w = x.shape
    o = gy.shape[1]
    gwt_parts = np.zeros((parts, c * kh * kw, o), gy.dtype)
    gb_parts = np.zeros((parts, o), np.float64)  # each bias gradient sums N*OH*OW terms: in float64
    gx = np.empty((n if need_x else 0, c, h, w), gy.dtype)
    if parts == 1:  # no parallel region at all: BLAS may then use threads of its own
        _backward_images(x, w2, y, gy, relu, kh, kw, sh, sw, ph, pw, need_x, need_w, 0, n, gx, gwt_parts[0],
                         gb_parts[0])
    else:
        for part in prange(parts):
            _backward_images(x, w2, y, gy, relu, kh, kw, sh, sw, ph, pw, need_x, need_w, part * n // parts,
                             (part + 1) * n // parts, gx, gwt_parts[part], gb_parts[part])
    for part in range(1, parts):
        gwt_parts[0] += gwt_parts[part]
    gw = np.ascontiguousarray(gwt_parts[0].T)
    gb = np.empty(o if need_b else 0, gy.dtype)
    for oi in range(gb.shape[0]):
        gb[oi] = gb_parts[:, oi].sum()
    return gx, gw[:o if need_w else 0], gb


@kernel
def _max_at(best, at, v, where):
    """(best, at) updated by the value v at where: v wins if greater, or NaN. Selects, not branches: on
    data, which of a window's values wins is a coin toss that a branch predictor loses."""
    take = (v > best) | (v != v)
    return (v if take else best), (where if take else at)


@kernel
def _maxpool_images(x, kh, kw, sh, sw, lo, hi, y, where):
    """maxpool2d_forward of images lo..hi-1 into y and where."""
    _, c, h, w = x.shape
    _, _, oh, ow = y.shape
    for bi in range(lo, hi):
        for ci in range(c):
            plane, y_plane, where_plane = x[bi, ci], y[bi, ci], where[bi, ci]
            for r in range(oh):
                if kh == 2 and kw == 2:  # the common window, unrolled
                    end = (ow - 1) * sw + 1
                    top_left, top_right = plane[r * sh, 0:end:sw], plane[r * sh, 1:end + 1:sw]
                    bottom_left, bottom_right = plane[r * sh + 1, 0:end:sw], plane[r * sh + 1, 1:end + 1:sw]
                    y_row, where_row = y_plane[r], where_plane[r]
                    first = r * sh * w
                    for q in range(ow):
                        at = first + q * sw
                        best, at_best = _max_at(top_left[q], at, top_right[q], at + 1)
                        best, at_best = _max_at(best, at_best, bottom_left[q], at + w)
                        best, at_best = _max_at(best, at_best, bottom_right[q], at + w + 1)
                        y_row[q] = best
                        where_row[q] = at_best
                    continue
                for q in range(ow):
                    at = r * sh * w + q * sw
                    best = plane[r * sh, q * sw]
                    for i in range(kh):
                        for j in range(kw):
                            best, at = _max_at(best, at, plane[r * sh + i, q * sw + j], (r * sh + i) * w + q * sw + j)
                    y_plane[r, q] = best
                    where_plane[r, q] = at


@parallel_kernel
def maxpool2d_forward(x, kh, kw, sh, sw, parts):
    """y (N, C, OH, OW): the maximum of each kh x kw window (no padding, OH = (H - kh) // sh + 1), and
    where it is, as a flat index into the window's H x W plane. Ties: the first maximum in row-major
    order wins; a NaN in a window is its maximum (both as PyTorch on the CPU)."""
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = np.empty((n, c, oh, ow), x.dtype)
    where = np.empty((n, c, oh, ow), np.int32)
    if parts == 1:
        _maxpool_images(x, kh, kw, sh, sw, 0, n, y, where)
    else:
        for part in prange(parts):
            _maxpool_images(x, kh, kw, sh, sw, part * n // parts, (part + 1) * n // parts, y, where)
    return y, where


@kernel
def _maxpool_grad_images(where, gy, lo, hi, gx):
    """maxpool2d_backward of images lo..hi-1 into gx (N, C, H*W), zeroed here, on the thread that fills it."""
    _, c, oh, ow = gy.shape
    for bi in range(lo, hi):
        gx[bi] = 0
        for ci in range(c):
            g_plane, where_plane, gy_plane = gx[bi, ci], where[bi, ci], gy[bi, ci]
            for r in range(oh):
                for q in range(ow):
                    g_plane[where_plane[r, q]] += gy_plane[r, q]


@parallel_kernel
def maxpool2d_backward(where, gy, h, w, parts):
    """gx (N, C, H, W): each window's gradient added at its maximum (overlapping windows add up)."""
    n, c = gy.shape[:2]
    gx = np.empty((n, c, h * w), gy.dtype)
    if parts == 1:
        _maxpool_grad_images(where, gy, 0, n, gx)
    else:
        for part in prange(parts):
            _maxpool_grad_images(where, gy, part * n // parts, (part + 1) * n // parts, gx)
    return gx.reshape(n, c, h, w)
