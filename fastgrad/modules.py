"""Modules: parameter containers that find their parameters themselves, Linear, MLP, Sequential."""
import numbers
import os

import numpy as np

from .core import TensorNode, tracing
from .files import Member, load_npz, save_npz
from .ops import Linear as LinearOp


class Module:
    """Base class: TensorNode attributes (that require a gradient), sub-Modules and lists of either are
    found as parameters, in the order they were assigned. Calling a module calls `forward`."""

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        if tracing.recorder is not None:
            tracing.recorder.module(self)
        return self.forward(*args, **kwargs)

    def named_nodes(self, prefix=''):
        """Every TensorNode the module holds (as attributes, in sub-modules, in lists or tuples of either), once
        each, in the order they were assigned, named as state_dict names them."""
        found, seen = [], set()

        def visit(name, obj):
            if isinstance(obj, TensorNode):
                if id(obj) not in seen:
                    seen.add(id(obj))
                    found.append((name, obj))
            elif isinstance(obj, Module):
                for sub, node in obj.named_nodes(prefix=name + '.'):
                    visit(sub, node)
            elif isinstance(obj, (list, tuple)):
                for i, item in enumerate(obj):
                    visit(f'{name}.{i}', item)

        for key, value in vars(self).items():
            visit(prefix + key, value)
        return found

    def named_parameters(self, prefix=''):
        """The nodes (named_nodes) that require a gradient."""
        return [(name, node) for name, node in self.named_nodes(prefix) if node.requires_grad]

    def parameters(self):
        return [node for _, node in self.named_parameters()]

    def num_parameters(self):
        """How many numbers the parameters hold (torch: sum(p.numel() for p in model.parameters()))."""
        return sum(node.value.size for node in self.parameters())

    def extra_repr(self):
        """The settings repr shows in this module's first line (torch.nn.Module.extra_repr); a module that
        describes its parameters here (Linear) does not get a line per parameter."""
        return ''

    def __repr__(self):
        """As torch.nn.Module's: the module and its settings, then one indented line per sub-module (and, in
        a module without its own extra_repr, per parameter), named as state_dict names them (layers.0, ...)."""
        own = type(self).extra_repr is Module.extra_repr
        lines = []

        def visit(name, obj):
            if isinstance(obj, Module):
                lines.append(f'({name}): ' + repr(obj).replace('\n', '\n  '))
            elif isinstance(obj, TensorNode):
                if own and obj.requires_grad:
                    lines.append(f'({name}): parameter, shape {obj.shape}, {obj.dtype}')
            elif isinstance(obj, (list, tuple)):
                for i, item in enumerate(obj):
                    visit(f'{name}.{i}', item)
            elif callable(obj) and name.split('.')[0] == 'modules':  # Sequential's functions
                lines.append(f'({name}): {getattr(obj, "__name__", repr(obj))}')

        for key, value in vars(self).items():
            visit(key, value)
        extra = self.extra_repr()
        if not lines:
            return f'{type(self).__name__}({extra})'
        return f'{type(self).__name__}(\n' + ''.join(f'  {line}\n' for line in ([extra] if extra else []) + lines) + ')'

    def state_dict(self):
        return {name: node.value.copy() for name, node in self.named_parameters()}

    def state_spec(self):
        """What a state dict of this module holds, {name: files.Member(shape, kinds)}: load() reads a file
        against it (from the headers, before any data)."""
        return {name: Member(node.shape, 'biuf') for name, node in self.named_parameters()}

    def load_state_dict(self, state):
        """Copies state's arrays into the parameters, in place (optimizers keep pointing at the same arrays).

        Everything is checked before anything is written: the keys, each value's shape, and that its values
        fit the parameter's dtype (no complex, text or values beyond the dtype's range). A failure leaves every
        parameter as it was."""
        name_ = type(self).__name__
        params = dict(self.named_parameters())
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise StateDictError(f'{name_}.load_state_dict: missing {sorted(missing)}, unexpected {sorted(unexpected)}')
        values = {}
        for name, node in params.items():
            try:
                values[name] = fitting(state[name], node.value.dtype, node.shape)
            except ValueError as e:
                raise StateDictError(f'{name_}.load_state_dict: {name} {e}') from None
        for name, node in params.items():
            node.value[...] = values[name]

    def save(self, path):
        """Writes the state dict as .npz, atomically (a temporary file renamed into place)."""
        save_npz(path, self.state_dict())

    def load(self, path):
        """Reads a file save() wrote: the keys, shapes and dtypes are checked from the file's headers before
        any data is read; a damaged or foreign file is a ValueError naming it, and changes nothing."""
        arrays = load_npz(path, self.state_spec())
        try:
            self.load_state_dict(arrays)
        except ValueError as e:
            raise StateDictError(f'{os.fspath(path)}: {e}') from None


class StateDictError(ValueError, KeyError):
    """A state dict that does not fit: a ValueError (and, for code written against the KeyError that a
    missing key raised before, a KeyError)."""
    __str__ = ValueError.__str__


