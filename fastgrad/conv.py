"""Convolutional networks: the Conv2dOp, MaxPool2dOp and FlattenOp ops, their modules Conv2d, MaxPool2d and
Flatten (as ops.Linear and modules.Linear), the functions conv2d, max_pool2d and flatten, and LeNet-5.

Arrays are NCHW, as in PyTorch: x (N, C, H, W), a convolution's weight (O, C, kh, kw) and bias (O,).
The maths runs in kernels/conv.py (one sgemm per image on its shifted rows, see there), on arrays from
backend.prepare, on the threads backend.conv_parts gives.

fastgrad.compile runs the three ops through the same kernels (compiled.EMITTERS), so a step with them
compiles, and `fastgrad train --model lenet` runs compiled unless --eager.
"""
import numpy as np

from .backend import OP_KERNELS, conv_parts, prepare
from .core import Op, TensorNode
from .functions import relu, sigmoid, tanh
from .modules import ACTIVATIONS, Linear, Module, _float_dtype, _is_size, _size


def _pair(op, name, value, minimum):
    """An int or a pair of ints, as a pair; ValueError below minimum."""
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum
                                 for v in pair):
        raise ValueError(f'{op}: {name} must be an integer >= {minimum} or a pair of them, not {value!r}')
    return int(pair[0]), int(pair[1])


def conv_geometry(stride, padding):
    """A convolution's ((sh, sw), (ph, pw)) from its stride and padding constants (an int or a pair each)."""
    return _pair('Conv2d', 'stride', stride, 1), _pair('Conv2d', 'padding', padding, 0)


def pool_geometry(kernel_size, stride):
    """A max-pool's ((kh, kw), (sh, sw)) from its constants; stride None is the kernel size."""
    kernel = _pair('MaxPool2d', 'kernel_size', kernel_size, 1)
    return kernel, (kernel if stride is None else _pair('MaxPool2d', 'stride', stride, 1))


def _check_4d(op, name, a):
    if a.ndim != 4:
        raise ValueError(f'{op}: {name} must have 4 dimensions (NCHW), got shape {a.shape}')


# -- the ops
class Conv2dOp(Op):
    """y = conv(x, w) + b, cross-correlation as torch.nn.functional.conv2d: x (N, C, H, W), w (O, C, kh, kw),
    b (O,) -> y (N, O, OH, OW), OH = (H + 2 ph - kh) // sh + 1. Constants: stride and padding (an int or a
    pair), activation None or 'relu' (fused into the output loop). Backward returns (dL/dx, dL/dw, dL/db),
    dL/dx only when x needs it (not for the data): then the patches' gradient is not computed."""
    edits_goutputs = False

    @staticmethod
    def forward(context, x, w, b, *, stride=1, padding=0, activation=None):
        if activation not in (None, 'identity', 'relu'):
            raise ValueError(f"Conv2d: activation must be None or 'relu', not {activation!r}")
        (sh, sw), (ph, pw) = conv_geometry(stride, padding)
        _check_4d('Conv2d', 'input', x)
        _check_4d('Conv2d', 'weight', w)
        o, c, kh, kw = w.shape
        if x.shape[1] != c or b.shape != (o,):
            raise ValueError(f'Conv2d: input {x.shape} (N, C, H, W), weight {w.shape} (O, C, kh, kw) and bias '
                             f'{b.shape} (O,) do not fit')
        n, _, h, wd = x.shape
        oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
        if oh < 1 or ow < 1 or kh < 1 or kw < 1:
            raise ValueError(f'Conv2d: a {kh}x{kw} kernel does not fit input {x.shape} with padding {(ph, pw)}')
        x, w, b = prepare(x, w, b)
        relu_ = activation == 'relu'
        y = OP_KERNELS['Conv2d'].forward(x, w.reshape(o, -1), b, kh, kw, sh, sw, ph, pw, relu_, conv_parts())
        if True in context['needs_input_grad']:
            context.update(x=x, w=w, y=y, relu=relu_, geometry=(kh, kw, sh, sw, ph, pw))
        return y

    @staticmethod
    def backward(context, go):
        need_x, need_w, need_b = context['needs_input_grad']
        x, w, y = context['x'], context['w'], context['y']
        gx, gw2, gb = OP_KERNELS['Conv2d'].backward(x, w.reshape(len(w), -1), y, prepare(go, dtype=y.dtype),
                                                    context['relu'], *context['geometry'], need_x, need_w, need_b,
                                                    conv_parts())
        return (gx if need_x else None), (gw2.reshape(w.shape) if need_w else None), (gb if need_b else None)


