"""Modules find their parameters; state dicts, saving, optimizers' state."""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import TensorNode


def test_mlp_parameters_in_layer_order():
    mlp = fg.MLP(4, 3, hidden=[5, 6], rng=0)
    shapes = [p.shape for p in mlp.parameters()]
    assert shapes == [(5, 4), (1, 5), (6, 5), (1, 6), (3, 6), (1, 3)]
    names = [n for n, _ in mlp.named_parameters()]
    assert names == ['layers.0.w', 'layers.0.b', 'layers.1.w', 'layers.1.b', 'layers.2.w', 'layers.2.b']
    assert all(p.dtype == np.float32 for p in mlp.parameters())
    assert fg.MLP(2, 2, hidden_mult=4).layers[0].w.shape == (8, 2)
    assert fg.MLP(2, 2, hidden=3, dtype=np.float64).layers[0].w.dtype == np.float64


def test_seeded_initialisation_is_reproducible():
    a, b = fg.MLP(4, 3, rng=5), fg.MLP(4, 3, rng=5)
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    assert not np.array_equal(fg.MLP(4, 3, rng=6).layers[0].w.value, a.layers[0].w.value)


def test_custom_module_finds_nodes_modules_and_lists():
    class Net(fg.Module):
        def __init__(self):
            self.scale = TensorNode(np.ones(1))
            self.data = TensorNode(np.ones(2), requires_grad=False)  # not a parameter
            self.blocks = [fg.Linear(2, 2, rng=0), fg.Linear(2, 1, rng=1)]
            self.head = fg.Sequential(fg.Linear(1, 1, rng=2), fg.relu)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x) * self.scale

    net = Net()
    assert [n for n, _ in net.named_parameters()] == [
        'scale', 'blocks.0.w', 'blocks.0.b', 'blocks.1.w', 'blocks.1.b', 'head.modules.0.w', 'head.modules.0.b']
    out = net(TensorNode(np.ones((3, 2), dtype=np.float32)))
    assert out.shape == (3, 1)


def test_state_dict_save_and_load(tmp_path):
    a, b = fg.MLP(4, 3, rng=1), fg.MLP(4, 3, rng=2)
    path = tmp_path / 'model.npz'
    a.save(path)
    w_before = b.layers[0].w.value
    b.load(path)
    assert b.layers[0].w.value is w_before  # loaded in place
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    assert [f.name for f in tmp_path.iterdir()] == ['model.npz']


def test_load_state_dict_errors(tmp_path):
    mlp = fg.MLP(4, 3, rng=1)
    state = mlp.state_dict()
    state['layers.0.w'] = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r'layers.0.w has shape \(2, 2\)'):
        mlp.load_state_dict(state)
    with pytest.raises(KeyError, match='missing'):
        mlp.load_state_dict({})
    bad = tmp_path / 'bad.npz'
    bad.write_bytes(b'not a zip file')
    with pytest.raises(ValueError, match='bad.npz'):
        mlp.load(bad)
    with pytest.raises(ValueError, match='MLP: activation must be one of'):
        fg.MLP(2, 2, activation='swish')


