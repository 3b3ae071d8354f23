"""What a PyTorch or numpy user types first in a REPL (issue 14): tensor methods, reprs, module summaries."""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import TensorNode


def test_repr_shows_values_shape_dtype_and_requires_grad():
    t = TensorNode(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert repr(t) == ('TensorNode([[1., 2.],\n'
                       '            [3., 4.]], shape=(2, 2), dtype=float64, requires_grad=True)')
    assert str(t) == repr(t)
    data = TensorNode(np.arange(3, dtype=np.float32), requires_grad=False)
    assert repr(data) == 'TensorNode([0., 1., 2.], shape=(3,), dtype=float32, requires_grad=False)'
    assert repr(t * 2.0).endswith('shape=(2, 2), dtype=float64, requires_grad=True, source=Multiply)')
    assert repr(TensorNode(np.array(2.5), name='loss')) == \
        "TensorNode(2.5, shape=(), dtype=float64, requires_grad=True, name='loss')"


def test_repr_of_a_big_node_is_abbreviated_as_numpy_prints_it():
    text = repr(TensorNode(np.zeros((1000, 784), dtype=np.float32)))
    assert '...' in text and len(text.splitlines()) < 10
    assert text.endswith('shape=(1000, 784), dtype=float32, requires_grad=True)')


def test_indexing_like_numpy_with_gradients_that_scatter_back():
    t = TensorNode(np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(t[0].value, [0, 1, 2, 3])
    np.testing.assert_array_equal(t[:, 1:].value, t.value[:, 1:])
    np.testing.assert_array_equal(t[-1, ::2].value, [8, 10])
    idx = np.array([2, 0, 2])
    picked = t[idx]
    assert picked.shape == (3, 4) and picked.source.op is fg.Index
    picked.sum().backward()
    np.testing.assert_array_equal(t.grad, [[1] * 4, [0] * 4, [2] * 4])  # row 2 taken twice
    mask = t.value > 5
    assert t[mask].shape == (6,)
    assert t[TensorNode(idx, requires_grad=False)].shape == (3, 4)  # a node as the index: its values
    assert [row.shape for row in t] == [(4,)] * 3


def test_reductions_powers_and_elementwise_methods():
    x = np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]])
    t = TensorNode(x)
    for got, want in [(t.mean(), x.mean()), (t.mean(axis=0), x.mean(axis=0)), (t.mean(1, keepdims=True),
                      x.mean(1, keepdims=True)), (t.max(), x.max()), (t.max(axis=1), x.max(axis=1)),
                      (t.sum(axis=0, keepdims=True), x.sum(0, keepdims=True)), (t ** 2, x ** 2),
                      (abs(t), np.abs(x)), (t.abs(), np.abs(x)), (2 ** t, 2 ** x), (t.exp(), np.exp(x)),
                      (abs(t).log(), np.log(np.abs(x))), (t.sigmoid(), 1 / (1 + np.exp(-x))),
                      (t.relu(), np.maximum(x, 0)), (t.tanh(), np.tanh(x)),
                      (t.softmax(axis=0), np.exp(x) / np.exp(x).sum(0)), (t.softmax(), fg.softmax(t).value)]:
        assert isinstance(got, TensorNode)
        np.testing.assert_allclose(got.value, want, rtol=1e-12)
    e = TensorNode(np.full((2, 3), 2.0))
    (abs(t) ** e).sum().backward()  # a node as the exponent: both get gradients
    np.testing.assert_allclose(e.grad, np.abs(x) ** 2 * np.log(np.abs(x)))
    np.testing.assert_allclose(t.grad, 2 * x)
    assert (TensorNode(np.ones(2, np.float32)) ** 2).dtype == np.float32  # no upcast


def test_comparisons_give_plain_boolean_arrays():
    t = TensorNode(np.array([1.0, 2.0, 3.0]))
    for result, want in [(t > 2, [False, False, True]), (t >= 2, [False, True, True]), (t < 2, [True, False, False]),
                         (t <= 2, [True, True, False]), (t == 2, [False, True, False]),
                         (t != 2, [True, False, True]), (t == np.array([1.0, 0, 3]), [True, False, True]),
                         (t < TensorNode(np.full(3, 2.5)), [True, True, False])]:
        assert type(result) is np.ndarray and result.dtype == bool
        np.testing.assert_array_equal(result, want)
    assert t[t.value > 1].shape == (2,)
    # between two nodes, == is identity (nodes live in lists and dicts), and nodes stay hashable
    other = TensorNode(t.value.copy())
    assert (t == t) is True and (t == other) is False and (t != other) is True
    assert other not in [t] and {t: 1}[t] == 1


def test_item_and_numpy():
    loss = fg.cross_entropy(TensorNode(np.array([[2.0, 0.5]])), np.array([0]))
    assert isinstance(loss.item(), float) and loss.item() == pytest.approx(float(loss.value))
    assert TensorNode(np.array([[7]])).item() == 7
    with pytest.raises(ValueError, match='single-element'):
        TensorNode(np.zeros(3)).item()
    t = TensorNode(np.zeros(3))
    assert t.numpy() is t.value and t.ndim == 1
    assert f'{loss.item():.3f}' == f'{float(loss.value):.3f}'


def test_numpy_functions_on_nodes_build_graph():
    t = TensorNode(np.arange(6.0).reshape(2, 3))
    assert np.mean(t).item() == 2.5 and np.sum(t).item() == 15 and np.max(t, axis=0).shape == (3,)
    with pytest.raises(TypeError, match='out='):
        np.sum(t, out=np.zeros(()))


def test_model_repr_lists_layers_and_shapes_as_torch_does():
    model = fg.MLP(784, 10, hidden=[300, 100], activation='relu')
    assert repr(model) == (
        "MLP(\n"
        "  activation='relu'\n"
        "  (layers.0): Linear(in_features=784, out_features=300, dtype=float32)\n"
        "  (layers.1): Linear(in_features=300, out_features=100, dtype=float32)\n"
        "  (layers.2): Linear(in_features=100, out_features=10, dtype=float32)\n"
        ")")
    assert model.num_parameters() == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert model.num_parameters() == sum(p.value.size for p in model.parameters())


def test_repr_of_a_users_module_shows_its_parameters_and_submodules():
    class Net(fg.Module):
        def __init__(self):
            self.scale = TensorNode(np.ones((1, 2)))
            self.body = fg.Sequential(fg.Linear(4, 2, dtype=np.float64), fg.relu)

        def forward(self, x):
            return self.body(x) * self.scale

    assert repr(Net()) == (
        "Net(\n"
        "  (scale): parameter, shape (1, 2), float64\n"
        "  (body): Sequential(\n"
        "    (modules.0): Linear(in_features=4, out_features=2, dtype=float64)\n"
        "    (modules.1): relu\n"
        "  )\n"
        ")")
    assert Net().num_parameters() == 2 + 4 * 2 + 2
