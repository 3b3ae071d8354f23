"""fastgrad.compile: a training step traced once, then run as one call into numba.

The first call of a compiled step runs it eagerly while a recorder notes every built-in op applied, every
backward(), zero_grad() and optimizer step(). From that record the step is written out as the source of one
numba function: forward, backward and the optimizer updates, calling the same kernels the eager ops call,
with every shape known at trace time written in as a constant; small dense layers are written out as loops
instead (LOOP_MAX_WEIGHT). The source goes to a cache folder and is imported from there, so numba's cache
serves the next process too. The traced run is then undone (parameters and optimizer state put back in
place) and the compiled function takes that first step as it takes every later one, so no result depends
on which call traced. Later calls with arrays of the same shapes and dtypes run that function; a new shape
or dtype traces again and is kept beside the first.

What a compiled step captures, and what it reads anew on every call:
- parameters (nodes that require a gradient) by identity: their current arrays are passed in on every
  call, so a parameter given a new array of the same shape, dtype and layout is used as it is; one of
  another shape, dtype or layout makes the step trace again;
- the optimizer's hyperparameters (lr, momentum, ... of each group) are read on every call, so a schedule
  or `opt.lr = x` takes effect (nesterov too); switching momentum on or off traces again; its state
  buffers are read from `optimizer.state` on every call (a loaded state dict is used);
- the step's arguments; data nodes must hold an argument's array itself (`TensorNode(xb)`); a module's
  nodes that need no gradient (a frozen layer) are passed in like parameters; any other constant array
  that is not a single number is refused at trace time (it would be frozen);
- what else the step's Python read at trace time (Program.guard: requires_grad, the optimizers' groups, the
  attributes of the modules called, the step function's closure and globals, single-number literals) is
  checked on every call, and a change traces again;
- Python control flow runs at trace time only, as in jax.jit: values computed from the batch in Python
  inside the step are fixed at trace time; pass arrays in as arguments instead;
- choices that depend on the data (the sparse-input path, taken per batch by its density) are made inside
  the compiled code on every call;
- thread counts are the backend's at each call, as the eager ops ask for them (backend.conv_parts only for a
  step with conv or pooling ops: under 'auto' it hands the cores to numba, as an eager convolution does).
After a compiled call, each parameter's `.grad` holds that call's gradient, as after an eager step (or
None where the step ends with zero_grad()); under compile(fn, keep_grads=False) every parameter's gradient
is left cleared, as zero_grad() leaves it. Values that do not outlive a call live in scratch buffers made
once per traced program (so one compiled step must not run in two threads at once); what a call returns
and leaves in `.grad` is its own. An op without a compiled form (a user-defined Op, whose
forward and backward are Python) makes the trace raise a TypeError that names it.
"""
import atexit
import builtins
import collections
import dis
import hashlib
import operator
import os
import shutil
import stat
import sys
import tempfile
import time
import types

import numba
import numpy as np

from . import backend, kernels, ops
from .conv import Conv2dOp, FlattenOp, MaxPool2dOp, conv_geometry, pool_geometry
from .core import TensorNode, tracing
from .kernels.batch import indices_within
from .kernels.jit import CACHE_LINE, SOURCE_HASH
from .kernels.linear import (SPARSE_MAX_DENSITY, SPARSE_MIN_SIZE, SAMPLE_ROWS, cache_line_rows,
                             cache_line_width, sparse_block)
from .kernels.softmax import LOG_PRODUCT_MAX
from .optim import SGD, Adam, Optimizer

__all__ = ['compile', 'CompiledStep']

# status codes the generated function returns first
OK, BAD_TARGET = 0, 1
ERROR_VALUES = 'ERROR_VALUES'  # where the generated step returns early: replaced by placeholder results and grads


class Recorder:
    """What one eager run of the step did, in program order."""

    def __init__(self):
        self.events = []  # ('op', cls, inputs, constants, context, outputs) | ('backward', root) | ...
        self.first_values = {}  # id(leaf) -> (leaf node, its value when first used): parameters and data
        self.states = {}  # id(optimizer) -> (optimizer, {parameter: its state before the first step()})
        # every optimizer's param_groups before the step: (optimizer, comparable, the objects and their contents)
        self.groups = [(opt, _hyperparameters(opt), _group_contents(opt)) for opt in list(Optimizer.instances)]
        self.modules = {}  # id(module) -> each Module called in the step

    def remember(self, inputs):
        for node in inputs:
            if node.source is None and id(node) not in self.first_values:
                self.first_values[id(node)] = (node, np.array(node.value))

    def op(self, cls, inputs, constants, context, outputs):
        self.remember(inputs)
        self.events.append(('op', cls, tuple(inputs), dict(constants), context, tuple(outputs)))

    def backward(self, root):
        self.events.append(('backward', root))

    def zero_grad(self, nodes):
        self.events.append(('zero_grad', list(nodes)))

    def step(self, optimizer):
        self.remember(optimizer.params)  # their values before the update, for undo (a step may come first)
        if id(optimizer) not in self.states:  # its state before its first step
            self.states[id(optimizer)] = (optimizer, {
                p: {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in optimizer.state[p].items()}
                for p in optimizer.params if p in optimizer.state})
        self.events.append(('step', optimizer))

    def module(self, module):
        self.modules.setdefault(id(module), module)

    def hyperparameter(self, what):
        """The step changes an optimizer's hyperparameters through an object with state of its own (a schedule:
        called before it changes anything, which undo() would not put back)."""
        raise TraceError(f'fastgrad.compile: the step {what}; a compiled step reads the hyperparameters at each '
                         f'call and would not change them: do that outside the step, between calls')

    def changed_hyperparameters(self):
        """Refuses a step that changed an optimizer's param_groups (a hyperparameter or which parameters a
        group holds); undo() puts them back."""
        for optimizer, before, _ in self.groups:
            if _hyperparameters(optimizer) != before:
                raise TraceError("fastgrad.compile: the step changes an optimizer's param_groups; a compiled step "
                                 'reads them at each call and would not change them: do that outside the step, '
                                 'between calls')

    def undo(self):
        """Puts back as they were before the traced run the optimizers' param_groups (when the step changed them),
        the leaves the step used (the parameters it stepped, any other it changed) and the optimizers' state:
        the same objects, arrays written in place, so that every reference to them stays valid."""
        for optimizer, before, (groups, contents) in self.groups:
            if _hyperparameters(optimizer) != before:  # refused by changed_hyperparameters: the same objects back
                optimizer.__dict__['param_groups'] = groups
                groups[:] = [group for group, _, _, _ in contents]
                for group, settings, params, items in contents:
                    group.clear()
                    group.update(settings)
                    params[:] = items
                    group['params'] = params
        for node, first in self.first_values.values():  # leaves a step changed (refused unless stepped)
            value = node.value
            if isinstance(value, np.ndarray) and value.flags.writeable and value.shape == first.shape:
                np.copyto(value, first)
        for optimizer, before in self.states.values():
            for p in optimizer.params:
                state, old = optimizer.state.get(p, {}), before.get(p, {})
                for name in list(state):
                    if isinstance(state[name], np.ndarray):
                        np.copyto(state[name], old[name] if name in old else 0)
                    elif name in old:
                        state[name] = old[name]
                    else:
                        del state[name]


def _group_contents(optimizer):
    """optimizer.param_groups as undo() puts it back: the list, and per group the dict, its settings, its list
    of parameters and that list's items."""
    return optimizer.param_groups, [(group, dict(group), group['params'], list(group['params']))
                                    for group in optimizer.param_groups]


def _hyperparameters(optimizer):
    """Each group's settings, its parameters included (by identity), as comparable values."""
    return [{k: (tuple(map(id, v)) if k == 'params' else v) for k, v in group.items()}
            for group in optimizer.param_groups]


class TraceError(TypeError):
    """The step does something a compiled step cannot do faithfully; the message says what."""


# -- code generation
def _dtype_name(dtype):
    return f'np.{np.dtype(dtype).name}'


def _literal(value, dtype):
    return f'{_dtype_name(dtype)}({float(value)!r})'


class Var:
    """A value of the traced program: its name in the generated code, shape and dtype (shape () is a scalar)."""

    def __init__(self, name, shape, dtype, contiguous=True):
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        self.contiguous = contiguous  # C-contiguous (or a scalar)
        self.transposed = False       # a parameter passed in as its transpose (see Generator.storage)
        self.storage_of = None        # a gradient available in its parameter's storage layout as storage_name
        self.by_feature = None        # a 2-D value also held transposed, (features, rows), C-contiguous: that name
        self.scratch = False          # lives in a scratch buffer that the next call overwrites: copied if returned
        self.fusable = None           # a sparse weight gradient its update may take row by row (fused_gradient)

    @property
    def scalar(self):
        return self.shape == ()


