"""The engine's two rules for an op's backward, built-in or a user's: the gradients it gets are its own to
modify, and a gradient of the wrong shape is an error unless the op broadcasts by design."""
import inspect

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import Op, TensorNode, conv, ops


class MaskReLU(Op):
    """relu as students write it: the mask is applied to the incoming gradient in place."""
    @staticmethod
    def forward(context, x):
        context['x'] = x
        return np.maximum(0, x)

    @staticmethod
    def backward(context, go):
        go[context['x'] <= 0] = 0
        return go


def test_an_op_editing_its_gradient_in_place_leaves_other_branches_alone():
    x1, x2 = TensorNode(np.array([[-1.0, 2.0]])), TensorNode(np.array([[0.5, 0.5]]))
    s = MaskReLU.do_forward(x1) + fg.Exp.do_forward(x2)  # Add hands one array to both branches
    fg.Sum.do_forward(s).backward()
    np.testing.assert_array_equal(x2.grad, np.exp([[0.5, 0.5]]))
    np.testing.assert_array_equal(x1.grad, [[0.0, 1.0]])
    np.testing.assert_array_equal(s.grad, [[1.0, 1.0]])


def test_edits_stay_private_between_several_editing_consumers_and_the_nodes_grad():
    x = TensorNode(np.array([-2.0, -1.0, 1.0, 2.0]))
    h = x * 1.0
    a = MaskReLU.do_forward(h)
    b = MaskReLU.do_forward(h * -1.0)
    loss = (a * 3.0 + b * 5.0).sum()
    loss.backward()
    np.testing.assert_array_equal(x.grad, [-5.0, -5.0, 3.0, 3.0])
    np.testing.assert_array_equal(a.grad, [3.0] * 4)  # the node's own gradient, not the edited copy
    np.testing.assert_array_equal(b.grad, [5.0] * 4)


def test_an_editing_op_may_write_into_a_read_only_gradient():
    """A read-only gradient from the op above (a broadcast view) reaches the editing op as a writable array."""
    class Broadcast(Op):
        @staticmethod
        def forward(context, x):
            return x * 1.0

        @staticmethod
        def backward(context, go):
            return np.broadcast_to(go, go.shape)  # read-only

    x = TensorNode(np.array([-1.0, 1.0]))
    Broadcast.do_forward(MaskReLU.do_forward(x)).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 1.0])


def test_a_subclass_with_its_own_backward_gets_copies_again():
    class StudentExp(fg.Exp):
        @staticmethod
        def backward(context, go):
            go *= context['expd']
            return go

    class QuietExp(fg.Exp):  # inherits backward, and the promise with it
        pass

    assert StudentExp.edits_goutputs and not QuietExp.edits_goutputs and not fg.Exp.edits_goutputs
    x1, x2 = TensorNode(np.array([-1.0, 2.0])), TensorNode(np.array([0.5, 0.5]))
    (StudentExp.do_forward(x1) + x2).sum().backward()
    np.testing.assert_array_equal(x2.grad, [1.0, 1.0])
    np.testing.assert_array_equal(x1.grad, np.exp([-1.0, 2.0]))


def builtin_cases(rng):
    """(op, input arrays, constants) for every built-in op, with inputs that keep each one in its domain."""
    m = rng.standard_normal((4, 3))
    pos = rng.uniform(0.5, 2.0, (4, 3))
    return [
        (ops.Add, [m, rng.standard_normal((1, 3))], {}), (ops.Subtract, [m, m[:1]], {}),
        (ops.Multiply, [m, pos], {}), (ops.Divide, [m, pos], {}),
        (ops.MatrixMultiply, [m, rng.standard_normal((3, 2))], {}),
        (ops.MatrixMultiply, [rng.standard_normal((2, 4, 3)), rng.standard_normal((3, 2))], {}),
        (ops.BatchMM, [rng.standard_normal((2, 3)), m], {}),
        *[(ops.Linear, [m, rng.standard_normal((2, 3)), rng.standard_normal((1, 2))], {'activation': act})
          for act in (None, 'relu', 'sigmoid', 'tanh')],
        (ops.Sum, [m], {}), (ops.Sum, [m], {'axis': 1}), (ops.Normalize, [pos], {}),
        (ops.Expand, [m[:1]], {'dim': 0, 'repeats': 4}), (ops.Select, [m], {'indices': np.array([0, 2, 1, 0])}),
        (ops.Squeeze, [m[:1]], {}), (ops.Unsqueeze, [m], {}), (ops.Reshape, [m], {'shape': (3, 4)}),
        (ops.Transpose, [m], {}), (ops.Exp, [m], {}), (ops.Log, [pos], {}), (ops.Sigmoid, [m], {}),
        (ops.ReLU, [m], {}), (ops.Tanh, [m], {}), (ops.Softmax, [m], {}), (ops.LogSoftmax, [m], {}),
        (ops.CrossEntropy, [m], {'targets': np.array([0, 2, 1, 0])}),
        (ops.Index, [m], {'key': (slice(None), np.array([0, 0, 2]))}), (ops.Index, [m], {'key': 1}),
        (ops.Mean, [m], {}), (ops.Mean, [m], {'axis': 0}), (ops.Max, [m], {'axis': 1}), (ops.Max, [m], {}),
        (ops.Abs, [m], {}), (ops.Power, [pos, m], {}),
        *[(conv.Conv2dOp, [rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((3, 2, 3, 2)), rng.standard_normal(3)],
           {'stride': 2, 'padding': 1, 'activation': act}) for act in (None, 'relu')],
        (conv.MaxPool2dOp, [rng.standard_normal((2, 2, 5, 4))], {'kernel_size': 2, 'stride': 1}),
        (conv.FlattenOp, [rng.standard_normal((2, 2, 3))], {}),
    ]


