"""Modules: parameter containers that find their parameters themselves, Linear, MLP, Sequential."""
import numpy as np

from .core import TensorNode
from .files import load_npz, save_npz
from .ops import Linear as LinearOp


class Module:
    """Base class: TensorNode attributes (that require a gradient), sub-Modules and lists of either are
    found as parameters, in the order they were assigned. Calling a module calls `forward`."""

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_parameters(self, prefix=''):
        found, seen = [], set()

        def visit(name, obj):
            if isinstance(obj, TensorNode):
                if obj.requires_grad and id(obj) not in seen:
                    seen.add(id(obj))
                    found.append((name, obj))
            elif isinstance(obj, Module):
                for sub, node in obj.named_parameters(prefix=name + '.'):
                    visit(sub, node)
            elif isinstance(obj, (list, tuple)):
                for i, item in enumerate(obj):
                    visit(f'{name}.{i}', item)

        for key, value in vars(self).items():
            visit(prefix + key, value)
        return found

    def parameters(self):
        return [node for _, node in self.named_parameters()]

    def state_dict(self):
        return {name: node.value.copy() for name, node in self.named_parameters()}

    def load_state_dict(self, state):
        params = dict(self.named_parameters())
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise KeyError(f'{type(self).__name__}.load_state_dict: missing {sorted(missing)}, '
                           f'unexpected {sorted(unexpected)}')
        for name, node in params.items():
            value = np.asarray(state[name])
            if value.shape != node.shape:
                raise ValueError(f'{type(self).__name__}.load_state_dict: {name} has shape {value.shape}, '
                                 f'the module expects {node.shape}')
        for name, node in params.items():
            node.value[...] = state[name]  # in place: optimizers keep pointing at the same arrays

    def save(self, path):
        """Writes the state dict as .npz, atomically (a temporary file renamed into place)."""
        save_npz(path, self.state_dict())

    def load(self, path):
        self.load_state_dict(load_npz(path))


class Linear(Module):
    """y = x @ w.T + b, with w of shape (output_size, input_size) and b (1, output_size), as in vugrad.

    init 'glorot' (normal, std sqrt(2 / (in + out))) or 'he' (normal, std sqrt(2 / in), for relu layers);
    the bias starts at zero. `forward(x, activation=None)` can fuse an activation into the same kernel.
    """

    def __init__(self, input_size, output_size, dtype=np.float32, rng=None, init='glorot'):
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


ACTIVATIONS = ('sigmoid', 'relu', 'tanh')


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
        if hidden_mult is not None:
            hidden = hidden_mult * input_size
        sizes = [input_size] + ([hidden] if np.isscalar(hidden) else list(hidden)) + [output_size]
        rng = np.random.default_rng(rng)
        init = init or ('he' if activation == 'relu' else 'glorot')
        self.activation = activation
        self.layers = [Linear(i, o, dtype=dtype, rng=rng, init=init if k < len(sizes) - 2 else 'glorot')
                       for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = layer(x, activation=self.activation)
        return self.layers[-1](x)


class Sequential(Module):
    """Applies its modules (or functions) in order."""

    def __init__(self, *modules):
        self.modules = list(modules)

    def forward(self, x):
        for module in self.modules:
            x = module(x)
        return x
