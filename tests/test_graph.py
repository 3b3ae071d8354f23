"""The graph cases vugrad gets wrong, and the TensorNode API."""
import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import Op, TensorNode


def node(rng, *shape):
    return TensorNode(rng.standard_normal(shape))


def test_node_used_twice(rng):
    x = node(rng, 3, 4)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.value + 1)


def test_diamond(rng):
    x = node(rng, 5)
    a = x * 3.0
    b = fg.sigmoid(a)
    c = fg.tanh(a)
    (b * c).sum().backward()
    s, t = 1 / (1 + np.exp(-3 * x.value)), np.tanh(3 * x.value)
    expected = 3 * (s * (1 - s) * t + s * (1 - t ** 2))
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12)


class SplitHalves(Op):
    """A two-output op: the first and the second half of a vector."""
    @staticmethod
    def forward(context, x):
        h = x.shape[0] // 2
        context['h'] = h
        return x[:h].copy(), x[h:].copy()

    @staticmethod
    def backward(context, g1, g2):
        return np.concatenate([g1, g2])


def test_multi_output_op(rng):
    x = node(rng, 6)
    lo, hi = SplitHalves.do_forward(x)
    (lo * 2.0 + hi * hi).sum().backward()
    np.testing.assert_allclose(x.grad, np.concatenate([[2.0] * 3, 2 * x.value[3:]]))


def test_output_nobody_uses_gets_zero_gradient(rng):
    x = node(rng, 6)
    lo, hi = SplitHalves.do_forward(x)
    del hi  # dropped entirely
    (lo * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0] * 3 + [0.0] * 3)
    # and one that is alive but not in the loss
    y = node(rng, 4)
    a, b = SplitHalves.do_forward(y)
    a.sum().backward()
    np.testing.assert_allclose(y.grad, [1, 1, 0, 0])
    assert not b.grad.any()


def test_side_branch_is_not_run(rng):
    calls = []

    class Spy(Op):
        @staticmethod
        def forward(context, x):
            return x * 1.0

        @staticmethod
        def backward(context, go):
            calls.append(1)
            return go

    x = node(rng, 3)
    side = Spy.do_forward(x) * 2.0  # never feeds the loss
    (x * 5.0).sum().backward()
    assert calls == []
    np.testing.assert_allclose(x.grad, 5.0)
    assert not side.grad.any()


def test_each_opnode_runs_once_after_all_outputs(rng):
    calls = []

    class Count(Op):
        @staticmethod
        def forward(context, x):
            return x * 1.0

        @staticmethod
        def backward(context, go):
            calls.append(go.copy())
            return go

    x = node(rng, 3)
    shared = Count.do_forward(x)
    loss = (shared * 2.0 + shared * 3.0 + fg.sigmoid(shared)).sum()
    loss.backward()
    assert len(calls) == 1
    s = 1 / (1 + np.exp(-x.value))
    np.testing.assert_allclose(calls[0], 5 + s * (1 - s))


def test_second_backward_accumulates(rng):
    x = node(rng, 4)
    y = (x * x).sum()
    y.backward()
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * x.value)
    x.zero_grad()
    y.zero_grad()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * x.value)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_backward_from_any_single_element_shape(rng, dtype):
    """d root / d root is ones of the root's shape and dtype, whether the root is a () loss or (1, 1)."""
    x = TensorNode(rng.standard_normal((3, 1)).astype(dtype))
    grads = []
    for root in ((x * x).sum(), (x * x).sum(axis=0).reshape(1, 1)):
        x.zero_grad()
        root.backward()
        assert x.grad.dtype == dtype and root.grad.shape == root.shape and root.grad.dtype == dtype
        np.testing.assert_array_equal(root.grad, np.ones(root.shape))
        grads.append(x.grad.copy())
    np.testing.assert_array_equal(grads[0], 2 * x.value)
    np.testing.assert_array_equal(grads[1], 2 * x.value)


def test_long_chain_has_no_recursion_limit():
    x = TensorNode(np.ones(2))
    y = x
    for _ in range(20_000):
        y = y * 1.0001
    loss = y.sum()
    loss.backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** 20_000)
    loss.zero_grad()
    assert not x.grad.any()
    loss.clear()
    assert loss.source is None


