"""Every built-in op passes a finite-difference check in float64, over several shapes."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastgrad as fg
from fastgrad import gradcheck

dims = st.integers(min_value=1, max_value=5)
settings.register_profile('fastgrad', max_examples=12, deadline=None)
settings.load_profile('fastgrad')


def arrays(seed, *shapes, positive=False):
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(s) for s in shapes]
    return [np.abs(a) + 0.5 for a in out] if positive else out


@given(n=dims, m=dims, seed=st.integers(0, 1000))
def test_elementwise_binary_with_broadcasting(n, m, seed):
    a, b, row, col = arrays(seed, (n, m), (n, m), (1, m), (n, 1))
    pos = np.abs(b) + 0.5
    assert gradcheck(lambda x, y: fg.Add.do_forward(x, y), a, row)
    assert gradcheck(lambda x, y: fg.Subtract.do_forward(x, y), col, a)
    assert gradcheck(lambda x, y: fg.Multiply.do_forward(x, y), a, b)
    assert gradcheck(lambda x, y: fg.Multiply.do_forward(x, y), row, col)
    assert gradcheck(lambda x, y: fg.Divide.do_forward(x, y), a, pos)


@given(n=dims, k=dims, m=dims, seed=st.integers(0, 1000))
def test_matrix_products(n, k, m, seed):
    a, b, w, bias = arrays(seed, (n, k), (k, m), (m, k), (1, m))
    assert gradcheck(lambda x, y: fg.MatrixMultiply.do_forward(x, y), a, b)
    assert gradcheck(lambda mat, vec: fg.BatchMM.do_forward(mat, vec), w, a)
    for activation in (None, 'relu', 'sigmoid', 'tanh'):
        assert gradcheck(lambda x, ww, bb: fg.LinearOp.do_forward(x, ww, bb, activation=activation), a, w, bias)
    batched = arrays(seed + 1, (2, n, k), (k, m))
    assert gradcheck(lambda x, y: fg.MatrixMultiply.do_forward(x, y), *batched)


@given(n=dims, m=dims, seed=st.integers(0, 1000))
def test_unary_and_shape_ops(n, m, seed):
    (a,) = arrays(seed, (n, m))
    (p,) = arrays(seed, (n, m), positive=True)
    a = a + np.sign(a) * 0.01  # keep relu's kink away from the finite-difference step
    for op in (fg.Exp, fg.Sigmoid, fg.ReLU, fg.Tanh, fg.Softmax, fg.LogSoftmax):
        assert gradcheck(lambda x: op.do_forward(x), a), op
    assert gradcheck(lambda x: fg.Log.do_forward(x), p)
    assert gradcheck(lambda x: fg.Normalize.do_forward(x), p)
    assert gradcheck(lambda x: fg.Sum.do_forward(x), a)
    assert gradcheck(lambda x: fg.Sum.do_forward(x, axis=0), a)
    assert gradcheck(lambda x: fg.Sum.do_forward(x, axis=1, keepdims=True), a)
    assert gradcheck(lambda x: fg.Reshape.do_forward(x, shape=(m, n)), a)
    assert gradcheck(lambda x: fg.Transpose.do_forward(x), a)
    assert gradcheck(lambda x: fg.Unsqueeze.do_forward(x, dim=1), a)
    assert gradcheck(lambda x: fg.Squeeze.do_forward(fg.Unsqueeze.do_forward(x, dim=0), dim=0), a)
    assert gradcheck(lambda x: fg.Expand.do_forward(fg.Sum.do_forward(x, axis=0, keepdims=True),
                                                    dim=0, repeats=3), a)
    targets = np.random.default_rng(seed).integers(0, m, n)
    assert gradcheck(lambda x: fg.Select.do_forward(x, indices=targets), a)
    assert gradcheck(lambda x: fg.cross_entropy(x, targets), a)
    assert gradcheck(lambda x: fg.cross_entropy(x, targets, reduction='sum'), a)
    assert gradcheck(lambda x: fg.celoss(fg.softmax(x), targets), a)
    assert gradcheck(lambda x: fg.logceloss(fg.logsoftmax(x), targets), a)


def test_three_dimensional_transpose_and_softmax():
    (a,) = arrays(3, (2, 3, 4))
    assert gradcheck(lambda x: fg.Transpose.do_forward(x, axes=(1, 2, 0)), a)
    assert gradcheck(lambda x: fg.Softmax.do_forward(x), a)
    assert gradcheck(lambda x: fg.LogSoftmax.do_forward(x), a)


def test_gradcheck_catches_a_wrong_backward():
    class WrongSquare(fg.Op):
        @staticmethod
        def forward(context, x):
            context['x'] = x
            return x * x

        @staticmethod
        def backward(context, go):
            return go * context['x']  # missing the factor 2

    with pytest.raises(fg.GradcheckError, match=r'input 0 element \(\d+,\): backward gives'):
        gradcheck(lambda x: WrongSquare.do_forward(x), np.array([1.0, 2.0, 3.0]))


def test_softmax_family_is_stable_for_huge_logits():
    x = fg.TensorNode(np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]]))
    for out in (fg.softmax(x), fg.logsoftmax(x), fg.cross_entropy(x, np.array([0, 2]))):
        assert np.isfinite(out.value).all()
    np.testing.assert_allclose(fg.softmax(x).value, [[1, 0, 0], [1 / 3] * 3])
    loss = fg.cross_entropy(x, np.array([1, 2]), reduction='sum')
    assert loss.value == pytest.approx(2e4 + np.log(3))
    loss.backward()
    assert np.isfinite(x.grad).all()


@given(n=dims, m=dims, seed=st.integers(0, 1000))
def test_indexing_reductions_and_powers(n, m, seed):
    """The ops behind TensorNode's indexing, mean, max, abs and ** (issue 14)."""
    a, b = arrays(seed, (n, m), (n, m))
    (p,) = arrays(seed + 1, (n, m), positive=True)
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, n, n + 2), rng.integers(0, m, n + 2)  # repeated: their gradients add up
    assert gradcheck(lambda x: x[0], a)
    assert gradcheck(lambda x: x[:, 1:] if m > 1 else x[:, :1], a)
    assert gradcheck(lambda x: x[rows], a)
    assert gradcheck(lambda x: x[rows, cols], a)
    assert gradcheck(lambda x: x[a > 0], a)
    assert gradcheck(lambda x: x[None, ..., -1], a)
    assert gradcheck(lambda x: x.mean(), a)
    assert gradcheck(lambda x: x.mean(axis=0), a)
    assert gradcheck(lambda x: x.mean(axis=(0, 1), keepdims=True), a)
    assert gradcheck(lambda x: x.max(), a)
    assert gradcheck(lambda x: x.max(axis=1), a)
    assert gradcheck(lambda x: x.max(axis=0, keepdims=True), a)
    away = a + np.sign(a) * 0.01  # keep |x|'s kink away from the finite-difference step
    assert gradcheck(lambda x: abs(x), away)
    assert gradcheck(lambda x: x ** 2, a)
    assert gradcheck(lambda x: x ** 3.5, p)
    assert gradcheck(lambda x, y: x ** y, p, b)
    assert gradcheck(lambda y: 2.0 ** y, b)
    assert gradcheck(lambda x: x ** -1, p)


def test_method_forms_of_the_elementwise_and_softmax_ops():
    (a,) = arrays(5, (3, 4))
    (p,) = arrays(6, (3, 4), positive=True)
    for method in ('exp', 'sigmoid', 'tanh', 'softmax', 'log_softmax'):
        assert gradcheck(lambda x: getattr(x, method)(), a), method
    assert gradcheck(lambda x: (a + np.sign(a) * 0.01 + x * 0).relu(), a)
    assert gradcheck(lambda x: x.log(), p)
    assert gradcheck(lambda x: x.softmax(axis=0), a)
    assert gradcheck(lambda x: x.log_softmax(0), a)
    (c,) = arrays(7, (2, 3, 4))
    assert gradcheck(lambda x: x.softmax(1), c)
    assert gradcheck(lambda x: fg.softmax(x, axis=0), c)
    assert gradcheck(lambda x: fg.logsoftmax(x, axis=-2), c)


def test_max_splits_the_gradient_between_ties_as_torch_amax():
    x = fg.TensorNode(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]]))
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 0.5, 0.5], [1, 0, 0]])


def test_repeated_indices_accumulate():
    x = fg.TensorNode(np.arange(4.0))
    x[np.array([0, 0, 3, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3, 0, 0, 1])