class Generator:
    """Writes the generated function's body from a Recorder's events."""

    def __init__(self, args, recorder, fuse_updates=False):
        self.lines = []
        self.prologue = []            # lines before the step's first: checks that must come before any update
        self.fuse_updates = fuse_updates  # no gradient is returned, so updates may consume them unwritten
        self.fused = 0                # updates fused into a weight-gradient kernel
        self.event = 0            # the position in the recorder's events of the one being written out
        self.counter = 0
        self.vars = {}            # id(node) -> Var
        self.nodes = {}           # id(node) -> node, so that ids stay valid while we generate
        self.args = args          # the step's argument arrays
        self.params = []          # nodes passed in as parameters, in order
        self.param_vars = {}      # id(node) -> Var of its storage view
        self.constants = {}       # global name -> array
        self.optimizers = []      # optimizers stepped, in order
        self.state_args = []      # (optimizer, param, state name) passed in as buffers (flat, or 2-D rows)
        self.state_index = {}     # (id(optimizer), id(param), name) -> position in state_args
        self.row_states = set()   # positions in state_args of buffers passed 2-D, as rows (fused updates')
        self.row_params = set()   # ids of fused weights that a compiled epoch may pad, with their row_states
        # id(node) -> how many ops of the step read it (before or after it is stepped)
        self.op_uses = collections.Counter(id(node) for event in recorder.events if event[0] == 'op' for node in event[2])
        self.grads = {}           # id(param) -> Var of its gradient so far (None: zero)
        self.saved = {}           # id(op output) -> what its op's backward needs from the forward
        self.recorder = recorder
        self.sparse_layers = 0
        self.conv_ops = 0         # convolutions and max-poolings: the step then takes conv_parts threads
        self.loop_layers = 0      # small dense layers written out as loops (see LOOP_MAX_WEIGHT)
        self.scratch_specs = []   # (shape, dtype) of each scratch buffer W0, W1, ... the step is passed
        self.hyper = {}           # (optimizer, group, dtype) -> name of its SGD hyperparameter array
        self.literals = []        # data nodes of one number written in as literals (Program.guard watches them)
        # ids of the nodes the step's modules hold (a frozen layer's are passed in like parameters)
        self.frozen = {id(node) for module in recorder.modules.values() for _, node in module.named_nodes()}

    # names and lines
    def fresh(self, prefix='v'):
        self.counter += 1
        return f'{prefix}{self.counter}'

    def emit(self, line):
        self.lines.append('    ' + line)

    def new(self, expr, shape, dtype, prefix='v', contiguous=True):
        var = Var(self.fresh(prefix), shape, dtype, contiguous)
        self.emit(f'{var.name} = {expr}')
        return var

    # leaves
    def var(self, node):
        var = self.vars.get(id(node))
        if var is None:
            var = self._leaf(node)
            self.vars[id(node)] = var
            self.nodes[id(node)] = node
        return var

    def _leaf(self, node):
        value = node.value
        for i, arg in enumerate(self.args):
            if value is arg:
                return Var(f'a{i}', value.shape, value.dtype)
        if node.requires_grad or id(node) in self.frozen and value.size > 1:
            # a parameter, or a module's node that needs no gradient (a frozen layer): passed in every call
            if value.dtype.kind != 'f':
                raise TraceError(f'fastgrad.compile: a parameter of dtype {value.dtype} (floating point only)')
            k = len(self.params)
            self.params.append(node)
            # F-ordered parameters (the Linear op's weights) are passed transposed, C-contiguous
            name = f'p{k}'
            var = Var(name, value.shape, value.dtype)
            var.transposed = _storage_transposed(value)
            self.param_vars[id(node)] = var
            return var
        self.literals.append(node)
        return self._constant(value, 'a data node')

    def _constant(self, value, what):
        value = np.asarray(value)
        if value.size != 1:
            raise TraceError(
                f'fastgrad.compile: {what} holds an array of shape {value.shape} that is neither one of the '
                f"step's arguments nor a parameter; a compiled step would keep it as it is now. Pass it in as "
                f'an argument (fn(x, y, this)), or wrap the argument itself: TensorNode(x)')
        if value.dtype.kind not in 'fiub':
            raise TraceError(f'fastgrad.compile: {what} has dtype {value.dtype}')
        dtype = value.dtype if value.dtype.kind == 'f' else np.dtype(np.float64)
        if value.ndim == 0:
            return Var(_literal(value, dtype), (), dtype)
        name = f'C{len(self.constants)}'
        self.constants[name] = np.array(value, dtype=dtype)
        return Var(name, value.shape, dtype)

    def integers(self, name, prologue=False):
        """An int64 C-contiguous array expression for the integer argument `name` (made in the prologue, before
        any update, when `prologue`)."""
        arg = self.args[int(name[1:])] if name.startswith('a') and name[1:].isdigit() else None
        if arg is not None and arg.dtype == np.int64:
            return name
        expr = f'np.ascontiguousarray({name}).astype(np.int64)'
        if prologue:
            t = self.fresh('t')
            self.prologue.append(f'    {t} = {expr}')
            return t
        return self.new(expr, np.shape(arg), np.int64, prefix='t').name

    def check_indices(self, name, bound):
        """A prologue check that every entry of the integer array `name` lies in [0, bound): a call with one that
        does not returns BAD_TARGET before anything runs."""
        r = self.fresh('r')
        self.prologue += [f'    for {r} in range({name}.shape[0]):',
                          f'        if {name}[{r}] < 0 or {name}[{r}] >= {bound}:',
                          f'            return {BAD_TARGET}, took_sparse, {ERROR_VALUES}']

    def argument(self, array, what):
        """The name of the argument that `array` is, for constants such as targets."""
        for i, arg in enumerate(self.args):
            if array is arg:
                return f'a{i}'
        array = np.asarray(array)
        if array.size == 1 and array.ndim == 0:
            return repr(array.item())
        raise TraceError(f"fastgrad.compile: {what} is an array that is not one of the step's arguments; a compiled "
                         f'step would keep it as it is now. Pass it in as an argument')

    def storage(self, var, dtype=None):
        """An expression for var's array, C-contiguous and of `dtype` (a parameter stored transposed is
        un-transposed; copies only where the layout or dtype must change)."""
        if var.transposed:
            expr = f'np.ascontiguousarray({var.name}.T)'
        elif not var.contiguous:
            expr = f'np.ascontiguousarray({var.name})'
        else:
            expr = var.name
        if dtype is not None and np.dtype(dtype) != var.dtype:
            expr = f'{expr}.astype({_dtype_name(dtype)})'
        return expr

    def scratch(self, shape, dtype):
        """The name of a new scratch buffer: an array of this shape and dtype made once per traced program and
        passed to every call, for values that do not outlive a call."""
        self.scratch_specs.append((tuple(shape), np.dtype(dtype)))
        return f'W{len(self.scratch_specs) - 1}'

    def filled(self, values, dtype):
        """The name of a scratch buffer that gets the expressions `values`, one an entry (a small array that a
        call fills instead of allocating, as an update's hyperparameters)."""
        name = self.scratch((len(values),), dtype)
        self.emit(', '.join(f'{name}[{i}]' for i in range(len(values))) + ' = ' + ', '.join(values))
        return name

    def by_feature(self, var, dtype):
        """The name of var's 2-D value transposed, (features, rows), C-contiguous, of `dtype`."""
        if var.by_feature is not None and np.dtype(dtype) == var.dtype:
            return var.by_feature
        if var.transposed and np.dtype(dtype) == var.dtype:
            return var.name  # a parameter passed in as its transpose
        rows, features = var.shape
        xt = self.scratch((features, rows), dtype)
        self.emit(f'for f in range({features}):')
        self.emit(f'    for r in range({rows}):')
        self.emit(f'        {xt}[f, r] = {var.name}[f, r]' if var.transposed else f'        {xt}[f, r] = {var.name}[r, f]')
        return xt

    def weight_t(self, var, dtype=None):
        """An expression for var.T, C-contiguous (free for a parameter stored transposed)."""
        expr = var.name if var.transposed else f'np.ascontiguousarray({var.name}.T)'
        if dtype is not None and np.dtype(dtype) != var.dtype:
            expr = f'{expr}.astype({_dtype_name(dtype)})'
        return expr

    # the program
    def run(self, result):
        for self.event, event in enumerate(self.recorder.events):
            kind = event[0]
            if kind == 'op':
                self.forward(*event[1:])
            elif kind == 'backward':
                self.backward_from(event[1])
            elif kind == 'zero_grad':
                for node in event[1]:
                    if id(node) in self.param_vars or node.requires_grad and node.source is None:
                        self.grads[id(node)] = None
            elif kind == 'step':
                self.optimizer_step(event[1])
        return [self.var(node) for node in result]

    def forward(self, cls, inputs, constants, context, outputs):
        emitter = EMITTERS.get(cls)
        if emitter is None:
            supported = ', '.join(sorted(c.__name__ for c in EMITTERS))
            raise TraceError(f'fastgrad.compile: the op {cls.__name__} has no compiled form (a compiled step '
                             f'runs the built-in ops: {supported}); run this step eagerly')
        if len(outputs) != 1:
            raise TraceError(f'fastgrad.compile: {cls.__name__} has {len(outputs)} outputs')
        ins = [self.var(node) for node in inputs]
        out = outputs[0]
        var, saved = emitter.forward(self, ins, constants, context, out.value)
        self.vars[id(out)] = var
        self.nodes[id(out)] = out
        self.saved[id(out)] = (cls, inputs, constants, context, ins, var, saved)

    def backward_from(self, root):
        """Gradients from root down to every parameter, in reverse order of the ops (a reverse topological
        order); each parameter's gradient accumulates as backward() accumulates it."""
        if root.value.size != 1:
            raise TraceError('fastgrad.compile: backward() from a node that is not a single number')
        rvar = self.var(root)
        pending = {id(root): Var(_literal(1, _grad_dtype(root.value)), (), _grad_dtype(root.value))
                   if rvar.scalar else self.new(f'np.ones({rvar.shape}, {_dtype_name(rvar.dtype)})', rvar.shape, rvar.dtype)}
        events = self.recorder.events
        upto = next(i for i, e in enumerate(events) if e[0] == 'backward' and e[1] is root)
        for event in reversed(events[:upto]):
            if event[0] != 'op':
                continue
            out = event[5][0]
            g = pending.pop(id(out), None)
            if g is None:
                continue
            cls, inputs, constants, context, ins, var, saved = self.saved[id(out)]
            needs = context['needs_input_grad']
            ginputs = EMITTERS[cls].backward(self, ins, constants, needs, var, saved, g)
            for node, ivar, need, gi in zip(inputs, ins, needs, ginputs):
                if gi is None or not need or not node.requires_grad:
                    continue
                gi = self.reduce_to(gi, ivar)
                previous = pending.get(id(node))
                pending[id(node)] = gi if previous is None else self.add(previous, gi)
        for key, g in pending.items():
            if key in self.param_vars:
                if key not in self.grads:
                    if not self.zeroed_later(key, upto):
                        raise TraceError('fastgrad.compile: backward() adds to a gradient left from before the step '
                                         '(no zero_grad() in the step); call opt.zero_grad() in the step')
                    self.grads[key] = None  # the previous call ended by zeroing it
                previous = self.grads[key]
                self.grads[key] = g if previous is None else self.add(previous, g)

    def zeroed_later(self, key, after):
        """Whether a zero_grad() after event `after` resets the node with id `key`."""
        return any(e[0] == 'zero_grad' and any(id(n) == key for n in e[1]) for e in self.recorder.events[after:])

    def operand(self, var):
        """var's value in an elementwise expression (a parameter passed in transposed is read through .T)."""
        return f'{var.name}.T' if var.transposed else var.name

    def elementwise(self, expr, shape, dtype, *operands):
        """A new array from an elementwise expression of the operands: C-contiguous only when each array
        operand is (on transposed views, such as a small layer's values, numba's result is laid out as they are)."""
        contiguous = all(o.scalar or (o.contiguous and not o.transposed) for o in operands)
        return self.new(expr, shape, dtype, contiguous=contiguous)

    def add(self, a, b):
        return self.elementwise(f'{self.operand(a)} + {self.operand(b)}', np.broadcast_shapes(a.shape, b.shape),
                                np.result_type(a.dtype, b.dtype), a, b)

    def reduce_to(self, g, like):
        """g summed back to like's shape (undoing broadcasting), in like's dtype."""
        shape = like.shape
        if g.shape != shape:
            if shape == ():
                g = self.new(f'np.sum({g.name})', (), g.dtype)
            elif g.scalar:
                g = self.new(f'np.full({shape}, {g.name})', shape, g.dtype)
            else:
                expr, cur = g.name, list(g.shape)
                extra = len(cur) - len(shape)
                axes = list(range(extra)) + [extra + i for i, s in enumerate(shape) if s == 1 and cur[extra + i] != 1]
                for axis in reversed(axes):
                    expr = f'np.sum({expr}, axis={axis})'
                g = self.new(f'np.ascontiguousarray({expr}).reshape({shape})', shape, g.dtype)
        want = _grad_dtype(np.empty(0, like.dtype))
        if g.dtype != want:
            expr = f'{_dtype_name(want)}({g.name})' if g.scalar else f'{g.name}.astype({_dtype_name(want)})'
            g = self.elementwise(expr, shape, want, g)
        return g

    def optimizer_step(self, optimizer):
        if type(optimizer) not in (SGD, Adam):
            raise TraceError(f'fastgrad.compile: the optimizer {type(optimizer).__name__} has no compiled form '
                             f'(SGD and Adam have)')
        if optimizer not in self.optimizers:
            self.optimizers.append(optimizer)
        o = self.optimizers.index(optimizer)
        backward_later = any(e[0] == 'backward' for e in self.recorder.events[self.event:])
        for gi, group in enumerate(optimizer.param_groups):
            for p in group['params']:
                if id(p) not in self.grads and backward_later:
                    raise TraceError('fastgrad.compile: opt.step() comes before backward() in the step, so eagerly it '
                                     "would step on the gradient the previous call left; a compiled step's gradients "
                                     'are its own: call backward() before step()')
                g = self.grads.get(id(p))
                if g is None:
                    continue  # no gradient: left alone, as eager does
                pvar = self.var(p)
                dtype = _dtype_name(pvar.dtype)
                # a fused update takes the weight and its state as 2-D rows (which a compiled epoch may pad),
                # other updates flat arrays
                fused = self.fused_gradient(g, p)
                rows = fused is not None
                if rows and self.op_uses[id(p)] == 1:  # read by its own layer alone: run() may pad it
                    self.row_params.add(id(p))
                p_arg = pvar.name if rows else f'_flat({pvar.name})'
                unused = f'np.empty(({p.value.shape[-1]}, 0), {dtype})' if rows else f'{p_arg}[:0]'  # rows of w.T
                g_arg = self.stored_grad(g, pvar) if rows else self.flat_grad(g, pvar)
                h = f'H{o}[{gi}]'
                size = p.value.size
                if isinstance(optimizer, SGD):
                    if group['momentum']:
                        buf = self.state_arg(optimizer, p, 'momentum_buffer', rows)
                    else:
                        buf = unused
                    key = (o, gi, dtype)
                    if key not in self.hyper:  # one array per group and dtype, filled once a step
                        self.hyper[key] = self.filled((f'{dtype}({h}[0])', f'{dtype}({h}[1])', f'{dtype}({h}[2])',
                                                       f'{dtype}(0)', f'{dtype}(0)', f'{dtype}(0)'), pvar.dtype)
                    rule = f'np.int64({kernels.RULES["nesterov"]} if {h}[3] else {kernels.RULES["sgd"]})'
                    state = f'{buf}, {unused}, {self.hyper[key]}'
                else:
                    m, v = (self.state_arg(optimizer, p, name, rows) for name in ('exp_avg', 'exp_avg_sq'))
                    k = self.state_index[id(optimizer), id(p), 'step']
                    self.emit(f'S{k}[0] += 1')
                    # the step as a float: numba raises a float to an integer power by repeated squaring, an ulp
                    # off the libm pow that Python's beta ** step (the eager update's bias corrections) calls
                    t = f'np.float64(S{k}[0])'
                    hyper = self.filled((f'{dtype}({h}[0] / (1 - {h}[1] ** {t}))', f'{dtype}({h}[1])',
                                         f'{dtype}({h}[2])', f'{dtype}({h}[3])', f'{dtype}({h}[4])',
                                         f'{dtype}(1 / np.sqrt(1 - {h}[2] ** {t}))'), pvar.dtype)
                    rule = f'np.int64({kernels.RULES["adam"]})'
                    state = f'{m}, {v}, {hyper}'
                indent = ''
                if rows:  # the sparse branch updates row by row as it sums them; the dense one after
                    rewrites, sparse, operands = fused
                    for line, text in rewrites.items():
                        self.lines[line] = '    ' + text
                    self.emit(f'if {sparse}:')
                    self.emit(f'    _sparse_weight_grad_update({operands}, {rule}, {p_arg}, {state})')
                    self.emit('else:')
                    indent = '    '
                threaded, serial = ('update_rows', 'apply_rows') if rows else ('update_parallel', 'apply_update')
                if size >= backend.PARALLEL_MIN_SIZE:
                    self.emit(f'{indent}if numba_parts > 1:')
                    self.emit(f'{indent}    {threaded}({rule}, {p_arg}, {g_arg}, {state}, numba_parts)')
                    self.emit(f'{indent}else:')
                    self.emit(f'{indent}    {serial}({rule}, {p_arg}, {g_arg}, {state})')
                else:
                    self.emit(f'{indent}{serial}({rule}, {p_arg}, {g_arg}, {state})')

    def fused_gradient(self, g, p):
        """For a step that returns no gradients (keep_grads=False): where p's gradient g is a sparse weight
        gradient that this update alone consumes, ({line: its new text} for the lines that compute it, the name
        of its sparse-path flag, its kernel's operands); the update then takes the rows as they are summed and
        the weight gradient is not computed.
        None otherwise: p stepped twice, or a later backward() before p's gradient is zeroed (it might add to
        that gradient)."""
        if not self.fuse_updates or g.fusable is None:
            return None
        events = self.recorder.events
        if sum(1 for e in events if e[0] == 'step' and any(q is p for q in e[1].params)) != 1:
            return None
        for e in events[self.event + 1:]:
            if e[0] == 'zero_grad' and any(q is p for q in e[1]):
                break
            if e[0] == 'backward':
                return None
        self.fused += 1
        return g.fusable

    def state_arg(self, optimizer, p, name, rows=False):
        """The name of the argument that passes optimizer.state[p][name] (Adam's step count comes with its
        moments), flat or (rows) shaped as p's storage. Keyed by identity."""
        key = (id(optimizer), id(p), name)
        if key not in self.state_index:
            self.state_index[key] = len(self.state_args)
            self.state_args.append((optimizer, p, name))
            if rows:
                self.row_states.add(self.state_index[key])
            if isinstance(optimizer, Adam):
                self.state_arg(optimizer, p, 'step')
        return f'S{self.state_index[key]}'

    def stored_grad(self, g, pvar, returned=False):
        """g as a C-contiguous array in the layout of pvar's storage (its transpose for a transposed one);
        `returned`: never in a scratch buffer."""
        if g.storage_of is pvar:  # already in the storage layout (the Linear op's weight)
            expr = g.storage_name
        elif pvar.transposed:
            expr = f'np.ascontiguousarray({g.name}.T)'
        else:
            expr = g.name if g.contiguous else f'np.ascontiguousarray({g.name})'
        return f'{expr}.copy()' if returned and g.scratch else expr

    def flat_grad(self, g, pvar):
        """g as a flat C-contiguous array in the memory order of pvar's storage."""
        return f'_flat({self.stored_grad(g, pvar)})'


