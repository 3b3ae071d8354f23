"""2-D convolution and max-pooling on NCHW arrays.

Convolution is im2col around one BLAS product: the input's patches are laid out as the columns of
cols (C*kh*kw, N*OH*OW), so that forward is w2 @ cols, the weight gradient g2 @ cols.T and the patches'
gradient w2.T @ g2, each one sgemm through numba's np.dot (SciPy's OpenBLAS, the one BLAS of a step).
Rows of cols are runs of an input row, so that filling it (and col2im, its adjoint) is a copy along
contiguous memory for stride 1. Measured here against direct loops (conv2d_direct, the same forward as
nested loops; float32, batch 128, best of 20, a busy 2-core machine): LeNet's conv1 (1 -> 6 channels, 28x28)
16 ms against 4-8 ms for im2col + sgemm, conv2 (6 -> 16, 14x14) 47 ms against 4-12 ms, a 3x9 toy 0.1 ms
against 0.03 ms. Of im2col + sgemm's time, filling cols is most (about 2 ms for either layer); the
products themselves ran at 35-130 GFLOP/s.

The caller passes the big scratch arrays (cols, the product's output and the patches' gradient) so that
it can reuse them from step to step; kernels only fill them. Activations: relu (code 1) can be fused into
the output loop; backward then masks the incoming gradient with the saved output.
"""
import numpy as np

from .jit import kernel


