"""The computation graph: TensorNode (values), OpNode (an Op applied to nodes), Op, backward, no_grad.

Backward walks the graph once, iteratively, in reverse topological order: every OpNode's backward runs
exactly once, after the gradients of all its outputs are complete. Two rules hold for every op, built-in
or written by a user:
- a backward receives gradient arrays that are its own to modify (students write `go[x <= 0] = 0`):
  the engine copies them for any op that does not promise to leave them alone (`Op.edits_goutputs`);
- a backward returns each input's own shape. Only ops that broadcast by design (`Op.broadcasts`) may
  return the broadcast shape, which is summed back in one place, `_reduce_to_shape`, not in every op.

The operators on TensorNode (`+`, `@`, `.sum()`, ...) run ops that ops.py defines on top of this module;
ops.py names them in OPERATORS, so that the import points one way only.
"""
import threading
import weakref

import numpy as np


class _GradMode(threading.local):
    """Whether ops build a graph, per thread (as PyTorch's grad mode): one thread's no_grad() leaves the
    others alone. Every thread starts with gradients on."""
    enabled = True


grad_mode = _GradMode()


class no_grad:
    """Context manager under which ops build no graph in this thread (values only, as for evaluation)."""

    def __enter__(self):
        self._previous, grad_mode.enabled = grad_mode.enabled, False
        return self

    def __exit__(self, *exc):
        grad_mode.enabled = self._previous
        return False


def is_grad_enabled():
    """Whether ops build a graph in the calling thread."""
    return grad_mode.enabled


_FLOAT64 = np.dtype(np.float64)

class _Tracing(threading.local):
    """The recorder of the step fastgrad.compile is tracing in this thread (None: not tracing)."""
    recorder = None


tracing = _Tracing()

# operator name -> the Op class it runs; filled in by ops.py (register_operators)
OPERATORS = {}


def register_operators(**ops):
    OPERATORS.update(ops)


def _grad_dtype(value):
    """Gradients are floating point: a node's own dtype if it is a float, float64 otherwise."""
    return value.dtype if value.dtype.kind == 'f' else _FLOAT64