@pytest.mark.parametrize('make', [lambda p: fg.SGD(p, lr=0.1, momentum=0.9), lambda p: fg.Adam(p, lr=0.01)])
def test_optimizer_state_dict_round_trip(make, tmp_path):
    def train(mlp, opt, steps, rng):
        for _ in range(steps):
            x = TensorNode(rng.standard_normal((8, 3)).astype(np.float32), requires_grad=False)
            opt.zero_grad()
            fg.cross_entropy(mlp(x), rng.integers(0, 2, 8)).backward()
            opt.step()

    mlp = fg.MLP(3, 2, hidden=4, rng=0)
    opt = make(mlp.parameters())
    train(mlp, opt, 3, np.random.default_rng(0))
    fg.files.save_npz(tmp_path / 'opt.npz', opt.state_dict())
    mlp.save(tmp_path / 'mlp.npz')
    train(mlp, opt, 2, np.random.default_rng(1))

    mlp2 = fg.MLP(3, 2, hidden=4, rng=9)
    mlp2.load(tmp_path / 'mlp.npz')
    opt2 = make(mlp2.parameters())
    opt2.load_state_dict(fg.files.load_npz(tmp_path / 'opt.npz'))
    train(mlp2, opt2, 2, np.random.default_rng(1))
    for p, q in zip(mlp.parameters(), mlp2.parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    # loaded back into the optimizer that has been stepping: its state is the loaded one from then on
    mlp.load(tmp_path / 'mlp.npz')
    opt.load_state_dict(fg.files.load_npz(tmp_path / 'opt.npz'))
    train(mlp, opt, 2, np.random.default_rng(1))
    for p, q in zip(mlp.parameters(), mlp2.parameters()):
        np.testing.assert_array_equal(p.value, q.value)


def test_optimizer_follows_a_parameter_given_a_new_array():
    """The optimizer keeps flat views of each parameter between steps; a parameter whose array is
    replaced (node.value = ...) is updated in its new array, and its momentum goes on."""
    p = TensorNode(np.zeros(3))
    opt = fg.SGD([p], lr=0.5, momentum=0.5)
    p.grad = np.ones(3)
    opt.step()  # p = -0.5, buffer 1
    old = p.value
    p.value = np.full((3,), 10.0)
    p.grad = np.ones(3)
    opt.step()  # buffer 1.5
    np.testing.assert_array_equal(p.value, [9.25] * 3)
    np.testing.assert_array_equal(old, [-0.5] * 3)
    p.value = np.zeros((3,))[::-1]  # a view with negative strides is refused, not updated wrongly
    with pytest.raises(ValueError, match='parameter 0 must be a writeable contiguous array'):
        opt.step()
    p.value, p.grad = np.zeros(4), np.ones(4)  # so is an array its momentum buffer does not fit
    with pytest.raises(ValueError, match=r'parameter 0 has shape \(4,\), its momentum_buffer \(3,\)'):
        opt.step()
    p.value, p.grad = np.zeros(3), np.ones(2)  # and a gradient of another shape
    with pytest.raises(ValueError, match=r'parameter 0 has shape \(3,\), its gradient \(2,\)'):
        opt.step()


def test_optimizer_skips_parameters_without_gradient():
    a, b = TensorNode(np.ones(2)), TensorNode(np.ones(2))
    opt = fg.SGD([a, b], lr=0.5)
    (a * 2.0).sum().backward()
    opt.step()
    np.testing.assert_array_equal(a.value, [0.0, 0.0])
    np.testing.assert_array_equal(b.value, [1.0, 1.0])
    opt.zero_grad()
    assert not a.grad.any()


def test_sgd_hyperparameters_changed_between_steps_take_effect():
    """As with torch's lr schedules: opt.lr (and the others) may change between steps, also for a parameter
    of another dtype in the same optimizer."""
    a, b = TensorNode(np.ones(2)), TensorNode(np.ones(2, dtype=np.float32))
    opt = fg.SGD([a, b], lr=0.5)
    for lr, momentum, want in ((0.5, 0.0, 0.0), (0.0, 0.0, 0.0), (0.25, 0.0, -0.5), (0.25, 0.5, -1.0)):
        opt.lr, opt.momentum = lr, momentum
        opt.zero_grad()
        (a * 2.0 + b * 2.0).sum().backward()
        opt.step()
        np.testing.assert_array_equal(a.value, [want, want])
        np.testing.assert_array_equal(b.value, [want, want])


def test_linear_weight_layout_is_an_implementation_detail():
    """w is (out, in) as in vugrad and torch, stored column-major; a C-ordered w a user assigns gives the
    same outputs and gradients."""
    lin = fg.Linear(5, 3, dtype=np.float64, rng=0)
    assert lin.w.shape == (3, 5) and lin.w.value.flags.f_contiguous
    x = np.random.default_rng(1).standard_normal((4, 5))

    def grads(layer):
        xn = TensorNode(x)
        layer(xn, activation='tanh').sum().backward()
        return xn.grad, layer.w.grad, layer.b.grad

    other = fg.Linear(5, 3, dtype=np.float64)
    other.w.value = np.ascontiguousarray(lin.w.value)
    assert other.w.value.flags.c_contiguous and not other.w.value.flags.f_contiguous
    for got, want in zip(grads(other), grads(lin)):
        np.testing.assert_allclose(got, want, rtol=1e-13)


@pytest.mark.parametrize('make', [lambda p: fg.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                                  lambda p: fg.Adam(p, lr=0.01, weight_decay=0.1)])
def test_optimizers_update_any_memory_layout_alike(make):
    rng = np.random.default_rng(0)
    value = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(3)]
    layouts = [TensorNode(np.array(value, order='C')), TensorNode(np.array(value, order='F'))]
    for p in layouts:
        opt = make([p])
        for g in grads:  # the gradient always in the other layout than the parameter
            p.grad = np.asfortranarray(g) if p.value.flags.c_contiguous else np.ascontiguousarray(g)
            opt.step()
    np.testing.assert_allclose(layouts[0].value, layouts[1].value, rtol=1e-14)
    assert layouts[1].value.flags.f_contiguous
    with pytest.raises(ValueError, match='parameter 0 must be a writeable contiguous array'):
        strided = TensorNode(np.ones((4, 4)))
        strided.value = strided.value[:, ::2]
        strided.grad = np.ones((4, 2))
        fg.SGD([strided], lr=0.1).step()


