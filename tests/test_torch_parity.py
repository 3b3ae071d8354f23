"""Losses, gradients and optimizer trajectories equal PyTorch's (skipped where torch is absent)."""
import numpy as np
import pytest

import fastgrad as fg

torch = pytest.importorskip('torch')


@pytest.fixture(autouse=True, scope='module')
def torch_float64_by_default():
    """torch's modules in float64 in this file's tests, and back to torch's default for the other files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def torch_mlp(mlp, activation):
    layers = []
    for k, layer in enumerate(mlp.layers):
        lin = torch.nn.Linear(layer.w.shape[1], layer.w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(layer.w.value))
            lin.bias.copy_(torch.from_numpy(layer.b.value.reshape(-1)))
        layers.append(lin)
        if k < len(mlp.layers) - 1:
            layers.append({'relu': torch.nn.ReLU, 'sigmoid': torch.nn.Sigmoid, 'tanh': torch.nn.Tanh}[activation]())
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize('activation', ['sigmoid', 'relu', 'tanh'])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_mlp_loss_and_gradients_equal_torch(activation, reduction, rng):
    mlp = fg.MLP(7, 4, hidden=[9, 5], activation=activation, dtype=np.float64, rng=3)
    net = torch_mlp(mlp, activation)
    x = rng.standard_normal((11, 7))
    y = rng.integers(0, 4, 11)
    loss = fg.cross_entropy(mlp(fg.TensorNode(x, requires_grad=False)), y, reduction=reduction)
    loss.backward()
    tloss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y), reduction=reduction)
    tloss.backward()
    assert abs(loss.value - tloss.item()) < 1e-8
    tparams = [p for m in net if isinstance(m, torch.nn.Linear) for p in (m.weight, m.bias)]
    for p, tp in zip(mlp.parameters(), tparams):
        np.testing.assert_allclose(p.grad.reshape(tp.shape), tp.grad.numpy(), atol=1e-8, rtol=0)


def test_functions_equal_torch(rng):
    x = rng.standard_normal((6, 5)) * 30
    xt = torch.from_numpy(x)
    node = fg.TensorNode(x)
    np.testing.assert_allclose(fg.softmax(node).value, torch.softmax(xt, -1).numpy(), atol=1e-12)
    np.testing.assert_allclose(fg.logsoftmax(node).value, torch.log_softmax(xt, -1).numpy(), atol=1e-10)
    np.testing.assert_allclose(fg.sigmoid(node).value, torch.sigmoid(xt).numpy(), atol=1e-12)
    np.testing.assert_allclose(fg.tanh(node).value, torch.tanh(xt).numpy(), atol=1e-12)
    np.testing.assert_allclose(fg.relu(node).value, torch.relu(xt).numpy())


def run_trajectory(make_fg, make_torch, steps=5):
    rng = np.random.default_rng(7)
    w0, x = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    w = fg.TensorNode(w0.copy())
    opt = make_fg([w])
    wt = torch.tensor(w0.copy(), requires_grad=True)
    topt = make_torch([wt])
    for _ in range(steps):
        opt.zero_grad()
        (fg.tanh(fg.TensorNode(x, requires_grad=False) @ w.T) * fg.TensorNode(x[:, :3], requires_grad=False)).sum().backward()
        opt.step()
        topt.zero_grad()
        (torch.tanh(torch.from_numpy(x) @ wt.T) * torch.from_numpy(x[:, :3])).sum().backward()
        topt.step()
        np.testing.assert_allclose(w.value, wt.detach().numpy(), atol=1e-10, rtol=0)
    return opt


@pytest.mark.parametrize('kwargs', [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.8, nesterov=True),
                                    dict(lr=0.05, momentum=0.5, weight_decay=0.01)])
def test_sgd_matches_torch(kwargs):
    run_trajectory(lambda p: fg.SGD(p, **kwargs), lambda p: torch.optim.SGD(p, **kwargs))


@pytest.mark.parametrize('kwargs', [dict(), dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6), dict(lr=0.02, weight_decay=0.1)])
def test_adam_matches_torch(kwargs):
    run_trajectory(lambda p: fg.Adam(p, **kwargs), lambda p: torch.optim.Adam(p, **kwargs))


def test_indexing_reductions_powers_and_methods_equal_torch(rng):
    """The tensor methods a PyTorch user types first (issue 14): values and gradients equal torch's."""
    x = rng.standard_normal((5, 4))
    e = rng.standard_normal((5, 4))
    pos = np.abs(x) + 0.5
    rows = np.array([0, 2, 2, 4, 0])
    cases = [
        (lambda t: t[1], lambda t: t[1]),
        (lambda t: t[:, 1:], lambda t: t[:, 1:]),
        (lambda t: t[rows], lambda t: t[torch.from_numpy(rows)]),
        (lambda t: t[rows, rows % 4], lambda t: t[torch.from_numpy(rows), torch.from_numpy(rows % 4)]),
        (lambda t: t[x > 0], lambda t: t[torch.from_numpy(x > 0)]),
        (lambda t: t.mean(), lambda t: t.mean()),
        (lambda t: t.mean(axis=0), lambda t: t.mean(dim=0)),
        (lambda t: t.mean(axis=1, keepdims=True), lambda t: t.mean(dim=1, keepdim=True)),
        (lambda t: t.max(), lambda t: t.amax()),
        (lambda t: t.max(axis=1), lambda t: t.amax(dim=1)),
        (lambda t: abs(t), lambda t: abs(t)),
        (lambda t: t ** 2, lambda t: t ** 2),
        (lambda t: t ** 3, lambda t: t ** 3),
        (lambda t: 2.0 ** t, lambda t: 2.0 ** t),
        (lambda t: t.exp(), lambda t: t.exp()),
        (lambda t: t.sigmoid(), lambda t: t.sigmoid()),
        (lambda t: t.relu(), lambda t: t.relu()),
        (lambda t: t.tanh(), lambda t: t.tanh()),
        (lambda t: t.softmax(0), lambda t: t.softmax(0)),
        (lambda t: t.softmax(axis=-1), lambda t: t.softmax(-1)),
        (lambda t: t.log_softmax(0), lambda t: t.log_softmax(0)),
    ]
    for ours, theirs in cases:
        node, tx = fg.TensorNode(x), torch.tensor(x, requires_grad=True)
        out, tout = ours(node), theirs(tx)
        np.testing.assert_allclose(out.value, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
        weights = rng.standard_normal(out.shape)
        (out * weights).sum().backward()
        (tout * torch.from_numpy(weights)).sum().backward()
        np.testing.assert_allclose(node.grad, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    # log of a positive input, and a node as the exponent (both gradients)
    a, b = fg.TensorNode(pos), fg.TensorNode(e)
    ta, tb = torch.tensor(pos, requires_grad=True), torch.tensor(e, requires_grad=True)
    (a.log() + a ** b).sum().backward()
    (ta.log() + ta ** tb).sum().backward()
    np.testing.assert_allclose(a.grad, ta.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(b.grad, tb.grad.numpy(), rtol=1e-12)
    # the edge cases torch defines: 0 ** y and x ** 0
    base, expo = fg.TensorNode(np.array([0.0, 0.0, 2.0])), fg.TensorNode(np.array([2.0, 0.0, 0.0]))
    tbase, texpo = torch.tensor([0.0, 0.0, 2.0], requires_grad=True), torch.tensor([2.0, 0.0, 0.0], requires_grad=True)
    (base ** expo).sum().backward()
    (tbase ** texpo).sum().backward()
    np.testing.assert_array_equal(base.grad, tbase.grad.numpy())
    np.testing.assert_array_equal(expo.grad, texpo.grad.numpy())
    # ties in max split the gradient evenly, as torch.amax
    tied = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    node, tx = fg.TensorNode(tied), torch.tensor(tied, requires_grad=True)
    node.max(axis=1).sum().backward()
    tx.amax(dim=1).sum().backward()
    np.testing.assert_array_equal(node.grad, tx.grad.numpy())
    # comparisons: plain boolean arrays, as torch's boolean tensors hold
    node = fg.TensorNode(x)
    for compare in (lambda t: t > 0, lambda t: t <= 0.5, lambda t: t == x[0, 0], lambda t: t != 0):
        np.testing.assert_array_equal(compare(node), compare(torch.from_numpy(x)).numpy())