@kernel
def conv_output_size(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


@kernel
def _valid_range(k_offset, stride, pad, size, out):
    """The output positions q in [lo, hi) whose input position q * stride + k_offset - pad is inside [0, size)."""
    first = pad - k_offset  # q * stride >= first
    lo = 0 if first <= 0 else (first + stride - 1) // stride
    last = size - 1 + pad - k_offset  # q * stride <= last
    hi = 0 if last < 0 else min(out, last // stride + 1)
    return lo, max(lo, hi)


@kernel
def im2col(x, kh, kw, sh, sw, ph, pw, cols):
    """Fills cols (C*kh*kw, N*OH*OW): cols[(c*kh + i)*kw + j, (n*OH + r)*OW + q] = x[n, c, r*sh + i - ph,
    q*sw + j - pw], zero outside x (the padding)."""
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    plane = oh * ow
    for ci in range(c):
        for i in range(kh):
            rlo, rhi = _valid_range(i, sh, ph, h, oh)
            for j in range(kw):
                qlo, qhi = _valid_range(j, sw, pw, w, ow)
                row = cols[(ci * kh + i) * kw + j]
                for b in range(n):
                    xb = x[b, ci]
                    base = b * plane
                    for r in range(oh):
                        dst = base + r * ow
                        if r < rlo or r >= rhi:
                            for q in range(ow):
                                row[dst + q] = 0
                            continue
                        xr = xb[r * sh + i - ph]
                        for q in range(qlo):
                            row[dst + q] = 0
                        src = j - pw
                        for q in range(qlo, qhi):
                            row[dst + q] = xr[q * sw + src]
                        for q in range(qhi, ow):
                            row[dst + q] = 0


@kernel
def col2im(cols, kh, kw, sh, sw, ph, pw, gx):
    """The adjoint of im2col: adds every column entry back into gx (N, C, H, W), which the caller zeroed."""
    n, c, h, w = gx.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    plane = oh * ow
    for b in range(n):
        for ci in range(c):
            gb = gx[b, ci]
            for i in range(kh):
                rlo, rhi = _valid_range(i, sh, ph, h, oh)
                for j in range(kw):
                    qlo, qhi = _valid_range(j, sw, pw, w, ow)
                    row = cols[(ci * kh + i) * kw + j]
                    src = j - pw
                    for r in range(rlo, rhi):
                        gr = gb[r * sh + i - ph]
                        at = b * plane + r * ow
                        for q in range(qlo, qhi):
                            gr[q * sw + src] += row[at + q]


@kernel
def conv2d_forward(x, w2, b, kh, kw, sh, sw, ph, pw, relu, cols, y2):
    """x (N, C, H, W), w2 (O, C*kh*kw), b (O,) -> y (N, O, OH, OW) = conv(x, w) + b (relu fused when relu).
    Fills cols (C*kh*kw, N*OH*OW) with x's patches (backward needs them for the weight gradient) and uses
    y2 (O, N*OH*OW) for the product."""
    n, c, h, w = x.shape
    o = w2.shape[0]
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    plane = oh * ow
    im2col(x, kh, kw, sh, sw, ph, pw, cols)
    np.dot(w2, cols, y2)
    y = np.empty((n, o, oh, ow), x.dtype)
    yf = y.reshape(n, o, plane)
    for bi in range(n):
        for oi in range(o):
            src, dst, bias = y2[oi], yf[bi, oi], b[oi]
            at = bi * plane
            for p in range(plane):
                v = src[at + p] + bias
                dst[p] = v if (v > 0 or not relu) else v * 0  # v * 0 keeps NaN, as torch.relu
    return y


@kernel
def conv2d_backward(cols, w2, y, gy, relu, kh, kw, sh, sw, ph, pw, need_w, need_b, g2, gcols, gx):
    """Gradients of conv2d_forward from gy (N, O, OH, OW): (gw2 (O, C*kh*kw), gb (O,)), each empty when not
    needed; the input's gradient goes into gx (N, C, H, W) when gx is not empty (the caller zeroed it).
    g2 (O, N*OH*OW) and gcols (C*kh*kw, N*OH*OW) are scratch."""
    n, o, oh, ow = gy.shape
    plane = oh * ow
    gyf, yf = gy.reshape(n, o, plane), y.reshape(n, o, plane)
    gb = np.zeros(o if need_b else 0, gy.dtype)
    for oi in range(o):
        dst = g2[oi]
        total = 0.0  # the bias gradient sums N*OH*OW terms: in float64
        for bi in range(n):
            src, out, at = gyf[bi, oi], yf[bi, oi], bi * plane
            for p in range(plane):
                g = src[p]
                if relu and not out[p] > 0:
                    g = g * 0
                dst[at + p] = g
                total += g
        if need_b:
            gb[oi] = total
    if need_w:
        gw2 = np.dot(g2, cols.T)
    else:
        gw2 = np.empty((0, w2.shape[1]), gy.dtype)
    if gx.size:
        np.dot(w2.T, g2, gcols)
        col2im(gcols, kh, kw, sh, sw, ph, pw, gx)
    return gw2, gb


@kernel
def conv2d_direct(x, w, b, sh, sw, ph, pw):
    """The same forward as plain loops (no relu), kept to measure im2col + sgemm against and as a reference."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(wd, kw, sw, pw)
    y = np.empty((n, o, oh, ow), x.dtype)
    for bi in range(n):
        for oi in range(o):
            for r in range(oh):
                for q in range(ow):
                    y[bi, oi, r, q] = b[oi]
            for ci in range(c):
                for i in range(kh):
                    rlo, rhi = _valid_range(i, sh, ph, h, oh)
                    for j in range(kw):
                        qlo, qhi = _valid_range(j, sw, pw, wd, ow)
                        wv = w[oi, ci, i, j]
                        for r in range(rlo, rhi):
                            xr = x[bi, ci, r * sh + i - ph]
                            yr = y[bi, oi, r]
                            for q in range(qlo, qhi):
                                yr[q] += wv * xr[q * sw + j - pw]
    return y


@kernel
def maxpool2d_forward(x, kh, kw, sh, sw):
    """y (N, C, OH, OW): the maximum of each kh x kw window (no padding, OH = (H - kh) // sh + 1), and
    where it is, as a flat index into the window's H x W plane. Ties: the first maximum in row-major
    order wins; a NaN in a window is its maximum (both as PyTorch on the CPU)."""
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = np.empty((n, c, oh, ow), x.dtype)
    where = np.empty((n, c, oh, ow), np.int32)
    for b in range(n):
        for ci in range(c):
            xp, yp, wp = x[b, ci], y[b, ci], where[b, ci]
            for r in range(oh):
                for q in range(ow):
                    best = -np.inf
                    at = r * sh * w + q * sw
                    for i in range(kh):
                        xr = xp[r * sh + i]
                        for j in range(kw):
                            v = xr[q * sw + j]
                            if v > best or v != v:
                                best = v
                                at = (r * sh + i) * w + q * sw + j
                    yp[r, q] = best
                    wp[r, q] = at
    return y, where


@kernel
def maxpool2d_backward(where, gy, h, w):
    """gx (N, C, H, W): each window's gradient added at its maximum (overlapping windows add up)."""
    n, c, oh, ow = gy.shape
    gx = np.zeros((n, c, h * w), gy.dtype)
    for b in range(n):
        for ci in range(c):
            gp, wp, gyp = gx[b, ci], where[b, ci], gy[b, ci]
            for r in range(oh):
                for q in range(ow):
                    gp[wp[r, q]] += gyp[r, q]
    return gx.reshape(n, c, h, w)
