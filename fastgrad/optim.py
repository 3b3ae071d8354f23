"""Optimizers with torch.optim's update rules, and the learning-rate schedules users reach for first.

As in torch.optim, an optimizer keeps `param_groups` (dicts of 'params' and the hyperparameters, which a
schedule or the user may change between steps; `opt.lr = ...` sets it in every group) and `state[p]`,
each parameter's buffers. An update is one in-place kernel call per parameter over flat views of the
parameter, its gradient and its buffers in the parameter's own memory order.

To add an optimizer: its update loop and rule code in kernels/optim.py, a subclass here with `defaults`
and `_update`, and its name in fastgrad/__init__.py.
"""
import math
import weakref
from typing import NamedTuple

import numpy as np

from . import backend
from .core import tracing
from .kernels import RULES


def _memory_order(a):
    """'C' or 'F' for a contiguous array (C when both, as for 1-D arrays), None otherwise."""
    return 'C' if a.flags.c_contiguous else 'F' if a.flags.f_contiguous else None


class FlatParam(NamedTuple):
    """A parameter's array as the kernels update it; kept from step to step while the parameter keeps
    its array, so that a step does not redo the checks and views."""
    value: np.ndarray  # the parameter's array
    order: str         # its memory order, 'C' or 'F'
    flat: np.ndarray   # value.ravel(order), a view
    state: dict        # buffer name -> (state[p][name], its flat view), remade when state[p][name] changes
    empty: np.ndarray  # flat[:0], passed for a state the update rule does not use

def _number(value):
    """A finite real number from a Python/numpy scalar or a 0-d array (not bool, text or a sequence)."""
    value = np.asarray(value)
    if value.shape != () or value.dtype.kind not in 'iuf':
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _at_least_zero(value):
    value = _number(value)
    return value if value is not None and value >= 0 else None


def _flag(value):
    value = np.asarray(value)
    return bool(value) if value.shape == () and value.dtype.kind == 'b' else None


def _betas(value):
    if isinstance(value, (str, bytes)):
        return None
    value = np.asarray(value, dtype=object if not isinstance(value, np.ndarray) else None)
    if value.shape != (2,):
        return None
    betas = tuple(_number(b) for b in value)
    return betas if all(b is not None and 0 <= b < 1 for b in betas) else None


class Rule(NamedTuple):
    check: object  # value -> the value as the optimizer keeps it, or None when it does not qualify
    says: str      # what the value must be, for the error


HYPERPARAMETERS = {
    'lr': Rule(_at_least_zero, 'a finite number >= 0'),
    'momentum': Rule(_at_least_zero, 'a finite number >= 0'),
    'weight_decay': Rule(_at_least_zero, 'a finite number >= 0'),
    'eps': Rule(_at_least_zero, 'a finite number >= 0'),
    'nesterov': Rule(_flag, 'True or False'),
    'betas': Rule(_betas, 'two numbers in [0, 1)'),
}