def _grad_dtype(value):
    return value.dtype if value.dtype.kind == 'f' else np.dtype(np.float64)


def _storage_transposed(value):
    return value.ndim == 2 and not value.flags.c_contiguous and value.flags.f_contiguous


# -- each op's compiled form: forward(gen, ins, constants, context, value) -> (Var, saved) and
# backward(gen, ins, constants, needs, out, saved, g) -> one gradient Var (or None) per input
class Emitter:
    def __init__(self, forward, backward):
        self.forward, self.backward = forward, backward


def _arith(symbol, grads):
    def forward(gen, ins, constants, context, value):
        a, b = ins
        return gen.elementwise(f'{gen.operand(a)} {symbol} {gen.operand(b)}', value.shape, value.dtype, a, b), None

    def backward(gen, ins, constants, needs, out, saved, g):
        return grads(gen, ins, needs, out, g)
    return Emitter(forward, backward)


def _add_grads(gen, ins, needs, out, g):
    return g, g


def _sub_grads(gen, ins, needs, out, g):
    return g, (gen.elementwise(f'-{g.name}', g.shape, g.dtype, g) if needs[1] else None)


def _mul_grads(gen, ins, needs, out, g):
    a, b = ins
    x, y = gen.operand(a), gen.operand(b)
    return (gen.elementwise(f'{g.name} * {y}', out.shape, out.dtype, g, b) if needs[0] else None,
            gen.elementwise(f'{g.name} * {x}', out.shape, out.dtype, g, a) if needs[1] else None)


def _div_grads(gen, ins, needs, out, g):
    a, b = ins
    x, y = gen.operand(a), gen.operand(b)
    return (gen.elementwise(f'{g.name} / {y}', out.shape, out.dtype, g, b) if needs[0] else None,
            gen.elementwise(f'-{g.name} * {x} / ({y} * {y})', out.shape, out.dtype, g, a, b) if needs[1] else None)


def _matmul_forward(gen, ins, constants, context, value):
    a, b = ins
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise TraceError('fastgrad.compile: MatrixMultiply of arrays that are not 2-D')
    return gen.new(f'_matmul({gen.storage(a, value.dtype)}, {gen.storage(b, value.dtype)})', value.shape, value.dtype), None


def _matmul_backward(gen, ins, constants, needs, out, saved, g):
    a, b = ins
    ga = gen.new(f'_matmul({g.name}, {gen.weight_t(b, out.dtype)})', a.shape, out.dtype) if needs[0] else None
    gb = gen.new(f'_matmul({gen.weight_t(a, out.dtype)}, {g.name})', b.shape, out.dtype) if needs[1] else None
    return ga, gb


def _batchmm_forward(gen, ins, constants, context, value):
    matrix, vectors = ins
    return gen.new(f'_matmul({gen.storage(vectors, value.dtype)}, {gen.weight_t(matrix, value.dtype)})',
                   value.shape, value.dtype), None