def test_requires_grad_false_and_no_grad(rng):
    data = TensorNode(rng.standard_normal((3, 2)), requires_grad=False)
    w = node(rng, 2, 2)
    out = data @ w
    assert out.requires_grad and out.source is not None
    only_data = data * 2.0
    assert not only_data.requires_grad and only_data.source is None
    out.sum().backward()
    assert not data.grad.any()
    np.testing.assert_allclose(w.grad, data.value.T @ np.ones((3, 2)))
    with fg.no_grad():
        z = w * 2.0
    assert z.source is None and not z.requires_grad
    assert fg.is_grad_enabled()


def test_needs_input_grad_is_visible_to_backward(rng):
    seen = {}

    class Mul(Op):
        @staticmethod
        def forward(context, a, b):
            context['a'], context['b'] = a, b
            return a * b

        @staticmethod
        def backward(context, go):
            seen['needs'] = context['needs_input_grad']
            need_a, need_b = context['needs_input_grad']
            return (go * context['b'] if need_a else None), (go * context['a'] if need_b else None)

    a = node(rng, 3)
    b = TensorNode(rng.standard_normal(3), requires_grad=False)
    Mul.do_forward(a, b).sum().backward()
    assert seen['needs'] == (True, False)
    np.testing.assert_allclose(a.grad, b.value)


def test_operators_with_scalars_arrays_and_nodes(rng):
    a, b = node(rng, 2, 3), node(rng, 2, 3)
    arr = rng.standard_normal((2, 3))
    cases = [
        (lambda: a + b, a.value + b.value), (lambda: a - 2.0, a.value - 2), (lambda: 2.0 - a, 2 - a.value),
        (lambda: a * arr, a.value * arr), (lambda: arr * a, arr * a.value), (lambda: a / b, a.value / b.value),
        (lambda: 1.0 / a, 1 / a.value), (lambda: arr + a, arr + a.value), (lambda: -a, -a.value),
        (lambda: a @ b.T, a.value @ b.value.T), (lambda: a.matmul(b.T), a.value @ b.value.T),
        (lambda: arr @ b.T, arr @ b.value.T), (lambda: a.reshape(3, 2), a.value.reshape(3, 2)),
        (lambda: a.sum(axis=1), a.value.sum(axis=1)), (lambda: a.sum(), a.value.sum()),
    ]
    for make, expected in cases:
        out = make()
        assert isinstance(out, TensorNode)
        np.testing.assert_allclose(out.value, expected)
    assert a.size() == (2, 3) and a.size(1) == 3 and a.shape == (2, 3) and a.dtype == np.float64
    assert np.mean(a) == pytest.approx(a.value.mean())
    np.testing.assert_allclose(np.asarray(a), a.value)


def test_grad_reads_zeros_and_is_safe_to_edit(rng):
    a = node(rng, 3)
    assert a.grad.shape == (3,) and not a.grad.any()
    b = node(rng, 3)
    (a + b).sum().backward()  # Add hands the same array to both inputs
    a.grad *= 10
    np.testing.assert_allclose(b.grad, 1.0)
    np.testing.assert_allclose(a.grad, 10.0)


def test_broadcasting_gradients_are_reduced(rng):
    x = node(rng, 4, 3)
    row = node(rng, 1, 3)
    col = node(rng, 4, 1)
    vec = node(rng, 3)
    scalar = TensorNode(np.array(2.0))
    ((x + row) * col / vec - scalar).sum().backward()
    assert row.grad.shape == (1, 3) and col.grad.shape == (4, 1) and vec.grad.shape == (3,)
    np.testing.assert_allclose(row.grad, (col.value / vec.value).sum(axis=0, keepdims=True))
    np.testing.assert_allclose(scalar.grad, -12.0)


