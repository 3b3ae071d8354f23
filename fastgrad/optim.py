"""Optimizers with torch.optim's update rules; each update is one in-place numba kernel per parameter."""
import numpy as np

from . import kernels


def _memory_order(a):
    """'C' or 'F' for a contiguous array (C when both, as for 1-D arrays), None otherwise."""
    return 'C' if a.flags.c_contiguous else 'F' if a.flags.f_contiguous else None


class Optimizer:
    hyperparameters = ()

    def __init__(self, params):
        self.params = list(params)
        if not self.params:
            raise ValueError(f'{type(self).__name__}: got an empty parameter list')
        for i, p in enumerate(self.params):
            if not np.issubdtype(p.dtype, np.floating):
                raise ValueError(f'{type(self).__name__}: parameter {i} has dtype {p.dtype}, not floating point')
        self._views = [None] * len(self.params)  # see _param_view

    def zero_grad(self):
        """Drops the gradients (they read as zeros until the next backward), as torch's set_to_none."""
        for p in self.params:
            p.grad = None

    def step(self):
        scalars = {}  # the hyperparameters as scalars of each parameter dtype, looked up once per step
        views = self._views
        for i, p in enumerate(self.params):
            grad = p._grad
            if grad is None:  # a parameter no backward reached is left alone, as in torch
                continue
            view = views[i]
            if view is None or view[0] is not p.value:
                view = views[i] = self._param_view(i)
            value, order, flat, _ = view
            if grad.shape != value.shape:  # the kernels would read past a smaller gradient
                raise ValueError(f'{type(self).__name__}: parameter {i} has shape {value.shape}, its gradient '
                                 f'{grad.shape}')
            dtype = value.dtype
            if dtype not in scalars:
                scalars[dtype] = self._scalars(dtype.type)
            # flat views in memory order (a copy of the gradient only if its dtype or layout differ): the
            # kernels update the parameter and its state in place
            self._update(i, flat, np.asarray(grad, dtype=dtype, order=order).ravel(order), scalars[dtype])

    def _param_view(self, i):
        """(value, memory order, flat view of value, flat views of its state made so far), kept from step to
        step while the parameter keeps its array, so that a step does not redo these checks and views."""
        value = self.params[i].value
        order = _memory_order(value)
        if order is None or not value.flags.writeable:
            raise ValueError(f'{type(self).__name__}: parameter {i} must be a writeable contiguous array')
        return value, order, value.ravel(order), {}

    def _buffer(self, name, i):
        """Per-parameter state: zeros shaped and laid out like the parameter, made at first use; returned
        as a flat view in the parameter's memory order."""
        _, order, _, flat_state = self._views[i]
        flat = flat_state.get(name)
        if flat is None:
            key, value = f'{name}.{i}', self.params[i].value
            buf = self.state.get(key)
            if buf is None:
                buf = self.state[key] = np.zeros_like(value, order=order)
            elif buf.shape != value.shape:  # the parameter was given an array of another shape
                raise ValueError(f'{type(self).__name__}: parameter {i} has shape {value.shape}, its {name} '
                                 f'{buf.shape}')
            elif _memory_order(buf) != order:  # loaded from a checkpoint, which holds C order
                buf = self.state[key] = np.asarray(buf, order=order)
            flat = flat_state[name] = buf.ravel(order)
        return flat

    def state_dict(self):
        """A flat dict of arrays and numbers (savable with np.savez, no pickle)."""
        state = {name: np.asarray(getattr(self, name)) for name in self.hyperparameters}
        state.update({key: buf.copy() for key, buf in self.state.items()})
        return state

    def load_state_dict(self, state):
        for name in self.hyperparameters:
            value = np.asarray(state[name])
            setattr(self, name, tuple(value.tolist()) if value.ndim else value.item())
        loaded = {}
        for key, buf in state.items():
            if key in self.hyperparameters:
                continue
            expected = self._state_shape(key)
            if np.ndim(buf) == 1 and np.size(buf) == np.prod(expected) and len(expected) != 1:
                buf = np.reshape(buf, expected)  # older checkpoints kept flat buffers (C order)
            if np.shape(buf) != expected:
                raise ValueError(f'{type(self).__name__}.load_state_dict: {key} has shape {np.shape(buf)}, '
                                 f'the parameters need {expected}')
            loaded[key] = np.array(buf, dtype=self._state_dtype(key))
        self.state = loaded
        self._views = [None] * len(self.params)  # the state's flat views point at the old buffers

    def _state_shape(self, key):
        name, _, index = key.rpartition('.')
        if not name or not index.isdigit() or int(index) >= len(self.params):
            raise ValueError(f'{type(self).__name__}.load_state_dict: unexpected entry {key!r}')
        return self.params[int(index)].value.shape

    def _state_dtype(self, key):
        return self.params[int(key.rpartition('.')[2])].dtype


class SGD(Optimizer):
    """torch.optim.SGD: d = g + wd p; buf = momentum buf + d; d = d + momentum buf (nesterov) or buf; p -= lr d."""
    hyperparameters = ('lr', 'momentum', 'nesterov', 'weight_decay')

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params)
        if nesterov and momentum <= 0:
            raise ValueError('SGD: nesterov momentum needs momentum > 0')
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.state = {}
        self._scalars_key = None

    def _scalars(self, scalar):
        key = (scalar, self.lr, self.momentum, self.weight_decay, self.nesterov)
        if key != self._scalars_key:  # made again only when a hyperparameter changes (e.g. an lr schedule)
            self._scalars_key = key
            self._scalars_value = scalar(self.lr), scalar(self.momentum), scalar(self.weight_decay), bool(self.nesterov)
        return self._scalars_value

    def _update(self, i, value, grad, scalars):
        buf = self._buffer('momentum_buffer', i) if self.momentum else value[:0]
        kernels.sgd_step(value, grad, buf, *scalars)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient), bias-corrected moments."""
    hyperparameters = ('lr', 'betas', 'eps', 'weight_decay')

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.state = {}

    def _scalars(self, scalar):
        return scalar  # the bias corrections change every step: converted per parameter in _update

    def _update(self, i, value, grad, scalar):
        steps = self.state.setdefault('step', np.zeros(len(self.params), dtype=np.int64))
        steps[i] += 1
        beta1, beta2 = self.betas
        kernels.adam_step(value, grad, self._buffer('exp_avg', i), self._buffer('exp_avg_sq', i),
                          scalar(self.lr / (1 - beta1 ** steps[i])), scalar(beta1), scalar(beta2), scalar(self.eps),
                          scalar(self.weight_decay), scalar(1 / np.sqrt(1 - beta2 ** steps[i])))

    def _state_shape(self, key):
        return (len(self.params),) if key == 'step' else super()._state_shape(key)

    def _state_dtype(self, key):
        return np.int64 if key == 'step' else super()._state_dtype(key)