def _batchmm_backward(gen, ins, constants, needs, out, saved, g):
    matrix, vectors = ins
    gm = gen.new(f'_matmul(np.ascontiguousarray({g.name}.T), {gen.storage(vectors, out.dtype)})',
                 matrix.shape, out.dtype) if needs[0] else None
    gv = gen.new(f'_matmul({g.name}, {gen.storage(matrix, out.dtype)})', vectors.shape, out.dtype) if needs[1] else None
    return gm, gv


def _linear_forward(gen, ins, constants, context, value):
    x, w, b = ins
    code = kernels.ACTIVATION_CODES[constants.get('activation')]
    n = x.shape[0]
    sparse = not context['needs_input_grad'][0] and x.shape[0] * x.shape[1] >= SPARSE_MIN_SIZE
    if not sparse and w.shape[0] * w.shape[1] <= LOOP_MAX_WEIGHT:
        return _loop_linear_forward(gen, x, w, b, code, value)
    xs = gen.new(gen.storage(x, value.dtype), x.shape, value.dtype)
    wt = gen.new(gen.weight_t(w, value.dtype), (w.shape[1], w.shape[0]), value.dtype, prefix='wt')
    bf = gen.new(f'_flat({gen.storage(b, value.dtype)})', (w.shape[0],), value.dtype)
    y, cols, count, sp = gen.fresh('y'), gen.fresh('cols'), gen.fresh('count'), gen.fresh('sparse')
    relu = code == kernels.RELU
    # the sparse path as eager takes it: an input that needs no gradient, big and sparse enough
    if sparse:
        gen.sparse_layers += 1
        block = sparse_block(w.shape[1], w.shape[0], np.dtype(value.dtype).itemsize)
        gen.emit(f'{sp} = sparse_parts > 0 and _nonzero_share({xs.name}, {min(SAMPLE_ROWS, n)}) <= {SPARSE_MAX_DENSITY}')
        gen.emit(f'if {sp}:')
        gen.emit(f'    took_sparse = True')
        gen.emit(f'    {y}, {cols}, {count} = _sparse_affine({xs.name}, {wt.name}, {bf.name}, {relu}, sparse_parts, {block})')
        gen.emit('else:')
        # a weight passed in with padded rows (Program.padded) is unpadded for the dense kernels
        gen.emit(f'    {wt.name} = _first_columns({wt.name}, {w.shape[0]})')
        gen.emit(f'    {y} = _affine({xs.name}, {wt.name}, {bf.name}, {relu})')
        gen.emit(f'    {cols}, {count} = np.empty((0, 0, 0), np.int32), np.empty((0, 0), np.int64)')
    else:
        sp = cols = count = None
        gen.emit(f'{y} = _affine({xs.name}, {wt.name}, {bf.name}, {relu})')
    if code in (kernels.SIGMOID, kernels.TANH):
        gen.emit(f'_activate_loop({y}, {y}, {code})')
    return Var(y, value.shape, value.dtype), (xs, wt, code, cols, count, sp)


def _linear_backward(gen, ins, constants, needs, out, saved, g):
    if saved[0] == 'loops':
        return _loop_linear_backward(gen, ins, needs, out, saved, g)
    x, w, b = ins
    xs, wt, code, cols, count, sp = saved
    need_x, need_w, need_b = needs
    gx, gwt, gb, gz = gen.fresh('gx'), gen.fresh('gwt'), gen.fresh('gb'), gen.fresh('gz')
    if not g.contiguous:
        g = gen.new(gen.storage(g), g.shape, g.dtype)
    # the two products on two threads where eager runs them so (backend.numba_parts)
    parts = 'numba_parts' if x.shape[0] * w.shape[0] * w.shape[1] >= backend.PARALLEL_MIN_SIZE else 1
    dense = (f'{gx}, {gwt}, {gb} = _dense_backward({xs.name}, {wt.name}, {out.name}, {g.name}, {code}, {need_x}, '
             f'{parts})')
    if sp is None:
        gen.emit(dense)
    else:
        gen.emit(f'if {sp}:')
        gz_line = len(gen.lines)
        gen.emit(f'    {gz}, {gb} = _act_bias_grad({out.name}, {g.name}, {code})')
        gen.emit(f'    {gwt} = _sparse_weight_grad({xs.name}, {cols}, {count}, {gz})')
        gen.emit(f'    {gx} = _matmul({gz}, {wt.name}.T) if {need_x} else {g.name}[:0, :0].copy()')
        gen.emit('else:')
        gen.emit('    ' + dense)
    gxv = Var(gx, x.shape, out.dtype) if need_x else None
    gwv = None
    if need_w:
        gwv = gen.new(f'{gwt}.T', w.shape, out.dtype, prefix='gw', contiguous=False)
        if w.transposed:
            gwv.storage_of, gwv.storage_name = w, gwt
            if sp is not None and out.dtype == w.dtype:
                # fused, gz is made in rows of whole cache lines and the weight gradient is not made at all
                m = w.shape[0]
                rewrites = {gz_line: f'    {gz}, {gb} = _act_bias_grad_rows({out.name}, {g.name}, {code})',
                            gz_line + 1: f'    {gwt} = np.empty((0, 0), {_dtype_name(out.dtype)})'}
                gwv.fusable = (rewrites, sp, f'{xs.name}, {cols}, {count}, {gz}, {m}')
    gbv = _bias_grad(gen, gb, b, out.dtype) if need_b else None
    return gxv, gwv, gbv


# -- small dense layers as loops. A layer whose weight has at most LOOP_MAX_WEIGHT entries (the synth MLPs,
# 2-8-2) spends its time in the calls of a BLAS kernel, not in arithmetic: it is written out as loops with its
# shapes as constants, on values held transposed, (features, rows), so that every inner loop runs over the
# rows of the batch and vectorises. Its input, output and gradients then stay transposed from layer to layer
# and into the cross-entropy after it (Var.by_feature). The step is compiled with fastmath 'reassoc' and
# 'contract' so that the sums over the batch vectorise too: such a step agrees with eager to rounding (the
# README says how closely), not bit for bit.
LOOP_MAX_WEIGHT = 256
LOOP_FASTMATH = {'reassoc', 'contract'}


def _loop_linear_forward(gen, x, w, b, code, value):
    rows, (outs, ins) = x.shape[0], w.shape
    gen.loop_layers += 1
    xt = gen.by_feature(x, value.dtype)
    wt = gen.new(gen.weight_t(w, value.dtype), (ins, outs), value.dtype, prefix='wt')
    bf = gen.new(f'_flat({gen.storage(b, value.dtype)})', (outs,), value.dtype)
    zt = gen.scratch((outs, rows), value.dtype)
    gen.emit(f'for j in range({outs}):')
    gen.emit(f'    bj = {bf.name}[j]')
    gen.emit(f'    for r in range({rows}):')
    gen.emit(f'        {zt}[j, r] = bj')
    # the last input's products and the activation in one loop: a relu of zt in place would store only the
    # entries it changes, which LLVM makes a masked store (see kernels.activate_loop)
    last = ins - 1 if code != kernels.IDENTITY and ins > 0 else ins
    gen.emit(f'    for f in range({last}):')
    gen.emit(f'        wfj = {wt.name}[f, j]')
    gen.emit(f'        for r in range({rows}):')
    gen.emit(f'            {zt}[j, r] += wfj * {xt}[f, r]')
    if last < ins:
        gen.emit(f'    wfj = {wt.name}[{last}, j]')
        gen.emit(f'    for r in range({rows}):')
        gen.emit(f'        {zt}[j, r] = _activate({zt}[j, r] + wfj * {xt}[{last}, r], {code})')
    elif code != kernels.IDENTITY:
        gen.emit(f'    for r in range({rows}):')
        gen.emit(f'        {zt}[j, r] = _activate(bj, {code})')
    return _transposed_var(zt, value.shape, value.dtype), ('loops', xt, wt, zt, code)


def _transposed_var(name, shape, dtype):
    """The value whose transpose is the scratch buffer `name`."""
    var = Var(f'{name}.T', shape, dtype, contiguous=False)
    var.by_feature, var.scratch = name, True
    return var


def _bias_grad(gen, gb, b, dtype):
    """The gradient of the bias b from its flat array gb, in b's shape: a view made by indexing where it can be
    (numba's reshape calls a C helper)."""
    if len(b.shape) == 1:
        expr = gb
    elif len(b.shape) == 2 and b.shape[0] == 1:
        expr = f'{gb}[None, :]'
    else:
        expr = f'{gb}.reshape({b.shape})'
    return gen.new(expr, b.shape, dtype)


def _loop_linear_backward(gen, ins, needs, out, saved, g):
    x, w, b = ins
    _, xt, wt, zt, code = saved
    need_x, need_w, need_b = needs
    rows, (outs, n_in) = x.shape[0], w.shape
    dtype = _dtype_name(out.dtype)
    gt = gen.by_feature(g, out.dtype)
    derivative = code != kernels.IDENTITY
    gz = gen.scratch((outs, rows), out.dtype) if derivative else gt
    gb, gwt = gen.scratch((outs,), out.dtype), gen.scratch((n_in, outs), out.dtype)
    gen.emit(f'for j in range({outs}):')
    gen.emit('    s = 0.0')  # in float64, as kernels.act_bias_grad
    gen.emit(f'    for r in range({rows}):')
    if derivative:
        gen.emit(f'        v = {gt}[j, r] * _act_derivative({zt}[j, r], {code})')
        gen.emit(f'        {gz}[j, r] = v')
        gen.emit('        s += v')
    else:
        gen.emit(f'        s += {gt}[j, r]')
    gen.emit(f'    {gb}[j] = s')
    gwv = None
    if need_w:
        gen.emit(f'for f in range({n_in}):')
        gen.emit(f'    for j in range({outs}):')
        gen.emit(f'        s = {dtype}(0)')
        gen.emit(f'        for r in range({rows}):')
        gen.emit(f'            s += {xt}[f, r] * {gz}[j, r]')
        gen.emit(f'        {gwt}[f, j] = s')
        gwv = gen.new(f'{gwt}.T', w.shape, out.dtype, prefix='gw', contiguous=False)
        gwv.scratch = True
        if w.transposed:
            gwv.storage_of, gwv.storage_name = w, gwt
    gxv = None
    if need_x:
        gxt = gen.scratch((n_in, rows), out.dtype)
        gen.emit(f'for f in range({n_in}):')
        gen.emit(f'    for r in range({rows}):')
        gen.emit(f'        {gxt}[f, r] = {wt.name}[f, 0] * {gz}[0, r]')
        gen.emit(f'    for j in range(1, {outs}):')
        gen.emit(f'        wfj = {wt.name}[f, j]')
        gen.emit(f'        for r in range({rows}):')
        gen.emit(f'            {gxt}[f, r] += wfj * {gz}[j, r]')
        gxv = _transposed_var(gxt, x.shape, out.dtype)
    gbv = None
    if need_b:
        gbv = _bias_grad(gen, gb, b, out.dtype)
        gbv.scratch = True
    return gxv, gwv, gbv