class MaxPool2dOp(Op):
    """y (N, C, OH, OW): the maximum of each kernel_size window, windows `stride` apart (default
    kernel_size; no padding; OH = (H - kh) // sh + 1, as PyTorch's floor mode). Backward sends each
    window's gradient to its maximum. Ties: the first maximum in the window in row-major order takes the
    whole gradient; a NaN is a window's maximum (both as torch.nn.functional.max_pool2d on the CPU)."""
    edits_goutputs = False

    @staticmethod
    def forward(context, x, *, kernel_size, stride=None):
        (kh, kw), (sh, sw) = pool_geometry(kernel_size, stride)
        _check_4d('MaxPool2d', 'input', x)
        if x.shape[2] < kh or x.shape[3] < kw:
            raise ValueError(f'MaxPool2d: a {kh}x{kw} window does not fit input {x.shape}')
        x = prepare(x)
        y, where = OP_KERNELS['MaxPool2d'].forward(x, kh, kw, sh, sw, conv_parts())
        context['where'], context['hw'] = where, x.shape[2:]
        return y

    @staticmethod
    def backward(context, go):
        where = context['where']
        return OP_KERNELS['MaxPool2d'].backward(where, prepare(go), *context['hw'], conv_parts())


class FlattenOp(Op):
    """x (N, ...) -> (N, prod(...)), as torch.nn.Flatten(); backward reshapes back."""
    edits_goutputs = False

    @staticmethod
    def forward(context, x):
        if x.ndim < 1:
            raise ValueError('Flatten: input must have a first (batch) dimension, got a scalar')
        context['shape'] = x.shape
        return x.reshape(len(x), -1)

    @staticmethod
    def backward(context, go):
        return go.reshape(context['shape'])


# -- functions over nodes
def conv2d(x, w, b, stride=1, padding=0, activation=None):
    """Conv2d over nodes (torch.nn.functional.conv2d's order of arguments; b is required)."""
    return Conv2dOp.do_forward(x, w, b, stride=stride, padding=padding, activation=activation)


def max_pool2d(x, kernel_size, stride=None):
    return MaxPool2dOp.do_forward(x, kernel_size=kernel_size, stride=stride)


def flatten(x):
    return FlattenOp.do_forward(x)


_AFTER = {'sigmoid': sigmoid, 'tanh': tanh, 'relu': relu}


# -- modules
INITS = ('he', 'torch')


def torch_init(layer, rng):
    """Sets a Conv2d's or Linear's weight and bias as PyTorch initialises its layers: uniform in
    +-1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5)), the bias too. In place: a Linear's weight keeps its layout."""
    w, b = layer.w.value, layer.b.value
    bound = 1 / np.sqrt(w[0].size if w.ndim == 4 else w.shape[1])
    w[...] = rng.uniform(-bound, bound, w.shape)
    b[...] = rng.uniform(-bound, bound, b.shape)