class TensorNode:
    """A value in the computation graph, with the gradient of the loss over it.

    `grad` reads as zeros before any backward and accumulates over backward calls, as in vugrad and
    PyTorch. `requires_grad=False` marks data: nothing that depends only on it gets a gradient. The
    positional arguments are vugrad's: `TensorNode(value, source, name)`.
    """

    __array_ufunc__ = None  # so `array + node` calls TensorNode.__radd__ instead of numpy's elementwise loop

    def __init__(self, value, source=None, name=None, *, requires_grad=True):
        self.value = np.asarray(value)
        self.source = source
        self.name = name  # vugrad's optional label, shown by repr
        self.requires_grad = bool(requires_grad)
        self._grad = None         # None means zeros; see `grad`
        self._grad_owned = False  # whether _grad is ours to update in place (not shared with another node)

    # -- the gradient
    @property
    def grad(self):
        if self._grad is None:
            self._grad = np.zeros(self.value.shape, dtype=_grad_dtype(self.value))
            self._grad_owned = True
        elif not self._grad_owned:
            self._grad = self._grad.copy()
            self._grad_owned = True
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad = None if value is None else np.asarray(value)
        self._grad_owned = False

    @property
    def grad_if_any(self):
        """The gradient as backward left it, or None before any backward; unlike `grad` it never allocates
        or copies, so it may be shared with another node: read it, do not write to it."""
        return self._grad

    def _accumulate_grad(self, g):
        """Adds one backward pass's gradient; keeps a reference until something needs to write to it."""
        if self._grad is None:
            self._grad, self._grad_owned = g, False
        elif self._grad_owned:
            self._grad += g
        else:
            self._grad, self._grad_owned = self._grad + g, True

    # -- shape
    def size(self, dim=None):
        return self.value.shape if dim is None else self.value.shape[dim]

    @property
    def shape(self):
        return self.value.shape

    @property
    def dtype(self):
        return self.value.dtype

    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self.value, dtype=dtype, copy=True)
        return np.asarray(self.value, dtype=dtype)

    def __len__(self):
        return len(self.value)

    @property
    def ndim(self):
        return self.value.ndim

    def item(self):
        """The value of a single-element node as a Python number (numpy's item())."""
        if self.value.size != 1:
            raise ValueError(f'item() needs a single-element node; this one has shape {self.value.shape}')
        return self.value.item()

    def numpy(self):
        """The value array itself (not a copy, as torch's .numpy()): writing to it changes the node."""
        return self.value

    def __repr__(self):
        """The values as numpy prints them (abbreviated when large), then shape, dtype, requires_grad,
        and the op that made the node, if any (as torch's grad_fn) and its name, if it has one."""
        prefix = 'TensorNode('
        values = np.array2string(self.value, separator=', ', prefix=prefix)
        extras = [f'shape={self.shape}', f'dtype={self.dtype}', f'requires_grad={self.requires_grad}']
        if self.source is not None:
            extras.append(f'source={self.source.op.__name__}')
        if self.name is not None:
            extras.append(f'name={self.name!r}')
        return f'{prefix}{values}, {", ".join(extras)})'

    __str__ = __repr__

    # -- the graph below this node
    def backward(self, start=True):
        """Backpropagates from this single-element node; gradients accumulate into every node below.

        `start` is vugrad's signature: there, start=False is the recursive step that continues from a node
        inside the graph; this backward walks the whole graph in one call and has no such step."""
        if not start:
            raise ValueError('backward(start=False) is vugrad\'s internal recursion step; fastgrad\'s backward '
                             'walks the whole graph from the node it is called on: call backward()')
        if self.value.size != 1:
            raise ValueError(f'backward() starts from a single-element node (a loss); this node has shape '
                             f'{self.value.shape}: reduce it first, e.g. with .sum()')
        backward(self)

    def zero_grad(self):
        """Resets the gradient of this node and of every node below it (vugrad's behaviour)."""
        nodes = self._nodes_below()
        if tracing.recorder is not None:
            tracing.recorder.zero_grad(nodes)
        for node in nodes:
            node._grad, node._grad_owned = None, False

    def clear(self):
        """Disconnects the graph below this node so that it can be freed; parameters stay with their modules."""
        for node in self._nodes_below():
            opnode = node.source
            node.source = None
            if opnode is not None:
                opnode.inputs, opnode.context = None, None

    def _nodes_below(self):
        """Every TensorNode this one was computed from, itself included (iterative: graphs can be deep)."""
        seen, stack, found = {id(self)}, [self], []
        while stack:
            node = stack.pop()
            found.append(node)
            if node.source is not None and node.source.inputs is not None:
                for parent in node.source.inputs:
                    if id(parent) not in seen:
                        seen.add(id(parent))
                        stack.append(parent)
        return found

    # -- operators: nodes, scalars and arrays; constants are cast to this node's floating dtype
    def _node(self, other):
        if isinstance(other, TensorNode):
            return other
        other = np.asarray(other)
        if np.issubdtype(self.dtype, np.floating) and other.dtype != self.dtype:
            other = other.astype(self.dtype)
        return TensorNode(other, requires_grad=False)

    def __add__(self, other):
        return OPERATORS['Add'].do_forward(self, self._node(other))

    def __radd__(self, other):
        return OPERATORS['Add'].do_forward(self._node(other), self)

    def __sub__(self, other):
        return OPERATORS['Subtract'].do_forward(self, self._node(other))

    def __rsub__(self, other):
        return OPERATORS['Subtract'].do_forward(self._node(other), self)

    def __mul__(self, other):
        return OPERATORS['Multiply'].do_forward(self, self._node(other))

    def __rmul__(self, other):
        return OPERATORS['Multiply'].do_forward(self._node(other), self)

    def __truediv__(self, other):
        return OPERATORS['Divide'].do_forward(self, self._node(other))

    def __rtruediv__(self, other):
        return OPERATORS['Divide'].do_forward(self._node(other), self)

    def __matmul__(self, other):
        return OPERATORS['MatrixMultiply'].do_forward(self, self._node(other))

    def __rmatmul__(self, other):
        return OPERATORS['MatrixMultiply'].do_forward(self._node(other), self)

    def __neg__(self):
        return OPERATORS['Multiply'].do_forward(self, self._node(-1))

    def matmul(self, other):
        return self @ other

    # sum, mean and max also take numpy's dtype= and out= (np.sum(node) calls node.sum(axis=..., out=None))
    def sum(self, axis=None, keepdims=False, dtype=None, out=None):
        _numpy_arguments('sum', dtype, out)
        return OPERATORS['Sum'].do_forward(self, axis=axis, keepdims=keepdims)

    @property
    def T(self):
        return OPERATORS['Transpose'].do_forward(self)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return OPERATORS['Reshape'].do_forward(self, shape=shape)

    def __pow__(self, other):
        return OPERATORS['Power'].do_forward(self, self._node(other))

    def __rpow__(self, other):
        return OPERATORS['Power'].do_forward(self._node(other), self)

    def __abs__(self):
        return OPERATORS['Abs'].do_forward(self)

    def abs(self):
        return abs(self)

    def __getitem__(self, key):
        """numpy's indexing (ints, slices, None, ..., integer or boolean arrays); the gradient scatters back."""
        return OPERATORS['Index'].do_forward(self, key=key)

    def __iter__(self):
        """The nodes self[0], self[1], ... (as iterating a tensor or an array)."""
        if self.value.ndim == 0:
            raise TypeError('iteration over a 0-d TensorNode')
        return (self[i] for i in range(len(self.value)))

    def mean(self, axis=None, keepdims=False, dtype=None, out=None):
        _numpy_arguments('mean', dtype, out)
        return OPERATORS['Mean'].do_forward(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False, out=None):
        """The maximum (values only, as numpy's; the gradient is split between ties, as torch.amax)."""
        _numpy_arguments('max', None, out)
        return OPERATORS['Max'].do_forward(self, axis=axis, keepdims=keepdims)

    def exp(self):
        return OPERATORS['Exp'].do_forward(self)

    def log(self):
        return OPERATORS['Log'].do_forward(self)

    def sigmoid(self):
        return OPERATORS['Sigmoid'].do_forward(self)

    def relu(self):
        return OPERATORS['ReLU'].do_forward(self)

    def tanh(self):
        return OPERATORS['Tanh'].do_forward(self)

    def softmax(self, axis=-1):
        return self._along_last_axis(OPERATORS['Softmax'], axis)

    def log_softmax(self, axis=-1):
        return self._along_last_axis(OPERATORS['LogSoftmax'], axis)

    def _along_last_axis(self, op, axis):
        """op (which works over the last axis) over `axis`: swapped to the end and back around it."""
        ndim = self.value.ndim
        if not -ndim <= axis < ndim:
            raise ValueError(f'{op.__name__}: axis {axis} is out of range for shape {self.shape}')
        axis %= ndim
        if axis == ndim - 1:
            return op.do_forward(self)
        swap = list(range(ndim))
        swap[axis], swap[-1] = ndim - 1, axis
        transpose = OPERATORS['Transpose']
        return transpose.do_forward(op.do_forward(transpose.do_forward(self, axes=tuple(swap))), axes=tuple(swap))

    # comparisons give plain boolean arrays (no graph, no gradient), as numpy's. `==` and `!=` between two
    # nodes stay identity (a bool), as in vugrad: nodes are graph objects that the engine, optimizers and
    # course code keep in lists and dicts (`node in visited`); compare `a.value == b.value` for elements.
    __hash__ = object.__hash__

    def _compare(self, other, compare):
        return compare(self.value, other.value if isinstance(other, TensorNode) else np.asarray(other))

    def __lt__(self, other):
        return self._compare(other, np.less)

    def __le__(self, other):
        return self._compare(other, np.less_equal)

    def __gt__(self, other):
        return self._compare(other, np.greater)

    def __ge__(self, other):
        return self._compare(other, np.greater_equal)

    def __eq__(self, other):
        return self is other if isinstance(other, TensorNode) else self._compare(other, np.equal)

    def __ne__(self, other):
        return self is not other if isinstance(other, TensorNode) else self._compare(other, np.not_equal)