def _cross_entropy_forward(gen, ins, constants, context, value):
    (logits,) = ins
    if constants.get('reduction', 'mean') not in ('mean', 'sum'):
        raise TraceError('fastgrad.compile: CrossEntropy reduction must be mean or sum')
    targets = gen.argument(constants['targets'], 'CrossEntropy targets')
    total, probs, bad = gen.fresh('total'), gen.fresh('probs'), gen.fresh('bad')
    t = gen.integers(targets)
    transposed = logits.by_feature is not None and logits.dtype == value.dtype
    if transposed:
        probs = _loop_cross_entropy(gen, logits, t, total, bad)
    else:
        gen.emit(f'{total}, {probs}, {bad} = _cross_entropy_forward({gen.storage(logits, value.dtype)}, {t})')
    gen.emit(f'if {bad} >= 0:')
    gen.emit(f'    return {BAD_TARGET}, took_sparse, {ERROR_VALUES}')
    if gen.optimizers and targets.startswith('a'):
        # a loss after an update: its targets are checked before anything runs, so that a bad one returns before
        # any update (the call then runs the step eagerly, which updates and raises where eager does)
        gen.check_indices(gen.integers(targets, prologue=True), logits.shape[1])
    scale = f'{1.0 / max(logits.shape[0], 1)!r}' if constants.get('reduction', 'mean') == 'mean' else '1.0'
    loss = gen.new(f'{_dtype_name(value.dtype)}({total} * {scale})', (), value.dtype, prefix='loss')
    return loss, (probs, t, scale, transposed)


def _cross_entropy_backward(gen, ins, constants, needs, out, saved, g):
    probs, t, scale, transposed = saved
    if not transposed:
        return (gen.new(f'_cross_entropy_backward({probs}, {t}, np.float64({g.name}) * {scale})', ins[0].shape,
                        out.dtype),)
    rows, classes = ins[0].shape
    gt, sc = gen.scratch((classes, rows), out.dtype), gen.fresh('sc')
    gen.emit(f'{sc} = np.float64({g.name}) * {scale}')
    gen.emit(f'for c in range({classes}):')
    gen.emit(f'    for r in range({rows}):')
    gen.emit(f'        {gt}[c, r] = {probs}[c, r] * {sc}')
    gen.emit(f'for r in range({rows}):')
    gen.emit(f'    {gt}[{t}[r], r] -= {sc}')
    return (_transposed_var(gt, ins[0].shape, out.dtype),)


def _loop_cross_entropy(gen, logits, t, total, bad):
    """kernels.cross_entropy_forward written out for transposed logits; returns the name of the transposed
    probabilities."""
    rows, classes = logits.shape
    zt = logits.by_feature
    probs, sums = gen.scratch((classes, rows), logits.dtype), gen.scratch((rows,), np.float64)
    gen.emit(f'{bad} = -1')
    gen.emit(f'for r in range({rows}):')
    gen.emit(f'    if {t}[r] < 0 or {t}[r] >= {classes}:')
    gen.emit(f'        {bad} = r')
    gen.emit('        break')
    gen.emit(f'{total} = 0.0')
    gen.emit(f'if {bad} < 0:')
    gen.emit('    product = 1.0')
    gen.emit(f'    for r in range({rows}):')
    gen.emit(f'        mx = {zt}[0, r]')
    gen.emit(f'        for c in range(1, {classes}):')
    gen.emit(f'            if {zt}[c, r] > mx:')
    gen.emit(f'                mx = {zt}[c, r]')
    gen.emit('        s = 0.0')
    gen.emit(f'        for c in range({classes}):')
    gen.emit(f'            e = np.exp({zt}[c, r] - mx)')
    gen.emit(f'            {probs}[c, r] = e')
    gen.emit('            s += e')
    gen.emit(f'        {sums}[r] = s')
    gen.emit(f'        {total} += np.float64(mx) - {zt}[{t}[r], r]')
    gen.emit('        product *= s')
    gen.emit(f'        if product > {LOG_PRODUCT_MAX!r}:')
    gen.emit(f'            {total} += np.log(product)')
    gen.emit('            product = 1.0')
    gen.emit(f'    {total} += np.log(product)')
    # the divisions in a loop of their own, over the rows: it vectorises (the loop above calls libm's exp)
    gen.emit(f'    for c in range({classes}):')
    gen.emit(f'        for r in range({rows}):')
    gen.emit(f'            {probs}[c, r] = {probs}[c, r] / {sums}[r]')
    return probs


def _activation(code):
    def forward(gen, ins, constants, context, value):
        (x,) = ins
        src = gen.new(gen.storage(x, value.dtype), value.shape, value.dtype)
        y = gen.new(f'np.empty_like({src.name})', value.shape, value.dtype, prefix='y')
        gen.emit(f'_activate_loop({src.name}, {y.name}, {code})')  # not in place: see activate_loop
        return y, None

    def backward(gen, ins, constants, needs, out, saved, g):
        return (gen.new(f'_activation_backward(_flat({out.name}), _flat(np.ascontiguousarray({g.name})), '
                        f'{code}).reshape({out.shape})', out.shape, out.dtype),)
    return Emitter(forward, backward)


def _rows_check(x, op):
    if len(x.shape) != 2:
        raise TraceError(f'fastgrad.compile: {op} of an array that is not 2-D')


def _softmax_forward(gen, ins, constants, context, value):
    _rows_check(ins[0], 'Softmax')
    return gen.new(f'_softmax(np.ascontiguousarray({gen.storage(ins[0])}))', value.shape, value.dtype, prefix='y'), None


def _softmax_backward(gen, ins, constants, needs, out, saved, g):
    y = out.name
    s = gen.new(f'np.sum({g.name} * {y}, axis=1).reshape(({out.shape[0]}, 1))', (out.shape[0], 1), out.dtype)
    return (gen.new(f'{y} * ({g.name} - {s.name})', out.shape, out.dtype),)


def _log_softmax_forward(gen, ins, constants, context, value):
    _rows_check(ins[0], 'LogSoftmax')
    return gen.new(f'_log_softmax(np.ascontiguousarray({gen.storage(ins[0])}))', value.shape, value.dtype, prefix='lp'), None


def _log_softmax_backward(gen, ins, constants, needs, out, saved, g):
    return (gen.new(f'_log_softmax_backward({out.name}, np.ascontiguousarray({g.name}))', out.shape, out.dtype),)


def _sum_forward(gen, ins, constants, context, value):
    (x,) = ins
    axis = constants.get('axis')
    if constants.get('keepdims'):
        raise TraceError('fastgrad.compile: Sum with keepdims')
    if axis is None:
        return gen.new(f'np.sum({gen.operand(x)})', (), value.dtype), None
    if not isinstance(axis, int):
        raise TraceError('fastgrad.compile: Sum over several axes')
    return gen.new(f'np.sum({gen.operand(x)}, axis={axis % len(x.shape)})', value.shape, value.dtype), None


def _sum_backward(gen, ins, constants, needs, out, saved, g):
    (x,) = ins
    axis = constants.get('axis')
    if axis is None:
        return (gen.new(f'np.full({x.shape}, {g.name})', x.shape, g.dtype),)
    axis %= len(x.shape)
    kept = tuple(1 if i == axis else s for i, s in enumerate(x.shape))
    return (gen.new(f'np.ascontiguousarray({g.name}).reshape({kept}) + np.zeros({x.shape}, {_dtype_name(g.dtype)})',
                    x.shape, g.dtype),)


def _select_forward(gen, ins, constants, context, value):
    (x,) = ins
    idx = gen.argument(constants['indices'], 'Select indices')
    # indices out of range would read and write outside the arrays: checked before anything runs (a bad one
    # returns, and the call then runs the step eagerly, which raises where eager does)
    gen.check_indices(idx, x.shape[1])
    out = gen.fresh('sel')
    gen.emit(f'{out} = np.empty({value.shape}, {_dtype_name(value.dtype)})')
    gen.emit(f'for i in range({value.shape[0]}):')
    gen.emit(f'    {out}[i] = {gen.operand(x)}[i, {idx}[i]]')
    return Var(out, value.shape, value.dtype), idx


def _select_backward(gen, ins, constants, needs, out, saved, g):
    (x,) = ins
    gx = gen.fresh('gsel')
    gen.emit(f'{gx} = np.zeros({x.shape}, {_dtype_name(g.dtype)})')
    gen.emit(f'for i in range({x.shape[0]}):')
    gen.emit(f'    {gx}[i, {saved}[i]] = {g.name}[i]')
    return (Var(gx, x.shape, g.dtype),)


def _unary(expr, grad):
    def forward(gen, ins, constants, context, value):
        return gen.elementwise(expr.format(x=gen.operand(ins[0])), value.shape, value.dtype, ins[0]), None

    def backward(gen, ins, constants, needs, out, saved, g):
        return (gen.elementwise(grad.format(x=gen.operand(ins[0]), y=out.name, g=g.name), out.shape, out.dtype,
                                ins[0], out, g),)
    return Emitter(forward, backward)


def _expand_forward(gen, ins, constants, context, value):
    (x,) = ins
    dim, repeats = constants['dim'], constants['repeats']
    if len(x.shape) != 2:
        raise TraceError('fastgrad.compile: Expand of an array that is not 2-D')
    dim %= 2
    out = gen.fresh('ex')
    gen.emit(f'{out} = np.empty({value.shape}, {_dtype_name(value.dtype)})')
    gen.emit(f'for r in range({repeats}):')
    gen.emit(f'    {out}[r, :] = {gen.operand(x)}[0, :]' if dim == 0 else f'    {out}[:, r] = {gen.operand(x)}[:, 0]')
    return Var(out, value.shape, value.dtype), dim


def _expand_backward(gen, ins, constants, needs, out, saved, g):
    (x,) = ins
    return (gen.new(f'np.sum({g.name}, axis={saved}).reshape({x.shape})', x.shape, g.dtype),)


def _transpose_forward(gen, ins, constants, context, value):
    if constants.get('axes') is not None or len(ins[0].shape) != 2:
        raise TraceError('fastgrad.compile: Transpose other than of a 2-D array')
    return gen.new(f'np.ascontiguousarray({gen.storage(ins[0])}.T)', value.shape, value.dtype), None


def _transpose_backward(gen, ins, constants, needs, out, saved, g):
    return (gen.new(f'np.ascontiguousarray({g.name}.T)', ins[0].shape, g.dtype),)