def test_optimizer_loads_flat_buffers_of_older_checkpoints():
    """Checkpoints written before the weights went column-major kept flat momentum buffers in C order."""
    rng = np.random.default_rng(0)
    w = TensorNode(np.asfortranarray(rng.standard_normal((3, 4))))
    buf = rng.standard_normal((3, 4))
    opt = fg.SGD([w], lr=0.1, momentum=0.9)
    opt.load_state_dict({'lr': 0.1, 'momentum': 0.9, 'nesterov': False, 'weight_decay': 0.0,
                         'momentum_buffer.0': buf.reshape(-1)})
    before = w.value.copy()
    w.grad = np.ones((3, 4))
    opt.step()
    np.testing.assert_allclose(w.value, before - 0.1 * (0.9 * buf + 1), rtol=1e-14)
    np.testing.assert_allclose(opt.state_dict()['momentum_buffer.0'], 0.9 * buf + 1, rtol=1e-14)


@pytest.mark.parametrize('activation', ['relu', 'sigmoid'])
def test_sparse_input_path_gives_the_dense_gradients(activation, monkeypatch):
    """An MLP on a mostly-zero batch (as MNIST) takes the sparse kernels; its loss and gradients equal the
    dense kernels' in float64."""
    rng = np.random.default_rng(0)
    x = rng.random((64, 200))
    x[x < 0.85] = 0
    targets = rng.integers(0, 10, 64)
    seen = []
    decide = fg.ops.kernels.sparse_enough
    monkeypatch.setattr(fg.ops.kernels, 'sparse_enough', lambda a: seen.append(decide(a)) or seen[-1])

    def run():
        mlp = fg.MLP(200, 10, hidden=[32, 16], activation=activation, dtype=np.float64, rng=0)
        loss = fg.cross_entropy(mlp(TensorNode(x, requires_grad=False)), targets)
        loss.backward()
        return [loss.value] + [p.grad for p in mlp.parameters()]

    sparse = run()
    assert seen == [True]  # asked for the first layer only: the others' inputs need gradients
    monkeypatch.setattr(fg.ops.kernels, 'sparse_enough', lambda a: False)
    for got, want in zip(sparse, run()):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