def _numpy_arguments(method, dtype, out):
    if dtype is not None or out is not None:
        raise TypeError(f'TensorNode.{method}: dtype= and out= are not supported (the result is a new node); '
                        f'use .value for numpy\'s')


class OpNode:
    """One application of an Op: `.op` (the Op class), `.context`, `.inputs` and `.outputs`.

    Outputs are held weakly, so that a graph is freed by reference counting as soon as its loss is
    dropped; an output nobody holds any more gets a zero gradient.
    """

    def __init__(self, op, context, inputs):
        self.op = op
        self.context = context
        self.inputs = inputs
        self._outputs = ()
        self._output_values = ()  # for the shape and dtype of an output nobody holds (its gradient is zeros)

    @property
    def outputs(self):
        return [ref() for ref in self._outputs]

    def _set_outputs(self, nodes):
        self._outputs = [weakref.ref(node) for node in nodes]
        self._output_values = [node.value for node in nodes]  # arrays, not nodes: no reference cycle

    def zero_grad(self):
        for node in self.inputs or ():
            node.zero_grad()

    def clear(self):
        for node in self.inputs or ():
            node.clear()
        self.inputs, self.context = None, None

    def __repr__(self):
        return f'OpNode({self.op.__name__})'


class Op:
    """An operation: subclass with static `forward(context, *inputs, **constants)` and `backward(context, *goutputs)`.

    forward gets raw arrays (and keyword constants, which get no gradient) and returns one array or a tuple.
    backward gets one gradient per output and returns one per input (or None). `context['needs_input_grad']`
    is a tuple of bools, one per input, set before forward, so either can skip work nobody needs.

    backward may write into the gradient arrays it gets: they are its own (copies where needed). An op whose
    backward never does sets `edits_goutputs = False` and saves the copies; overriding backward in a subclass
    sets it back to True unless the subclass says otherwise. backward returns gradients of each input's own
    shape, except in an op with `broadcasts = True` (numpy broadcasting in forward), whose gradients of the
    broadcast shape the engine sums back to each input's shape.
    """

    edits_goutputs = True
    broadcasts = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # the promise is about one backward's code: a new backward makes none until it says so
        if 'backward' in vars(cls) and 'edits_goutputs' not in vars(cls):
            cls.edits_goutputs = True

    @classmethod
    def do_forward(cls, *inputs, **constants):
        needs, values = [], []
        enabled = grad_mode.enabled  # one attribute read of the thread-local per op
        for node in inputs:
            if not isinstance(node, TensorNode):
                raise TypeError(f'{cls.__name__}: input {len(values)} is a {type(node).__name__}, not a TensorNode '
                                f'(wrap arrays in TensorNode, or pass constants as keyword arguments)')
            needs.append(enabled and node.requires_grad)
            values.append(node.value)
        needs = tuple(needs)
        context = {'needs_input_grad': needs}
        raw = cls.forward(context, *values, **constants)
        tracked = True in needs
        opnode = OpNode(cls, context, list(inputs)) if tracked else None
        if type(raw) is not tuple:  # one output, the common case
            output = TensorNode(raw, source=opnode, requires_grad=tracked)
            if tracked:
                opnode._set_outputs((output,))
            if tracing.recorder is not None:
                tracing.recorder.op(cls, inputs, constants, context, (output,))
            return output
        outputs = [TensorNode(value, source=opnode, requires_grad=tracked) for value in raw]
        if tracked:
            opnode._set_outputs(outputs)
        if tracing.recorder is not None:
            tracing.recorder.op(cls, inputs, constants, context, outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def forward(context, *inputs, **constants):
        raise NotImplementedError

    @staticmethod
    def backward(context, *goutputs):
        raise NotImplementedError


def _reduce_to_shape(op, index, g, shape):
    """g as an array of the input's shape. From an op that broadcasts by design, a gradient of the broadcast
    shape is summed back over the broadcast dimensions (numpy's rules); from any other op a wrong shape is
    the op's bug (a forgotten sum in backward, say) and raises."""
    g = np.asarray(g)
    if g.shape == shape:
        return g
    if op.broadcasts:
        extra = g.ndim - len(shape)
        if extra >= 0 and all(s in (1, gs) for s, gs in zip(shape, g.shape[extra:])):
            axes = tuple(range(extra)) + tuple(extra + i for i, s in enumerate(shape) if s == 1 and g.shape[extra + i] != 1)
            g = g.sum(axis=axes, keepdims=True)
            if extra:
                g = g.reshape(g.shape[extra:])
            if g.shape == shape:
                return g
        if g.size == 1 and int(np.prod(shape)) == 1:  # e.g. a () gradient for a (1, 1) input
            return g.reshape(shape)
        why = ''
    else:
        why = f' ({op.__name__} does not broadcast: its backward must return each input\'s own shape)'
    raise ValueError(f'{op.__name__}.backward returned a gradient of shape {np.shape(g)} for input {index}, '
                     f'which has shape {shape}{why}')


def _topological_opnodes(root):
    """The OpNodes that lead to root, each after every OpNode that consumes its outputs (iterative DFS)."""
    order, visited = [], set()  # OpNodes hash by identity
    stack = [(root.source, False)] if root.source is not None else []
    while stack:
        opnode, expanded = stack.pop()
        if expanded:
            order.append(opnode)
            continue
        if opnode in visited:
            continue
        visited.add(opnode)
        stack.append((opnode, True))
        for node in opnode.inputs or ():
            source = node.source
            if node.requires_grad and source is not None and source not in visited:
                stack.append((source, False))
    order.reverse()  # consumers before producers
    return order


def backward(root):
    """Accumulates d root / d node into `.grad` of every node below root that requires a gradient."""
    if tracing.recorder is not None:
        tracing.recorder.backward(root)
    if root.source is not None and root.source.inputs is None:
        raise RuntimeError('backward() through a graph that was cleared')
    # gradients not yet complete, keyed by node (TensorNode hashes by identity)
    dtype = _grad_dtype(root.value)
    if root.value.ndim:
        seed = np.empty(root.shape, dtype=dtype)
        seed.fill(1)  # d root / d root (np.ones does the same through a slower Python wrapper)
    else:
        seed = np.array(1, dtype=dtype)  # a loss: the common case, and the quickest array to make
    pending = {root: seed}
    leaves = [root] if root.source is None else []
    for opnode in _topological_opnodes(root):
        op = opnode.op
        goutputs = []
        for ref, value in zip(opnode._outputs, opnode._output_values):
            node = ref()
            g = None if node is None else pending.pop(node, None)
            if g is None:
                g = np.zeros(value.shape, dtype=_grad_dtype(value))
            else:
                node._accumulate_grad(g)
                if op.edits_goutputs:  # g is also node.grad, and may be another input's gradient
                    g = np.array(g)
            goutputs.append(g)
        ginputs = op.backward(opnode.context, *goutputs)
        if type(ginputs) is not tuple:
            ginputs = (ginputs,)
        inputs = opnode.inputs
        if len(ginputs) != len(inputs):
            raise ValueError(f'{op.__name__}.backward returned {len(ginputs)} gradients for '
                             f'{len(inputs)} inputs')
        for i, (node, g) in enumerate(zip(inputs, ginputs)):
            if g is None or not node.requires_grad:
                continue
            value = node.value
            if getattr(g, 'shape', None) != value.shape:
                g = _reduce_to_shape(op, i, g, value.shape)
            if g.dtype != value.dtype:
                g = g.astype(_grad_dtype(value))
            if node in pending:  # never add in place: g may be shared with another input or the context
                pending[node] = pending[node] + g
            else:
                pending[node] = g
                if node.source is None:
                    leaves.append(node)
    for node in leaves:
        node._accumulate_grad(pending[node])