def _reshape_forward(gen, ins, constants, context, value):
    return gen.new(f'np.ascontiguousarray({gen.storage(ins[0])}).reshape({value.shape})', value.shape, value.dtype), None


def _reshape_backward(gen, ins, constants, needs, out, saved, g):
    return (gen.new(f'np.ascontiguousarray({g.name}).reshape({ins[0].shape})', ins[0].shape, g.dtype),)


def _conv2d_forward(gen, ins, constants, context, value):
    x, w, b = ins
    o, c, kh, kw = w.shape
    (sh, sw), (ph, pw) = conv_geometry(constants.get('stride', 1), constants.get('padding', 0))
    relu = constants.get('activation') == 'relu'
    gen.conv_ops += 1
    xs = gen.new(gen.storage(x, value.dtype), x.shape, value.dtype)
    w2 = gen.new(f'{gen.storage(w, value.dtype)}.reshape(({o}, {c * kh * kw}))', (o, c * kh * kw), value.dtype)
    geometry = f'{kh}, {kw}, {sh}, {sw}, {ph}, {pw}'
    y = gen.new(f'_conv2d_forward({xs.name}, {w2.name}, {gen.storage(b, value.dtype)}, {geometry}, {relu}, conv_parts)',
                value.shape, value.dtype, prefix='y')
    return y, (xs, w2, relu, geometry)


def _conv2d_backward(gen, ins, constants, needs, out, saved, g):
    x, w, b = ins
    xs, w2, relu, geometry = saved
    need_x, need_w, need_b = needs
    gx, gw2, gb = gen.fresh('gx'), gen.fresh('gw'), gen.fresh('gb')
    gen.emit(f'{gx}, {gw2}, {gb} = _conv2d_backward({xs.name}, {w2.name}, {out.name}, {gen.storage(g, out.dtype)}, '
             f'{relu}, {geometry}, {need_x}, {need_w}, {need_b}, conv_parts)')
    return (Var(gx, x.shape, out.dtype) if need_x else None,
            gen.new(f'{gw2}.reshape({w.shape})', w.shape, out.dtype) if need_w else None,
            Var(gb, b.shape, out.dtype) if need_b else None)


def _maxpool2d_forward(gen, ins, constants, context, value):
    (x,) = ins
    (kh, kw), (sh, sw) = pool_geometry(constants['kernel_size'], constants.get('stride'))
    gen.conv_ops += 1
    y, where = gen.fresh('y'), gen.fresh('where')
    gen.emit(f'{y}, {where} = _maxpool2d_forward({gen.storage(x, value.dtype)}, {kh}, {kw}, {sh}, {sw}, conv_parts)')
    return Var(y, value.shape, value.dtype), where


def _maxpool2d_backward(gen, ins, constants, needs, out, saved, g):
    (x,) = ins
    h, w = x.shape[2:]
    return (gen.new(f'_maxpool2d_backward({saved}, {gen.storage(g)}, {h}, {w}, conv_parts)', x.shape, g.dtype),)


EMITTERS = {
    ops.Add: _arith('+', _add_grads),
    ops.Subtract: _arith('-', _sub_grads),
    ops.Multiply: _arith('*', _mul_grads),
    ops.Divide: _arith('/', _div_grads),
    ops.MatrixMultiply: Emitter(_matmul_forward, _matmul_backward),
    ops.BatchMM: Emitter(_batchmm_forward, _batchmm_backward),
    ops.Linear: Emitter(_linear_forward, _linear_backward),
    ops.CrossEntropy: Emitter(_cross_entropy_forward, _cross_entropy_backward),
    ops.Sigmoid: _activation(kernels.SIGMOID),
    ops.ReLU: _activation(kernels.RELU),
    ops.Tanh: _activation(kernels.TANH),
    ops.Softmax: Emitter(_softmax_forward, _softmax_backward),
    ops.LogSoftmax: Emitter(_log_softmax_forward, _log_softmax_backward),
    ops.Sum: Emitter(_sum_forward, _sum_backward),
    ops.Select: Emitter(_select_forward, _select_backward),
    ops.Exp: _unary('np.exp({x})', '{g} * {y}'),
    ops.Log: _unary('np.log({x})', '{g} / {x}'),
    ops.Expand: Emitter(_expand_forward, _expand_backward),
    ops.Transpose: Emitter(_transpose_forward, _transpose_backward),
    ops.Reshape: Emitter(_reshape_forward, _reshape_backward),
    Conv2dOp: Emitter(_conv2d_forward, _conv2d_backward),
    MaxPool2dOp: Emitter(_maxpool2d_forward, _maxpool2d_backward),
    FlattenOp: Emitter(_reshape_forward, _reshape_backward),  # a reshape to (N, prod(...)), as the op
}

HEADER = '''"""Generated by fastgrad.compile from a traced step; do not edit (the file name is the hash of its text)."""
import numpy as np
from numba import njit

from fastgrad.kernels.activations import (act_derivative as _act_derivative, activate as _activate,
                                         activate_loop as _activate_loop, activation_backward as _activation_backward)
from fastgrad.kernels.batch import gather_rows as _gather_rows
from fastgrad.kernels.blas import matmul as _matmul
from fastgrad.kernels.conv import (conv2d_backward as _conv2d_backward, conv2d_forward as _conv2d_forward,
                                   maxpool2d_backward as _maxpool2d_backward, maxpool2d_forward as _maxpool2d_forward)
from fastgrad.kernels.linear import (_nonzero_share, act_bias_grad as _act_bias_grad,
                                     act_bias_grad_rows as _act_bias_grad_rows, affine as _affine,
                                     dense_backward as _dense_backward, first_columns as _first_columns,
                                     sparse_affine as _sparse_affine,
                                     sparse_weight_grad as _sparse_weight_grad,
                                     sparse_weight_grad_update as _sparse_weight_grad_update)
from fastgrad.kernels.optim import apply_rows, apply_update, update_parallel, update_rows
from fastgrad.kernels.softmax import (cross_entropy_backward as _cross_entropy_backward,
                                      cross_entropy_forward as _cross_entropy_forward, log_softmax as _log_softmax,
                                      log_softmax_backward as _log_softmax_backward, softmax as _softmax)
from fastgrad.kernels.views import flat as _flat
'''