class Conv2d(Module):
    """A convolution layer, like Linear: weight `w` (out_channels, in_channels, kh, kw), bias `b` (out_channels,).
    init 'he': w normal with std sqrt(2 / (in_channels kh kw)), b zero; 'torch': as torch.nn.Conv2d (see
    torch_init). `forward(x, activation=None)` fuses relu into the kernel; sigmoid and tanh follow it."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dtype=np.float32, rng=None,
                 init='he'):
        in_channels = _size('Conv2d', 'in_channels', in_channels)
        out_channels = _size('Conv2d', 'out_channels', out_channels)
        kh, kw = _pair('Conv2d', 'kernel_size', kernel_size, 1)
        self.stride, self.padding = conv_geometry(stride, padding)
        dtype = _float_dtype('Conv2d', dtype)
        rng = np.random.default_rng(rng)
        std = np.sqrt(2.0 / (in_channels * kh * kw))
        self.w = TensorNode((rng.standard_normal((out_channels, in_channels, kh, kw)) * std).astype(dtype))
        self.b = TensorNode(np.zeros(out_channels, dtype=dtype))
        if init == 'torch':
            torch_init(self, rng)
        elif init != 'he':
            raise ValueError(f"Conv2d: init must be 'he' or 'torch', not {init!r}")

    def forward(self, x, activation=None):
        if activation in (None, 'identity', 'relu'):
            return conv2d(x, self.w, self.b, self.stride, self.padding, activation)
        if activation not in _AFTER:
            raise ValueError(f'Conv2d: activation must be one of {", ".join(ACTIVATIONS)} or None, not {activation!r}')
        return _AFTER[activation](conv2d(x, self.w, self.b, self.stride, self.padding))

    def extra_repr(self):
        o, c, kh, kw = self.w.shape
        return (f'in_channels={c}, out_channels={o}, kernel_size={(kh, kw)}, stride={self.stride}, '
                f'padding={self.padding}, dtype={self.w.dtype}')


class MaxPool2d(Module):
    """Max-pooling over kernel_size windows, `stride` apart (default kernel_size); see the MaxPool2d op."""

    def __init__(self, kernel_size, stride=None):
        self.kernel_size, self.stride = pool_geometry(kernel_size, stride)

    def forward(self, x):
        return max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self):
        return f'kernel_size={self.kernel_size}, stride={self.stride}'


class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x):
        return flatten(x)


class LeNet(Module):
    """LeNet-5 as it is usually built today, for 1 x 28 x 28 images (MNIST):
    conv 6@5x5 padding 2 -> act -> 2x2 max-pool -> conv 16@5x5 -> act -> 2x2 max-pool -> flatten (400) ->
    dense 120 -> act -> dense 84 -> act -> dense num_classes (logits; use cross_entropy).

    The same network with Sequential (the same parameters, other names):
    Sequential(Conv2d(1, 6, 5, padding=2), relu, MaxPool2d(2), Conv2d(6, 16, 5), relu, MaxPool2d(2),
    Flatten(), Linear(400, 120), relu, Linear(120, 84), relu, Linear(84, 10)).
    init 'torch' (the default): every layer as PyTorch initialises it (see torch_init); on MNIST this reached
    99.1 % in 5 epochs where 'he' (He-normal weights before an activation, Glorot for the output layer, zero
    biases: as MLP) stayed near 98.8 %. image_size: the input's side (28; 32 for the original LeNet)."""

    def __init__(self, num_classes=10, in_channels=1, image_size=28, activation='relu', dtype=np.float32, rng=None,
                 init='torch'):
        if activation not in ACTIVATIONS:
            raise ValueError(f'LeNet: activation must be one of {", ".join(ACTIVATIONS)}, not {activation!r}')
        num_classes = _size('LeNet', 'num_classes', num_classes)
        image_size = _size('LeNet', 'image_size', image_size)
        side = (image_size // 2 - 4) // 2
        if not _is_size(side):
            raise ValueError(f'LeNet: image_size must be at least 12, not {image_size}')
        if init not in INITS:
            raise ValueError(f"LeNet: init must be 'torch' or 'he', not {init!r}")
        rng = np.random.default_rng(rng)
        dense = 'he' if activation == 'relu' else 'glorot'
        self.activation = activation
        self.conv1 = Conv2d(in_channels, 6, 5, padding=2, dtype=dtype, rng=rng, init=init)
        self.conv2 = Conv2d(6, 16, 5, dtype=dtype, rng=rng, init=init)
        self.fc1 = Linear(16 * side * side, 120, dtype=dtype, rng=rng, init=dense)
        self.fc2 = Linear(120, 84, dtype=dtype, rng=rng, init=dense)
        self.fc3 = Linear(84, num_classes, dtype=dtype, rng=rng)
        if init == 'torch':
            for layer in (self.fc1, self.fc2, self.fc3):
                torch_init(layer, rng)

    def forward(self, x):
        act = self.activation
        x = max_pool2d(self.conv1(x, activation=act), 2)
        x = max_pool2d(self.conv2(x, activation=act), 2)
        x = self.fc2(self.fc1(flatten(x), activation=act), activation=act)
        return self.fc3(x)

    def extra_repr(self):
        return f'activation={self.activation!r}'


def warm(dtype=np.float32):
    """Runs the conv kernels once on tiny inputs of dtype (compiles them, or loads them from numba's cache),
    through a LeNet step's calls: the input gradient, relu fused and not, max-pool both ways."""
    from .functions import cross_entropy
    x = TensorNode(np.linspace(0, 1, 2 * 28 * 28, dtype=dtype).reshape(2, 1, 28, 28), requires_grad=False)
    model = LeNet(dtype=dtype, rng=0)
    cross_entropy(model(x), np.array([0, 1])).backward()
    w, b = TensorNode(np.ones((1, 1, 1, 1), dtype)), TensorNode(np.zeros(1, dtype))
    conv2d(TensorNode(np.ones((1, 1, 2, 2), dtype)), w, b).sum().backward()