def test_every_builtin_op_promises_to_leave_its_gradient_alone_and_does(rng):
    builtins = {cls for module in (ops, conv) for _, cls in inspect.getmembers(module, inspect.isclass)
                if issubclass(cls, Op) and cls is not Op and cls.__module__ == module.__name__}
    cases = builtin_cases(rng)
    assert {op for op, _, _ in cases} >= {cls for cls in builtins if not cls.__name__.startswith('_')}
    for op, arrays, constants in cases:
        assert op.edits_goutputs is False, op.__name__
        out = op.do_forward(*map(TensorNode, arrays), **constants)
        go = rng.standard_normal(out.shape)
        before = go.copy()
        op.backward(out.source.context, go)
        np.testing.assert_array_equal(go, before, err_msg=op.__name__)


def test_builtin_ops_get_the_gradient_array_itself():
    """No copies for ops that leave their gradient alone: Exp's backward reads the array that is y.grad."""
    seen = []

    class SpyExp(fg.Exp):
        edits_goutputs = False

        @staticmethod
        def backward(context, go):
            seen.append(go)
            return fg.Exp.backward(context, go)

    x = TensorNode(np.arange(3.0))
    y = SpyExp.do_forward(x)
    (y * 2.0).sum().backward()
    assert seen[0] is y.grad_if_any


class StudentExpand(Op):
    """Expand whose backward forgets to sum over the expanded dimension: the course's question."""
    @staticmethod
    def forward(context, x, *, dim, repeats):
        return np.repeat(x, repeats, axis=dim)

    @staticmethod
    def backward(context, go):
        return go


def test_a_wrong_shaped_gradient_names_the_op_the_input_and_both_shapes():
    b = TensorNode(np.zeros((1, 3)))
    loss = StudentExpand.do_forward(b, dim=0, repeats=4).sum()
    with pytest.raises(ValueError, match=r'StudentExpand\.backward returned a gradient of shape \(4, 3\) for '
                                         r'input 0, which has shape \(1, 3\) \(StudentExpand does not broadcast'):
        loss.backward()


def test_a_scalar_gradient_for_a_one_element_input_is_still_a_wrong_shape():
    class Total(Op):
        @staticmethod
        def forward(context, x):
            return x.sum()

        @staticmethod
        def backward(context, go):
            return go  # shape (), for an input of shape (1, 1)

    with pytest.raises(ValueError, match=r'Total.*shape \(\) for input 0, which has shape \(1, 1\)'):
        Total.do_forward(TensorNode(np.ones((1, 1)))).backward()


def test_ops_that_broadcast_by_design_still_have_their_gradients_reduced():
    class Plus(Op):
        broadcasts = True

        @staticmethod
        def forward(context, a, b):
            return a + b

        @staticmethod
        def backward(context, go):
            return go, go

    class StudentAdd(fg.Add):  # a new backward, same forward: still broadcasts
        @staticmethod
        def backward(context, go):
            return go, go

    for op in (Plus, StudentAdd, fg.Add):
        a, b = TensorNode(np.ones((4, 3))), TensorNode(np.ones((1, 3)))
        op.do_forward(a, b).sum().backward()
        np.testing.assert_array_equal(b.grad, [[4.0, 4.0, 4.0]])
    assert {op for op in (ops.Add, ops.Subtract, ops.Multiply, ops.Divide, ops.MatrixMultiply) if op.broadcasts} \
        == {ops.Add, ops.Subtract, ops.Multiply, ops.Divide, ops.MatrixMultiply}
    assert not any(op.broadcasts for op in (ops.Expand, ops.Sum, ops.BatchMM, ops.Linear, ops.Select))


def test_batched_matmul_gradient_is_reduced_to_the_shared_matrix(rng):
    a, w = TensorNode(rng.standard_normal((2, 4, 3))), TensorNode(rng.standard_normal((3, 5)))
    (a @ w).sum().backward()
    np.testing.assert_allclose(w.grad, np.einsum('bij,bik->jk', a.value, np.ones((2, 4, 5))))