def cache_dir():
    """Where generated steps are written: $FASTGRAD_CACHE, else ~/.cache/fastgrad/compiled. When that cannot
    be written, the temporary folder's fastgrad-compiled-<uid> if this user owns it and no one else may write
    it (one that another user made would let their files run as this user's code), else a folder of this
    process's own; said once on stderr."""
    global _FALLBACK
    folder = os.environ.get('FASTGRAD_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'fastgrad', 'compiled')
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    if _FALLBACK is None:
        uid = os.getuid() if hasattr(os, 'getuid') else 0
        shared = os.path.join(tempfile.gettempdir(), f'fastgrad-compiled-{uid}')
        try:
            os.mkdir(shared, 0o700)
        except OSError:
            pass
        info = os.lstat(shared) if os.path.lexists(shared) else None
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == uid and not info.st_mode & 0o022:
            _FALLBACK = shared
        else:
            _FALLBACK = tempfile.mkdtemp(prefix='fastgrad-compiled-')
            atexit.register(shutil.rmtree, _FALLBACK, True)
        print(f'fastgrad.compile: cannot write the cache folder {folder}; compiled steps go to {_FALLBACK}',
              file=sys.stderr)
    return _FALLBACK


_FALLBACK = None


def _load_module(source):
    """Imports generated source from the cache folder, registered in sys.modules under its name first, which
    numba's cache needs to load it in a later process. The file is named by the hash of its text and written
    once, atomically; one that holds anything else (damaged, or another step's text) is written again."""
    # numba's cache of a generated module does not notice edits of the kernels it calls
    source = f'# kernels {SOURCE_HASH[:16]}\n' + source
    name = 'fastgrad_step_' + hashlib.sha256(source.encode()).hexdigest()[:20]
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(cache_dir(), name + '.py')
    try:
        with open(path, encoding='utf-8', errors='replace', newline='') as f:
            written = f.read() == source
    except FileNotFoundError:
        written = False
    if not written:
        from .files import atomic_open
        with atomic_open(path, newline='') as f:
            f.write(source)
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module
    try:  # from the text itself, not from a .pyc that could be stale or damaged
        exec(builtins.compile(source, path, 'exec'), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


_NO_STATE = {}
_HYPER = {SGD: ('lr', 'momentum', 'weight_decay', 'nesterov'), Adam: ('lr', 'betas', 'eps', 'weight_decay')}


class Program:
    """One traced variant of a step: the generated functions and what to pass them."""

    def __init__(self, gen, results, single, with_grad, module, fn):
        self.params = list(gen.params)  # those whose gradient the step returns come first
        self.transposed = [gen.param_vars[id(p)].transposed for p in self.params]
        self.with_grad = len(with_grad)
        self.optimizers = list(gen.optimizers)
        self.state_args = list(gen.state_args)
        self.row_states = set(gen.row_states)  # passed 2-D, as their parameter's storage (a transposed weight)
        self.row_params = set(gen.row_params)  # fused weights read by their layer alone: run() may pad them
        self.row_args = []  # their positions in arguments(), and their states' (made by arrays())
        self.pads = {}  # position in arguments() -> its padded copy (Program.padded)
        self.result_dtypes = [r.dtype for r in results]
        self.single = single
        self.has_sparse = gen.sparse_layers > 0
        self.has_conv = gen.conv_ops > 0
        self.scratch_specs = list(gen.scratch_specs)
        self.loop_layers = gen.loop_layers  # small dense layers written out as loops
        self.step = module.step
        self.epoch = getattr(module, 'epoch', None)
        self.source = module.__file__
        self.structure = self.structure_key()
        self.modules, self.literals = list(gen.recorder.modules.values()), list(gen.literals)
        self.closure = getattr(fn, '__closure__', None) or ()
        self.globals = getattr(fn, '__globals__', {})
        self.global_names = sorted(_global_names(fn.__code__)) if hasattr(fn, '__code__') else []
        self.guarded = self.guard()
        self.refs = self.hyper = None  # the arrays and hyperparameters the cached arguments were made from
        self.cached = None
        self.step_ready = self.epoch_ready = False  # compiled (or loaded from numba's cache) for their arguments

    def structure_key(self):
        """What the code is specialised on besides the arguments: each parameter's array (shape, dtype,
        layout), each optimizer's kind of update (momentum or not) and its number of groups."""
        key = [(p.value.shape, p.value.dtype.str, _storage_transposed(p.value)) for p in self.params]
        for opt in self.optimizers:
            key.append(len(opt.param_groups))
            if isinstance(opt, SGD):
                key += [bool(group['momentum']) for group in opt.param_groups]
        return tuple(key)

    def guard(self):
        """What else the step's Python read at trace time, that a call must find unchanged, as (objects, compared
        by identity; the bytes of each single number written in as a literal): each parameter's requires_grad
        and whether its array is writeable, each optimizer group's list of parameters and its items, the
        attributes of each Module called in the step (a list or tuple and its items), what the step function's
        closure cells and the globals it names hold, and whether each literal's node needs a gradient. The
        objects are kept, so none of their ids can be reused."""
        seen = [p.requires_grad for p in self.params] + [p.value.flags.writeable for p in self.params]
        for opt in self.optimizers:
            for group in opt.param_groups:
                seen.append(group['params'])
                seen += group['params']
        for module in self.modules:
            for value in vars(module).values():
                seen.append(value)
                if isinstance(value, (list, tuple)):
                    seen += value
        for cell in self.closure:
            try:
                seen.append(cell.cell_contents)
            except ValueError:  # an empty cell
                seen.append(_MISSING)
        found = self.globals
        seen += [found.get(name, _MISSING) for name in self.global_names]
        seen += [node.requires_grad for node in self.literals]
        return seen, [np.asarray(node.value).tobytes() for node in self.literals]

    def changed(self):
        """Whether guard() differs from what it was at trace time."""
        seen, literals = self.guard()
        before, literals_before = self.guarded
        return len(seen) != len(before) or not all(map(operator.is_, seen, before)) or literals != literals_before

    def arguments(self):
        """The arrays to pass besides the batch, or None when the step must trace again (guard() changed, a
        parameter's array or the optimizer's kind of update changed). Made anew only when a parameter's array,
        a state buffer or a hyperparameter is not what it was at the last call; Adam's step counts are read
        every time."""
        if self.changed():
            return None
        refs = [p.value for p in self.params]
        refs += [opt.state.get(p, _NO_STATE).get(name) for opt, p, name in self.state_args if name != 'step']
        hyper = [group[k] for opt in self.optimizers for group in opt.param_groups for k in _HYPER[type(opt)]]
        if self.refs is None or hyper != self.hyper or not all(a is b for a, b in zip(refs, self.refs)):
            if self.structure != self.structure_key():
                return None
            self.cached = self.arrays()
            self.refs = [p.value for p in self.params]
            self.refs += [opt.state[p][name] for opt, p, name in self.state_args if name != 'step']
            self.hyper = hyper
        arrays = self.cached
        if self.steps:
            for (opt, p), array in self.steps:
                array[0] = opt.state[p].get('step', 0)
        return arrays

    def arrays(self):
        """The arguments besides the batch: parameters (storage views), hyperparameter tables, state buffers."""
        out = [p.value.T if t else p.value for p, t in zip(self.params, self.transposed)]
        self.row_args = [i for i, p in enumerate(self.params) if id(p) in self.row_params]
        for opt in self.optimizers:
            if isinstance(opt, SGD):
                rows = [(g['lr'], g['momentum'], g['weight_decay'], float(bool(g['nesterov']))) for g in opt.param_groups]
            else:
                rows = [(g['lr'], g['betas'][0], g['betas'][1], g['eps'], g['weight_decay']) for g in opt.param_groups]
            out.append(np.array(rows, dtype=np.float64))
        self.steps = []
        for k, (opt, p, name) in enumerate(self.state_args):
            state = opt.state.setdefault(p, {})
            if name == 'step':
                out.append(np.array([state.get('step', 0)], dtype=np.int64))
                self.steps.append(((opt, p), out[-1]))
                continue
            buf = opt.flat_buffer(p, name)  # in the parameter's memory order: its storage view's, flat
            if id(p) in self.row_params:
                self.row_args.append(len(out))
            out.append(buf.reshape(p.value.T.shape) if k in self.row_states else buf)
        out += [np.empty(shape, dtype) for shape, dtype in self.scratch_specs]
        return out

    def padded(self, arrays):
        """For a compiled epoch: `arrays` with each row argument (a fused update's weight and its state) copied
        into rows that start on cache lines (the sparse kernels stream a weight row per nonzero, and rows that
        straddle lines cost them more loads), and the (array, copy) pairs to copy back after the epoch. An
        array already so aligned, or that shares memory with another argument, is passed as it is."""
        out, pairs = list(arrays), []
        for k in self.row_args:
            a = arrays[k]
            if a.ctypes.data % CACHE_LINE == 0 and a.strides[0] % CACHE_LINE == 0 or \
                    any(j != k and np.may_share_memory(a, b) for j, b in enumerate(arrays)):
                continue
            pad = self.pads.get(k)
            if pad is None or pad.shape[0] != a.shape[0] or pad.dtype != a.dtype:
                pad = self.pads[k] = _cache_line_rows(a.shape, a.dtype)
            pad[:, :a.shape[1]] = a
            out[k] = pad
            pairs.append((a, pad))
        return out, pairs

    def finish(self, arrays, took_sparse, grads):
        """After a call: hand the cores over if a sparse batch came, write Adam's step counts back into
        optimizer.state, and set each parameter's .grad as an eager step leaves it."""
        if took_sparse:
            backend.sparse_parts()
        for (opt, p), array in self.steps:
            opt.state[p]['step'] = int(array[0])
        for p, t, g in zip(self.params, self.transposed, grads):
            p.grad = g.T if t else g
        for p in self.params[self.with_grad:]:
            p.grad = None


class CompiledStep:
    """A step function compiled by fastgrad.compile: call it like the function, or run a whole epoch."""

    def __init__(self, fn, keep_grads=True):
        self.fn = fn
        self.keep_grads = keep_grads
        self.programs = {}  # (shape and dtype of each argument) -> Program
        self.compile_seconds = 0.0  # spent tracing (the traced step included) and compiling so far
        self.__name__ = getattr(fn, '__name__', 'step')
        self.__doc__ = getattr(fn, '__doc__', None)

    def _compile(self, function, call):
        """Compiles (or loads from numba's cache) `function` for these arguments before it first runs, so
        that compile_seconds holds compilation only."""
        start = time.perf_counter()
        signature = tuple(numba.typeof(a) for a in call)
        try:
            function.compile(signature)
        except Exception as e:  # numba's own errors are compile errors; others come from loading a damaged cache
            if isinstance(e, numba.core.errors.NumbaError) or not _drop_numba_cache(function):
                raise
            function.compile(signature)  # compiled anew
        self.compile_seconds += time.perf_counter() - start

    def _program(self, key):
        """The program for arguments of these shapes and dtypes and its other arguments, or (None, None)
        when there is none or it must trace again."""
        program = self.programs.get(key)
        arrays = None if program is None else program.arguments()
        return (program, arrays) if arrays is not None else (None, None)

    def __call__(self, *args):
        args = tuple(a if type(a) is np.ndarray and a.flags.c_contiguous else _argument(a, i)
                     for i, a in enumerate(args))
        key = tuple([(a.shape, a.dtype) for a in args])
        program, arrays = self._program(key)
        if program is None:
            program, arrays = self._trace(args, key)
        call = (*args, *arrays, *_thread_args(program))
        if not program.step_ready:
            self._compile(program.step, call)
            program.step_ready = True
        status, took_sparse, results, grads = program.step(*call)
        if status != OK:
            return self.fn(*args)  # eagerly, which raises the error the compiled code found (before any update)
        program.finish(arrays, took_sparse, grads)
        values = [np.asarray(v, dtype=d) for v, d in zip(results, program.result_dtypes)]
        return values[0] if program.single else tuple(values)

    def _trace(self, args, key):
        """Traces the step for arguments of these shapes and dtypes; returns _program(key)."""
        # the same array passed as two arguments would tie both to the first in the recorded program
        args = tuple(a.copy() if any(a is b for b in args[:i]) else a for i, a in enumerate(args))
        start = time.perf_counter()
        try:
            self._trace_and_generate(args, key)
        finally:
            self.compile_seconds += time.perf_counter() - start
        program, arrays = self._program(key)
        if program is None:
            raise TraceError('fastgrad.compile: running the step changes what it read (a module attribute, a '
                             "global, a parameter's array or requires_grad), so a program traced from it never "
                             'matches the next call; run the step eagerly')
        return program, arrays

    def _trace_and_generate(self, args, key):
        """Records the step by running it eagerly, writes and loads its program, and undoes the run (also when
        the step raises or is refused): the program then takes the step as it takes every later one."""
        recorder = Recorder()
        try:
            self.programs[key] = self._generate(args, recorder)
        finally:
            recorder.undo()

    def _generate(self, args, recorder):
        tracing.recorder = recorder
        try:
            result = self.fn(*args)
        finally:
            tracing.recorder = None
        single = not isinstance(result, (tuple, list))
        nodes = [result] if single else list(result)
        for node in nodes:
            if not isinstance(node, TensorNode):
                raise TraceError(f'fastgrad.compile: the step must return a TensorNode or a tuple of them, not '
                                 f'{type(node).__name__}')
        _check_untraced_updates(recorder)
        recorder.changed_hyperparameters()
        gen = Generator(args, recorder, fuse_updates=not self.keep_grads)
        results = gen.run(nodes)
        if gen.fused and gen.loop_layers:
            # a step with loops is compiled with fastmath, which contracts the updates inlined into it: a fused
            # kernel (no fastmath) would then move the weights otherwise than keep_grads=True does
            gen = Generator(args, recorder)
            results = gen.run(nodes)
        with_grad = [p for p in gen.params if self.keep_grads and gen.grads.get(id(p)) is not None]
        returned = {id(p) for p in with_grad}
        gen.params = with_grad + [p for p in gen.params if id(p) not in returned]
        epoch = len(args) == 2 and single and results[0].scalar  # fn(xb, yb) returning one loss
        module = _load_module(_source(gen, args, results, with_grad, epoch=epoch))
        return Program(gen, results, single, with_grad, module, self.fn)

    def run(self, x, y, batch_size, order=None):
        """One epoch of a step `fn(xb, yb)` that returns the loss: batches of `batch_size` rows of x and y,
        taken in the order of `order` (row indices: a permutation for a shuffled epoch, or any part of one;
        None: every row in sequence), each stepped; returns the per-batch losses. All full batches run in
        one call into numba; a shorter last batch is one more call."""
        x, y = _argument(x, 0), _argument(y, 1)
        if len(x) != len(y):
            raise ValueError(f'run: x has {len(x)} rows but y has {len(y)}')
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f'run: batch_size must be a positive integer, got {batch_size!r}')
        if order is None:
            order = np.arange(len(x), dtype=np.int64)
        else:
            order = np.asarray(order)
            if order.ndim != 1 or order.dtype.kind not in 'iu':
                raise ValueError(f'run: order must be a 1-D array of row indices, got {order.dtype} {order.shape}')
            order = np.ascontiguousarray(order, dtype=np.int64)
            if not indices_within(order, len(x)):
                raise ValueError(f'run: order holds row indices outside 0..{len(x) - 1}')
        n = len(order)
        full = n // batch_size
        out = np.empty(0)
        if full:
            key = (((batch_size,) + x.shape[1:], x.dtype), ((batch_size,) + y.shape[1:], y.dtype))
            program, arrays = self._program(key)
            if program is None:  # traced on the first batch (a trace is undone: the epoch then takes that batch)
                idx = order[:batch_size]
                program, arrays = self._trace((x[idx], y[idx]), key)
            if program.epoch is None:
                raise TypeError('run: the step must take two arrays (xb, yb) and return one loss (a TensorNode '
                                'holding one number)')
            out = np.empty(full, dtype=np.float64)
            threads = _thread_args(program)
            epoch_arrays, pads = program.padded(arrays)
            call = (x, y, order[:full * batch_size], out, *epoch_arrays, *threads)
            if not program.epoch_ready:
                if not program.step_ready:  # the step first, as a call compiles it: the epoch then links that code
                    idx = order[:batch_size]
                    self._compile(program.step, (x[idx], y[idx], *arrays, *threads))
                    program.step_ready = True
                self._compile(program.epoch, call)
                program.epoch_ready = True
            try:
                status, took_sparse, grads = program.epoch(*call)
            finally:
                for a, pad in pads:
                    a[...] = pad[:, :a.shape[1]]
            program.finish(arrays, took_sparse, grads)
            if status != OK:  # a bad target in batch k: the batches before it have been stepped
                k = status >> 8
                idx = order[k * batch_size:(k + 1) * batch_size]
                self.fn(x[idx], y[idx])  # eagerly, which raises the error
        if n % batch_size:
            idx = order[full * batch_size:]
            out = np.append(out, float(self(x[idx], y[idx])))
        return out


def _global_names(code):
    """The globals a function's code reads, its nested functions' and comprehensions' included."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == 'LOAD_GLOBAL'}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _drop_numba_cache(function):
    """Removes numba's cache files of a generated function's module; whether there were any."""
    path = function.py_func.__code__.co_filename
    folder = getattr(getattr(function, '_cache', None), '_cache_path', None) or \
        os.path.join(os.path.dirname(path), '__pycache__')
    prefix = os.path.splitext(os.path.basename(path))[0] + '.'
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(('.nbi', '.nbc'))]
    except OSError:
        return False
    for n in names:
        try:
            os.remove(os.path.join(folder, n))
        except FileNotFoundError:
            pass
    return bool(names)


_MISSING = object()  # an empty closure cell, or a global the step names that does not exist (yet)


def _argument(a, i):
    if isinstance(a, TensorNode):
        raise TypeError(f'fastgrad.compile: argument {i} is a TensorNode; a compiled step takes numpy arrays')
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _thread_args(program):
    """(sparse_parts, numba_parts, conv_parts): numba's threads for the sparse kernels when the policy lets
    them run (under 'auto' the first sparse batch then hands the cores over), for big loops (the updates of
    big parameters, the gather of a batch, a dense layer's two backward products: backend.numba_parts), and
    for the convolution and pooling kernels (1 when the program has none)."""
    # backend.conv_parts first, as an eager step's first convolution comes before its updates: under 'auto'
    # it hands the cores to numba, which numba_parts then sees; a program without conv ops must not ask
    conv = backend.conv_parts() if program.has_conv else 1
    sparse = numba.get_num_threads() if program.has_sparse and backend.sparse_allowed() else 0
    return sparse, backend.numba_parts(backend.PARALLEL_MIN_SIZE), conv


def _cache_line_rows(shape, dtype):
    """A zeroed 2-D array of `shape`'s rows, each widened to whole cache lines and starting on one; the first
    shape[1] columns are the array's, the rest padding."""
    dtype = np.dtype(dtype)
    rows = cache_line_rows(shape[0], cache_line_width(shape[1], dtype.itemsize), dtype)
    rows.fill(0)
    return rows


def _check_untraced_updates(recorder):
    """A leaf (a parameter, a frozen layer's node, a data node) whose array changed during the trace without
    an optimizer step (a hand-written update such as p.value -= lr * p.grad) would not change in the
    compiled step: refuse it."""
    stepped = set()
    for event in recorder.events:
        if event[0] == 'step':
            stepped.update(id(p) for p in event[1].params)
    for key, (node, first) in recorder.first_values.items():
        if key not in stepped and not np.array_equal(node.value, first, equal_nan=True):
            raise TraceError(f'fastgrad.compile: a node of shape {first.shape} changed during the step without an '
                             'optimizer step (an update written by hand, such as p.value -= lr * p.grad, would not '
                             'run in compiled code); use fastgrad.SGD or Adam in the step, or run it eagerly')


def _zeros(var):
    return f'{_dtype_name(var.dtype)}(0)' if var.scalar else f'np.zeros({var.shape}, {_dtype_name(var.dtype)})'


def _source(gen, args, results, with_grad, epoch):
    """The generated module: the step function and, for a step fn(xb, yb) returning a loss, the epoch loop."""
    stored = []  # each returned gradient, C-contiguous in its parameter's storage layout
    for p in with_grad:
        pvar = gen.param_vars[id(p)]
        shape = pvar.shape[::-1] if pvar.transposed else pvar.shape
        stored.append((gen.new(gen.stored_grad(gen.grads[id(p)], pvar, returned=True), shape, pvar.dtype, prefix='rg')))
    params = [f'a{i}' for i in range(len(args))]
    rest = [gen.param_vars[id(p)].name for p in gen.params]
    rest += [f'H{o}' for o in range(len(gen.optimizers))]
    rest += [f'S{k}' for k in range(len(gen.state_args))]
    rest += [f'W{k}' for k in range(len(gen.scratch_specs))]
    rest += ['sparse_parts', 'numba_parts', 'conv_parts']
    constants = ''.join(f'{name} = np.array({value.tolist()!r}, dtype=np.{value.dtype.name})\n'
                        for name, value in gen.constants.items())
    result_tuple = '(' + ''.join(f'{r.name}.copy(), ' if r.scratch else f'{r.name}, ' for r in results) + ')'
    fastmath = f', fastmath={{{", ".join(map(repr, sorted(LOOP_FASTMATH)))}}}' if gen.loop_layers else ''
    grad_tuple = '(' + ''.join(f'{g.name}, ' for g in stored) + ')'
    # what an early return gives instead (made only there: zeroing a big gradient every call costs)
    error_values = (f'({"".join(_zeros(r) + ", " for r in results)}), '
                    f'({"".join(_zeros(g) + ", " for g in stored)})')
    source = (HEADER + '\n' + constants +
              '\n\n'
              f"@njit(cache=True, error_model='numpy'{fastmath})\n"
              f"def step({', '.join(params + rest)}):\n"
              f'    took_sparse = False\n'
              + '\n'.join(gen.prologue + gen.lines).replace(ERROR_VALUES, error_values) + '\n'
              f'    return {OK}, took_sparse, {result_tuple}, {grad_tuple}\n')
    if epoch:
        call = ', '.join(['xb', 'yb'] + rest)
        b = args[0].shape[0]
        # each batch gathered into the same two arrays, row by row as flat runs (any number of dimensions);
        # a big batch on numba's threads when they own the cores (numba_parts says so)
        gather = ''.join(f'        _gather_rows({src}f, order, k * {b}, {v}f, numba_parts)\n'
                         if a.size >= backend.PARALLEL_MIN_SIZE else
                         f'        for r in range({b}):\n'
                         f'            i = order[k * {b} + r]\n'
                         f'            for q in range({a[0].size if len(a) else 1}):\n'
                         f'                {v}f[r, q] = {src}f[i, q]\n' for v, src, a in (('xb', 'x', args[0]), ('yb', 'y', args[1])))
        source += (f"\n\n@njit(cache=True, error_model='numpy')\n"
                   f"def epoch(x, y, order, out, {', '.join(rest)}):\n"
                   f'    xb = np.empty({args[0].shape}, x.dtype)\n'
                   f'    yb = np.empty({args[1].shape}, y.dtype)\n'
                   f'    xf, yf = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)\n'
                   f'    xbf, ybf = xb.reshape({b}, -1), yb.reshape({b}, -1)\n'
                   f'    took = False\n'
                   f'    for k in range(1):\n' + gather +
                   f'    status, took_sparse, results, grads = step({call})\n'
                   f'    took = took or took_sparse\n'
                   f'    if status != {OK}:\n'
                   f'        return status, took, grads\n'
                   f'    out[0] = results[0]\n'
                   f'    for k in range(1, order.shape[0] // {b}):\n' + gather +
                   f'        status, took_sparse, results, grads = step({call})\n'
                   f'        took = took or took_sparse\n'
                   f'        if status != {OK}:\n'
                   f'            return status | (k << 8), took, grads\n'
                   f'        out[k] = results[0]\n'
                   f'    return {OK}, took, grads\n')
    return source


def compile(fn, keep_grads=True):
    """Compiles a training step: `fn` takes numpy arrays (a batch) and runs fastgrad code made of built-in
    ops, modules, a loss, backward() and an optimizer's zero_grad()/step(), returning a TensorNode (the loss)
    or a tuple of them. Returns a CompiledStep: call it as fn (it returns the loss values as arrays), or
    `.run(x, y, batch_size, order=None)` for a whole epoch. The module docstring says what it captures.

    keep_grads=False: a call leaves every parameter's gradient cleared, as zero_grad() does (`.grad` reads
    zeros, `grad_if_any` is None), as in jax.jit, where gradients exist only inside the step; the update of a
    sparse-input layer's weight then takes its gradient row by row as it is summed, and that gradient is never
    written out (where that update alone consumes it: see Generator.fused_gradient), and run() gives that
    weight and its state rows that start on cache lines for the epoch (Program.padded). Parameters and
    optimizer state move as with keep_grads=True, bit for bit."""
    if not callable(fn):
        raise TypeError(f'fastgrad.compile: expected a function, got {type(fn).__name__}')
    if not isinstance(keep_grads, bool):
        raise TypeError(f'fastgrad.compile: keep_grads must be True or False, got {keep_grads!r}')
    return CompiledStep(fn, keep_grads)