class Optimizer:
    """Base class. `defaults`: each hyperparameter and its default (None: the user must give it)."""
    defaults = {}
    instances = weakref.WeakSet()  # every live optimizer: fastgrad.compile notes their param_groups before a trace

    def __init__(self, params, hyperparameters):
        name = type(self).__name__
        params = list(params)
        if not params:
            raise ValueError(f'{name}: got an empty parameter list')
        object.__setattr__(self, 'param_groups', [])
        Optimizer.instances.add(self)
        self.state = {}
        self._flat = {}
        for group in (params if isinstance(params[0], dict) else [{'params': params}]):
            self.add_param_group(dict(hyperparameters, **group))

    def add_param_group(self, group):
        """Adds a dict with 'params' and any hyperparameters (the rest from the optimizer's own)."""
        name = type(self).__name__
        group = dict(group)
        group['params'] = list(group['params'])
        for key in group:
            if key != 'params' and key not in self.defaults and key != 'initial_lr':
                raise ValueError(f'{name}: unknown hyperparameter {key!r}; it takes {", ".join(self.defaults)}')
        for key, default in self.defaults.items():
            group.setdefault(key, self.param_groups[0][key] if self.param_groups else default)
            if group[key] is None:
                raise ValueError(f'{name}: {key} is required')
            group[key] = self._checked(key, group[key], name)
        known = set(self.params)
        for p in group['params']:
            if not np.issubdtype(p.dtype, np.floating):
                raise ValueError(f'{name}: parameter {len(known)} has dtype {p.dtype}, not floating point')
            if p in known:
                raise ValueError(f'{name}: a parameter appears twice')
            known.add(p)
        self.param_groups.append(group)

    @property
    def params(self):
        return [p for group in self.param_groups for p in group['params']]

    # opt.lr reads the first group's; opt.lr = x sets every group's (what a one-group user expects)
    def __getattr__(self, key):
        groups = self.__dict__.get('param_groups')
        if groups and key in type(self).defaults:
            return groups[0][key]
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {key!r}')

    def __setattr__(self, key, value):
        if key in type(self).defaults and 'param_groups' in self.__dict__:
            for group in self.param_groups:
                group[key] = value
        else:
            object.__setattr__(self, key, value)

    def zero_grad(self):
        """Drops the gradients (they read as zeros until the next backward), as torch's set_to_none."""
        if tracing.recorder is not None:
            tracing.recorder.zero_grad(self.params)
        for group in self.param_groups:
            for p in group['params']:
                p.grad = None

    def step(self):
        if tracing.recorder is not None:
            tracing.recorder.step(self)
        for group in self.param_groups:
            scalars = self._group_scalars(group)
            for p in group['params']:
                grad = p.grad_if_any
                if grad is None:  # a parameter no backward reached is left alone, as in torch
                    continue
                flat = self._flat_param(p)
                value = flat.value
                if grad.shape != value.shape:  # the kernels would read past a smaller gradient
                    raise ValueError(f'{type(self).__name__}: parameter {self._index(p)} has shape {value.shape}, '
                                     f'its gradient {grad.shape}')
                # a copy of the gradient only if its dtype or layout differ from the parameter's
                self._update(p, flat, np.asarray(grad, dtype=value.dtype, order=flat.order).ravel(flat.order), group,
                             scalars)

    def _index(self, p):
        return next(i for i, q in enumerate(self.params) if q is p)

    def _flatten(self, p):
        value = p.value
        order = _memory_order(value)
        if order is None or not value.flags.writeable:
            raise ValueError(f'{type(self).__name__}: parameter {self._index(p)} must be a writeable contiguous array')
        flat = value.ravel(order)
        return FlatParam(value, order, flat, {}, flat[:0])

    def _flat_param(self, p):
        flat = self._flat.get(p)
        if flat is None or flat.value is not p.value or not flat.value.flags.writeable:
            flat = self._flat[p] = self._flatten(p)
        return flat

    def flat_buffer(self, p, name):
        """state[p][name] as the flat view an update kernel writes (made at first use), for code that runs
        the update itself: fastgrad.compile's steps."""
        return self._buffer(p, self._flat_param(p), name)

    def _buffer(self, p, flat, name):
        """state[p][name]: zeros shaped and laid out like the parameter, made at first use (also after the
        state was cleared); returned as a flat view in the parameter's memory order."""
        state = self.state.setdefault(p, {})
        buf = state.get(name)
        cached = flat.state.get(name)
        if cached is not None and cached[0] is buf:
            return cached[1]
        if buf is None:
            buf = state[name] = np.zeros_like(flat.value, order=flat.order)
        elif buf.shape != flat.value.shape:  # the parameter was given an array of another shape
            raise ValueError(f'{type(self).__name__}: parameter {self._index(p)} has shape {flat.value.shape}, '
                             f'its {name} {buf.shape}')
        elif _memory_order(buf) != flat.order:  # loaded from a checkpoint, which holds C order
            buf = state[name] = np.asarray(buf, order=flat.order)
        view = buf.ravel(flat.order)
        flat.state[name] = (buf, view)
        return view

    # -- state dicts: flat dicts of arrays (savable with np.savez, no pickle). One group's hyperparameters
    # under their own names, several groups' as param_groups.<g>.<name>; buffers as <name>.<parameter
    # index>; a number per parameter (Adam's step) as one array over the parameters under its name.
    def _hyperparameter_keys(self):
        several = len(self.param_groups) > 1
        return [(group, name, f'param_groups.{g}.{name}' if several else name)
                for g, group in enumerate(self.param_groups) for name in self.defaults]

    def state_dict(self):
        state = {key: np.asarray(group[name]) for group, name, key in self._hyperparameter_keys()}
        params = self.params
        for i, p in enumerate(params):
            for name, value in self.state.get(p, {}).items():
                if isinstance(value, np.ndarray):
                    state[f'{name}.{i}'] = value.copy()
                else:
                    state.setdefault(name, np.zeros(len(params), dtype=np.asarray(value).dtype))[i] = value
        return state

    # what each hyperparameter must be (torch.optim's own checks), and the state a parameter may have
    buffers = ()   # names of arrays shaped like the parameter, in state[p]
    nonnegative_buffers = ()  # those of them that are never negative
    counters = ()  # names of whole numbers per parameter (Adam's step), one array over the parameters

    @classmethod
    def _checked(cls, name, value, where, key=None):
        """value as the hyperparameter `name` takes it (Python numbers); ValueError naming it (as `key`,
        its state dict entry, when given) otherwise."""
        rule = HYPERPARAMETERS[name]
        try:
            checked = rule.check(value)
        except (TypeError, ValueError, OverflowError):
            checked = None
        if checked is None:
            shown = value.tolist() if isinstance(value, np.ndarray) else value
            raise ValueError(f'{where}: {key or name} must be {rule.says}, not {shown!r}')
        return checked

    def state_spec(self):
        """What state_dict() holds once every parameter has taken a step, {key: files.Member}: a checkpoint
        is read against it from its headers, before any data."""
        from .files import Member
        spec = {key: Member((2,) if name == 'betas' else (), 'b' if name == 'nesterov' else 'biuf')
                for _, name, key in self._hyperparameter_keys()}
        params = self.params
        for name in self._buffer_names():
            spec.update({f'{name}.{i}': Member(p.shape, 'biuf') for i, p in enumerate(params)})
        spec.update({name: Member((len(params),), 'biuf') for name in self.counters})
        return spec

    def _buffer_names(self):
        """The buffers a step makes with the current hyperparameters (SGD's only with momentum)."""
        return self.buffers

    def load_state_dict(self, state):
        """Restores hyperparameters and per-parameter state from a state_dict().

        Every entry is checked before anything changes (a failure leaves the optimizer as it was): each
        hyperparameter's type, shape, finiteness and range; each buffer's name, parameter index, shape,
        finiteness and range, and that its values fit the parameter's dtype; and that a parameter's state is
        whole (Adam: a step count > 0 with both moments, or none of them). As in torch, a parameter may have
        no state at all (no step has reached it yet)."""
        from .modules import fitting
        cls = type(self).__name__
        where = f'{cls}.load_state_dict'
        hyper = self._hyperparameter_keys()
        groups = [{} for _ in self.param_groups]
        index = {id(group): g for g, group in enumerate(self.param_groups)}
        for group, name, key in hyper:
            if key not in state:
                raise ValueError(f'{where}: {key} is missing')
            value = np.asarray(state[key])
            if value.dtype.kind not in 'biuf':  # text, objects: no number to read
                shown = value.tolist()
                raise ValueError(f'{where}: {key} must be {HYPERPARAMETERS[name].says}, not {shown!r}')
            groups[index[id(group)]][name] = self._checked(name, value, where, key)
        for g, new in enumerate(groups):
            if 'nesterov' in new and new['nesterov'] and new['momentum'] <= 0:
                raise ValueError(f'{where}: nesterov momentum needs momentum > 0 (group {g})')
        params = self.params
        loaded = {p: {} for p in params}
        hyper_keys = {key for _, _, key in hyper}
        for key, buf in state.items():
            if key in hyper_keys:
                continue
            if key in self.counters:
                counts = np.asarray(buf)
                if counts.dtype.kind not in 'biuf' or counts.shape != (len(params),):
                    raise ValueError(f'{where}: {key} must be {len(params)} whole numbers >= 0 (one per parameter), '
                                     f'not {counts.dtype} of shape {counts.shape}')
                if not np.all(np.isfinite(counts)) or not np.all(counts == np.round(counts)):
                    raise ValueError(f'{where}: {key} must hold whole numbers >= 0, not {counts.tolist()}')
                if np.any(counts < 0):
                    raise ValueError(f'{where}: {key} must hold whole numbers >= 0, not {counts.tolist()}')
                for p, value in zip(params, counts.tolist()):
                    if value:
                        loaded[p][key] = int(value)
                continue
            name, _, i = key.rpartition('.')
            if name not in self.buffers or not i.isdigit() or str(int(i)) != i or int(i) >= len(params):
                raise ValueError(f'{where}: unexpected entry {key!r}; {cls} keeps '
                                 f'{", ".join(self.buffers + self.counters) or "no state"}'
                                 f' for {len(params)} parameters')
            p = params[int(i)]
            if np.ndim(buf) == 1 and np.size(buf) == p.value.size and p.value.ndim != 1:
                buf = np.reshape(buf, p.value.shape)  # older checkpoints kept flat buffers (C order)
            try:
                value = fitting(buf, p.dtype, p.value.shape)
            except ValueError as e:
                raise ValueError(f'{where}: {key} {e}'.replace('expected', 'the parameter has')) from None
            if not np.all(np.isfinite(value)):
                raise ValueError(f'{where}: {key} holds values that are not finite')
            if name in self.nonnegative_buffers and np.any(value < 0):
                raise ValueError(f'{where}: {key} must be >= 0 everywhere (a running mean of squares)')
            loaded[p][name] = np.array(value, dtype=p.dtype)  # our own copy, never the caller's array
        for i, p in enumerate(params):
            names = set(loaded[p])
            if names and self.counters and names != set(self.buffers + self.counters):
                def shown(names):
                    return ', '.join(sorted(f'{n}.{i}' if n in self.buffers else f'{n}[{i}] > 0' for n in names))
                raise ValueError(f'{where}: parameter {i} has partial state: {shown(names)} without '
                                 f'{shown(set(self.buffers + self.counters) - names)}')
        # everything is checked: from here on nothing can fail
        for group, new in zip(self.param_groups, groups):
            group.update(new)
        self.state = {p: s for p, s in loaded.items() if s}
        self._flat = {}  # the flat views point at the old buffers
        if hasattr(self, '_scalars'):
            self._scalars = {}

    def _group_scalars(self, group):
        """What every update of the group's parameters in this step shares (None: nothing)."""
        return None

    def _update(self, p, flat, grad, group, scalars):
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: d = g + wd p; buf = momentum buf + d; d = d + momentum buf (nesterov) or buf; p -= lr d."""
    defaults = {'lr': None, 'momentum': 0.0, 'nesterov': False, 'weight_decay': 0.0}

    buffers = ('momentum_buffer',)

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))
        if any(group['nesterov'] and group['momentum'] <= 0 for group in self.param_groups):
            raise ValueError('SGD: nesterov momentum needs momentum > 0')
        self._scalars = {}  # id(group) -> (its hyperparameters, {dtype: the kernel's rule and scalars})

    def _buffer_names(self):
        return self.buffers if any(group['momentum'] for group in self.param_groups) else ()

    def _group_scalars(self, group):
        """{dtype: (rule, scalars)}, made again only when one of the group's hyperparameters changes."""
        hyper = group['lr'], group['momentum'], group['weight_decay'], group['nesterov']
        cached = self._scalars.get(id(group))
        if cached is None or cached[0] != hyper:
            cached = self._scalars[id(group)] = hyper, {}
        return cached[1]

    def _update(self, p, flat, grad, group, scalars):
        dtype = flat.value.dtype
        made = scalars.get(dtype)
        if made is None:
            made = scalars[dtype] = (RULES['nesterov'] if group['nesterov'] else RULES['sgd'],
                                     np.array([group['lr'], group['momentum'], group['weight_decay'], 0, 0, 0], dtype))
        rule, values = made
        buf = self._buffer(p, flat, 'momentum_buffer') if group['momentum'] else flat.empty
        backend.update(rule, flat.flat, grad, buf, flat.empty, values)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient), bias-corrected moments."""
    defaults = {'lr': 1e-3, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 0.0}
    buffers = ('exp_avg', 'exp_avg_sq')
    nonnegative_buffers = ('exp_avg_sq',)
    counters = ('step',)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, p, flat, grad, group, scalars):
        state = self.state.setdefault(p, {})
        step = state['step'] = state.get('step', 0) + 1
        beta1, beta2 = group['betas']
        # the bias corrections change every step: made here
        values = np.array([group['lr'] / (1 - beta1 ** step), beta1, beta2, group['eps'], group['weight_decay'],
                           1 / math.sqrt(1 - beta2 ** step)], flat.value.dtype)
        backend.update(RULES['adam'], flat.flat, grad, self._buffer(p, flat, 'exp_avg'),
                       self._buffer(p, flat, 'exp_avg_sq'), values)


# -- learning-rate schedules
def _positive_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'{owner}: {name} must be a positive integer, not {value!r}')
    return int(value)


class LRScheduler:
    """Sets each group's lr from its initial lr and the epoch, as torch.optim.lr_scheduler does: make it
    after the optimizer (that sets the lr of epoch 0) and call step() once at the end of every epoch."""

    def __init__(self, optimizer, last_epoch=-1):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault('initial_lr', group['lr'])
        self.base_lrs = [group['initial_lr'] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, base_lr, epoch):
        raise NotImplementedError

    def step(self):
        if tracing.recorder is not None:
            tracing.recorder.hyperparameter(f'steps a learning-rate schedule ({type(self).__name__})')
        self.last_epoch += 1
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group['lr'] = self.lr_at(base_lr, self.last_epoch)

    def get_last_lr(self):
        return [group['lr'] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {'last_epoch': self.last_epoch}

    def load_state_dict(self, state):
        self.last_epoch = int(state['last_epoch']) - 1
        self.step()


class StepLR(LRScheduler):
    """torch's StepLR: lr = initial lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size, self.gamma = _positive_int('StepLR', 'step_size', step_size), gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """torch's CosineAnnealingLR: lr = eta_min + (initial lr - eta_min) (1 + cos(pi epoch / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max, self.eta_min = _positive_int('CosineAnnealingLR', 'T_max', T_max), eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