def test_errors_name_what_is_wrong(rng):
    a, b = node(rng, 2, 3), node(rng, 4, 5)
    with pytest.raises(ValueError, match=r'Add: shapes \(2, 3\) and \(4, 5\)'):
        a + b
    with pytest.raises(ValueError, match=r'MatrixMultiply.*\(2, 3\).*\(4, 5\)'):
        a @ b
    with pytest.raises(ValueError, match=r'shape \(2, 3\)'):
        a.backward()
    with pytest.raises(TypeError, match=r'Add: input 1 is a ndarray'):
        fg.Add.do_forward(a, np.ones((2, 3)))
    with pytest.raises(ValueError, match='Expand: .*dimension 0'):
        fg.Expand.do_forward(a, dim=0, repeats=3)
    with pytest.raises(ValueError, match=r"CrossEntropy: targets must lie in \[0, 3\), got 3 at position 1"):
        fg.cross_entropy(a, np.array([0, 3]))
    with pytest.raises(ValueError, match=r'CrossEntropy: targets must be integers of shape \(2,\)'):
        fg.cross_entropy(a, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r'Linear: input \(2, 3\), weight \(4, 5\)'):
        fg.LinearOp.do_forward(a, b, node(rng, 1, 4))

    class BadShape(Op):
        @staticmethod
        def forward(context, x):
            return x.sum()

        @staticmethod
        def backward(context, go):
            return np.ones((7,))

    with pytest.raises(ValueError, match=r'BadShape.backward returned a gradient of shape \(7,\) for input 0'):
        BadShape.do_forward(a).backward()


@pytest.mark.slow
def test_errors_survive_python_O(tmp_path):
    code = ('import numpy as np, fastgrad as fg\n'
            'a = fg.TensorNode(np.ones((2, 3)))\n'
            'try:\n    a + fg.TensorNode(np.ones((4, 5)))\nexcept ValueError as e:\n    print("raised", e)\n')
    out = subprocess.run([sys.executable, '-O', '-c', code], capture_output=True, text=True, check=True)
    assert 'raised Add: shapes (2, 3) and (4, 5)' in out.stdout


def test_float32_stays_float32(rng):
    x = TensorNode(rng.standard_normal((5, 4)).astype(np.float32), requires_grad=False)
    mlp = fg.MLP(4, 3, hidden=[6, 5], rng=0)
    logits = mlp(x)
    hidden = fg.relu(x * 2.0 + 1.0) / 3.0 - fg.sigmoid(x) * fg.tanh(x)
    for out in (logits, hidden, fg.softmax(logits), fg.logsoftmax(logits), fg.cross_entropy(logits, [0, 1, 2, 0, 1])):
        assert out.dtype == np.float32, out
    loss = fg.cross_entropy(logits, np.array([0, 1, 2, 0, 1]))
    loss.backward()
    assert all(p.grad.dtype == np.float32 for p in mlp.parameters())


def test_clear_releases_the_graph(rng):
    """clear() on a loss still held frees every intermediate node and OpNode below it, by reference counting
    alone (OpNodes hold their outputs weakly: the graph has no cycles), also below an intermediate node the
    caller still holds; parameters and data stay."""
    mlp = fg.MLP(3, 2, hidden=4, rng=0)
    x = TensorNode(rng.standard_normal((5, 3)), requires_grad=False)
    logits = mlp(x)
    loss = fg.cross_entropy(logits, np.array([0, 1, 0, 1, 1]))
    loss.backward()
    keep = {id(p) for p in mlp.parameters()} | {id(x), id(loss), id(logits)}
    graph, stack = [], [loss]
    while stack:
        opnode = stack.pop().source
        if opnode is not None:
            graph.append(weakref.ref(opnode))
            for parent in opnode.inputs:
                if id(parent) not in keep:
                    graph.append(weakref.ref(parent))
                stack.append(parent)
    del opnode, parent
    # at least the loss's op, the output layer's, and the hidden layer's node and op
    assert len(graph) >= 4 and all(ref() is not None for ref in graph)
    enabled = gc.isenabled()
    gc.disable()
    try:
        loss.clear()
        alive = [ref() for ref in graph if ref() is not None]
    finally:
        if enabled:
            gc.enable()
    assert alive == []
    assert loss.source is None and logits.source is None
    assert all(p.value is not None and p.grad.shape == p.shape for p in mlp.parameters())