def fitting(value, dtype, shape):
    """value as an array of dtype and shape, if it fits without loss of kind or range; ValueError (saying
    what is wrong, to follow the entry's name) otherwise. Rounding to a float's precision is not a loss
    (PyTorch copies float64 into float32 too); complex to real, text, or a finite value that would
    become infinite is."""
    try:
        value = np.asarray(value)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f'is not an array ({e})') from None
    kind = value.dtype.kind
    if kind == 'c':
        raise ValueError(f'is complex ({value.dtype}): the imaginary part would be lost')
    if kind not in 'biuf':
        raise ValueError(f'holds {value.dtype} values, not numbers')
    if value.shape != tuple(shape):
        raise ValueError(f'has shape {value.shape}, expected {tuple(shape)}')
    with np.errstate(over='ignore', invalid='ignore'):
        cast = value.astype(dtype)
    if dtype.kind == 'f' and kind == 'f' and np.isfinite(cast).sum() != np.isfinite(value).sum():
        raise ValueError(f'holds values outside {np.dtype(dtype).name}\'s range (up to {np.abs(value).max():.3g})')
    if dtype.kind != 'f' and not np.array_equal(cast, value):
        raise ValueError(f'holds values that {np.dtype(dtype).name} cannot represent')
    return cast


class Linear(Module):
    """y = x @ w.T + b, with w of shape (output_size, input_size) and b (1, output_size), as in vugrad.

    init 'glorot' (normal, std sqrt(2 / (in + out))) or 'he' (normal, std sqrt(2 / in), for relu layers);
    the bias starts at zero. `forward(x, activation=None)` can fuse an activation into the same kernel.
    """

    def __init__(self, input_size, output_size, dtype=np.float32, rng=None, init='glorot'):
        input_size, output_size = _size('Linear', 'input_size', input_size), _size('Linear', 'output_size', output_size)
        dtype = _float_dtype('Linear', dtype)
        rng = np.random.default_rng(rng)
        if init == 'glorot':
            std = np.sqrt(2.0 / (input_size + output_size))
        elif init == 'he':
            std = np.sqrt(2.0 / input_size)
        else:
            raise ValueError(f"Linear: init must be 'glorot' or 'he', not {init!r}")
        self.w = TensorNode(LinearOp.weight(rng.standard_normal((output_size, input_size)) * std, dtype))
        self.b = TensorNode(np.zeros((1, output_size), dtype=dtype))

    def forward(self, x, activation=None):
        return LinearOp.do_forward(x, self.w, self.b, activation=activation)

    def extra_repr(self):
        return f'in_features={self.w.shape[1]}, out_features={self.w.shape[0]}, dtype={self.w.dtype}'


ACTIVATIONS = ('sigmoid', 'relu', 'tanh')
DTYPES = ('float32', 'float64')  # what the kernels compute in (float16 has no kernels)


def _is_size(n):
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0


def _size(module, name, n):
    if not _is_size(n):
        raise ValueError(f'{module}: {name} must be a positive integer, not {n!r}')
    return int(n)


def _float_dtype(module, dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f'{module}: dtype must be one of {", ".join(DTYPES)}, not {dtype!r}') from None
    if dtype.name not in DTYPES:
        raise ValueError(f'{module}: dtype {dtype.name} is not supported; use {" or ".join(DTYPES)}')
    return dtype


class MLP(Module):
    """Linear layers with `activation` between them; returns logits (no softmax: use cross_entropy).

    hidden: an int or a list of ints (one per hidden layer); vugrad's hidden_mult=k means hidden = k * input_size.
    init: 'he' or 'glorot' for the layers before an activation; None picks He for relu, Glorot otherwise.
    The output layer is always Glorot.
    """

    def __init__(self, input_size, output_size, hidden=300, activation='relu', dtype=np.float32, rng=None,
                 hidden_mult=None, init=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f'MLP: activation must be one of {", ".join(ACTIVATIONS)}, not {activation!r}')
        input_size, output_size = _size('MLP', 'input_size', input_size), _size('MLP', 'output_size', output_size)
        dtype = _float_dtype('MLP', dtype)
        if hidden_mult is not None:
            hidden = hidden_mult * input_size
        hidden = [hidden] if np.isscalar(hidden) else list(hidden)
        if not all(_is_size(h) for h in hidden):
            raise ValueError(f'MLP: hidden sizes must be positive integers, not {hidden}')
        sizes = [input_size] + [int(h) for h in hidden] + [output_size]
        rng = np.random.default_rng(rng)
        init = init or ('he' if activation == 'relu' else 'glorot')
        self.activation = activation
        self.layers = [Linear(i, o, dtype=dtype, rng=rng, init=init if k < len(sizes) - 2 else 'glorot')
                       for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = layer(x, activation=self.activation)
        return self.layers[-1](x)

    def extra_repr(self):
        return f'activation={self.activation!r}'


class Sequential(Module):
    """Applies its modules (or functions) in order."""

    def __init__(self, *modules):
        self.modules = list(modules)

    def forward(self, x):
        for module in self.modules:
            x = module(x)
        return x
