"""Conv2d, MaxPool2d and Flatten: finite differences, PyTorch's values and gradients, max-pool ties, LeNet
whole against PyTorch, and LeNet in `fastgrad train` (checkpoints, resume, log, plot)."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastgrad as fg
from fastgrad import TensorNode, gradcheck
from fastgrad.train import TrainConfig, train

try:
    import torch
    F = torch.nn.functional
except ImportError:  # the PyTorch comparisons skip
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason='torch is not installed')

small = st.integers(1, 3)
examples = settings(max_examples=15, deadline=None)


@st.composite
def conv_cases(draw, max_side=8):
    """(x shape, w shape, stride, padding) of a convolution whose output has at least one pixel: odd and
    even sides, kernels that are not square, strides and paddings per axis; 9 output channels take the
    backward kernel's other form of the weight-gradient product."""
    n, c, o = draw(small), draw(small), draw(st.sampled_from([1, 2, 3, 9]))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, min(2, kh - 1))), draw(st.integers(0, min(2, kw - 1))))
    h = draw(st.integers(max(1, kh - 2 * padding[0]), max_side))
    w = draw(st.integers(max(1, kw - 2 * padding[1]), max_side))
    return (n, c, h, w), (o, c, kh, kw), stride, padding


@st.composite
def pool_cases(draw, max_side=9):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    shape = (draw(small), draw(small), draw(st.integers(kh, max_side)), draw(st.integers(kw, max_side)))
    return shape, (kh, kw), stride


def weighted(node, rng):
    """sum(node * R) with a fixed random R: a loss in which every output element counts."""
    return (node * TensorNode(rng.standard_normal(node.shape), requires_grad=False)).sum()


# -- finite differences (float64)
@examples
@given(case=conv_cases(max_side=6), relu=st.booleans(), seed=st.integers(0, 1000))
def test_conv2d_gradcheck(case, relu, seed):
    xshape, wshape, stride, padding = case
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(xshape), rng.standard_normal(wshape), rng.standard_normal(wshape[0])
    act = 'relu' if relu else None
    assert gradcheck(lambda x_, w_, b_: fg.conv2d(x_, w_, b_, stride, padding, act), x, w, b)


@examples
@given(case=pool_cases(), seed=st.integers(0, 1000))
def test_max_pool2d_gradcheck(case, seed):
    shape, kernel, stride = case
    x = np.random.default_rng(seed).standard_normal(shape)
    assert gradcheck(lambda x_: fg.max_pool2d(x_, kernel, stride), x)


@examples
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_flatten_gradcheck(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    out = fg.flatten(TensorNode(x))
    assert out.shape == (shape[0], int(np.prod(shape[1:])))
    assert gradcheck(fg.flatten, x)


def test_conv2d_skips_the_input_gradient_of_data(rng):
    """Data (requires_grad=False) gets no gradient, and the weights' gradients are the same as with one."""
    x, w, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    grads = []
    for needs in (True, False):
        X, W, B = TensorNode(x, requires_grad=needs), TensorNode(w), TensorNode(b)
        y = fg.conv2d(X, W, B, 2, 1, 'relu')
        weighted(y, np.random.default_rng(0)).backward()
        grads.append((W.grad, B.grad))
        assert (X.grad_if_any is not None) == needs
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    np.testing.assert_array_equal(grads[0][1], grads[1][1])


def test_conv2d_weight_frozen_still_gives_the_input_gradient(rng):
    x, w, b = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    assert gradcheck(lambda x_: fg.conv2d(x_, TensorNode(w, requires_grad=False), TensorNode(b, requires_grad=False),
                                          1, 1), x)


def test_shape_errors_name_the_op():
    x = TensorNode(np.zeros((2, 3, 5, 5)))
    with pytest.raises(ValueError, match=r'Conv2d: input \(2, 3, 5, 5\).*weight \(4, 2, 3, 3\)'):
        fg.conv2d(x, TensorNode(np.zeros((4, 2, 3, 3))), TensorNode(np.zeros(4)))
    with pytest.raises(ValueError, match='Conv2d: a 7x7 kernel does not fit'):
        fg.conv2d(x, TensorNode(np.zeros((4, 3, 7, 7))), TensorNode(np.zeros(4)))
    with pytest.raises(ValueError, match='Conv2d: input must have 4 dimensions'):
        fg.conv2d(TensorNode(np.zeros((3, 5, 5))), TensorNode(np.zeros((4, 3, 3, 3))), TensorNode(np.zeros(4)))
    with pytest.raises(ValueError, match='Conv2d: stride must be an integer >= 1'):
        fg.conv2d(x, TensorNode(np.zeros((4, 3, 3, 3))), TensorNode(np.zeros(4)), stride=0)
    with pytest.raises(ValueError, match='MaxPool2d: a 6x6 window does not fit'):
        fg.max_pool2d(x, 6)
    with pytest.raises(ValueError, match='LeNet: image_size must be at least 12'):
        fg.LeNet(image_size=8)


# -- PyTorch
def _torch_conv(x, w, b, stride, padding, relu, g):
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
    if relu:
        ty = torch.relu(ty)
    (ty * torch.tensor(g)).sum().backward()
    return [t.detach().numpy() for t in (ty, tx.grad, tw.grad, tb.grad)]


@needs_torch
@examples
@given(case=conv_cases(max_side=10), relu=st.booleans(), seed=st.integers(0, 1000))
def test_conv2d_values_and_gradients_equal_torch(case, relu, seed):
    xshape, wshape, stride, padding = case
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):
        rng = np.random.default_rng(seed)
        x, w, b = (rng.standard_normal(s).astype(dtype) for s in (xshape, wshape, wshape[:1]))
        X, W, B = TensorNode(x), TensorNode(w), TensorNode(b)
        y = fg.conv2d(X, W, B, stride, padding, 'relu' if relu else None)
        g = rng.standard_normal(y.shape).astype(dtype)
        (y * TensorNode(g, requires_grad=False)).sum().backward()
        expected = _torch_conv(x, w, b, stride, padding, relu, g)
        for name, ours, theirs in zip(('y', 'dx', 'dw', 'db'), (y.value, X.grad, W.grad, B.grad), expected):
            assert ours.dtype == dtype, name
            np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol, err_msg=f'{name} {np.dtype(dtype).name}')


@needs_torch
@examples
@given(case=pool_cases(max_side=11), seed=st.integers(0, 1000), ties=st.booleans())
def test_max_pool2d_values_and_gradients_equal_torch(case, seed, ties):
    shape, kernel, stride = case
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape).astype(dtype)
        if ties:  # few distinct values: most windows hold their maximum more than once
            x = np.round(x).astype(dtype)
        X = TensorNode(x)
        y = fg.max_pool2d(X, kernel, stride)
        g = rng.standard_normal(y.shape).astype(dtype)
        (y * TensorNode(g, requires_grad=False)).sum().backward()
        tx = torch.tensor(x, requires_grad=True)
        ty = F.max_pool2d(tx, kernel, stride)
        (ty * torch.tensor(g)).sum().backward()
        np.testing.assert_allclose(y.value, ty.detach().numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(X.grad, tx.grad.numpy(), rtol=tol, atol=tol)
        assert y.dtype == X.grad.dtype == dtype


def test_max_pool2d_ties_go_to_the_first_maximum_in_row_major_order():
    x = np.array([[[[1.0, 3.0, 3.0, 0.0],
                    [3.0, 2.0, 3.0, 3.0],
                    [5.0, 5.0, 2.0, 2.0],
                    [5.0, 5.0, 2.0, 2.0]]]])
    X = TensorNode(x)
    y = fg.max_pool2d(X, 2)
    np.testing.assert_array_equal(y.value, [[[[3.0, 3.0], [5.0, 2.0]]]])
    y.sum().backward()
    np.testing.assert_array_equal(X.grad, [[[[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]]])
    # overlapping windows (stride 1) that share their maximum add up there
    X = TensorNode(np.ones((1, 1, 3, 3)))
    fg.max_pool2d(X, 2, 1).sum().backward()
    np.testing.assert_array_equal(X.grad, [[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]])


def test_max_pool2d_propagates_nan():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = np.nan
    X = TensorNode(x)
    y = fg.max_pool2d(X, 2)
    assert np.isnan(y.value[0, 0, 0, 0]) and y.value[0, 0, 1, 1] == 15
    y.sum().backward()
    assert X.grad[0, 0, 0, 0] == 1 and X.grad[0, 0, 1, 1] == 0


def torch_lenet(model):
    """The same network in PyTorch, with model's weights (float64)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(),
        torch.nn.Linear(84, 10)).double()
    layers = [m for m in net if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    ours = [model.conv1, model.conv2, model.fc1, model.fc2, model.fc3]
    with torch.no_grad():
        for t, m in zip(layers, ours):
            t.weight.copy_(torch.from_numpy(np.asarray(m.w.value, dtype=np.float64)))
            t.bias.copy_(torch.from_numpy(np.asarray(m.b.value, dtype=np.float64).reshape(-1)))
    return net, layers


@needs_torch
@pytest.mark.parametrize('policy', ['auto', 'blas'])
@pytest.mark.parametrize('dtype, tol', [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_lenet_loss_and_every_gradient_equal_torch(dtype, tol, policy, rng):
    """Under 'auto' the images are split over numba's threads; under 'blas' they run in one loop (no
    parallel region) with BLAS on its own threads."""
    from fastgrad.backend import threads_restored
    with threads_restored():
        fg.set_threads(policy)
        _lenet_equals_torch(dtype, tol, rng)


def _lenet_equals_torch(dtype, tol, rng):
    model = fg.LeNet(dtype=dtype, rng=5)
    for p in model.parameters():  # nonzero biases, so that their part of the maths is checked too
        p.value[...] += (0.1 * rng.standard_normal(p.shape)).astype(dtype)
    net, layers = torch_lenet(model)
    x = rng.uniform(0, 1, (9, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, 9)
    loss = fg.cross_entropy(model(TensorNode(x, requires_grad=False)), y)
    loss.backward()
    tloss = F.cross_entropy(net(torch.from_numpy(x.astype(np.float64))), torch.from_numpy(y))
    tloss.backward()
    assert abs(float(loss.value) - tloss.item()) < tol
    ours = [m for layer in (model.conv1, model.conv2, model.fc1, model.fc2, model.fc3) for m in (layer.w, layer.b)]
    theirs = [p for t in layers for p in (t.weight, t.bias)]
    assert len(ours) == len(model.parameters()) == 10
    for p, tp in zip(ours, theirs):
        assert p.grad.dtype == dtype
        np.testing.assert_allclose(p.grad.reshape(tp.shape), tp.grad.numpy(), rtol=tol, atol=tol)


def test_lenet_is_a_sequential_too(rng):
    model = fg.LeNet(dtype=np.float64, rng=1)
    seq = fg.Sequential(fg.Conv2d(1, 6, 5, padding=2, dtype=np.float64), fg.relu, fg.MaxPool2d(2),
                        fg.Conv2d(6, 16, 5, dtype=np.float64), fg.relu, fg.MaxPool2d(2), fg.Flatten(),
                        fg.Linear(400, 120, dtype=np.float64), fg.relu, fg.Linear(120, 84, dtype=np.float64), fg.relu,
                        fg.Linear(84, 10, dtype=np.float64))
    assert len(seq.parameters()) == len(model.parameters()) == 10
    assert seq.num_parameters() == model.num_parameters() == 61_706  # LeNet-5's count
    for p, q in zip(seq.parameters(), model.parameters()):
        p.value[...] = q.value
    x, y = rng.uniform(0, 1, (4, 1, 28, 28)), rng.integers(0, 10, 4)
    losses = []
    for net in (model, seq):
        loss = fg.cross_entropy(net(TensorNode(x, requires_grad=False)), y)
        loss.backward()
        losses.append(float(loss.value))
    assert losses[0] == pytest.approx(losses[1], abs=1e-12)
    for p, q in zip(seq.parameters(), model.parameters()):
        np.testing.assert_allclose(p.grad, q.grad, atol=1e-12)


def test_torch_init_is_uniform_within_one_over_root_fan_in():
    model = fg.LeNet(rng=0)
    for layer, fan_in in ((model.conv1, 25), (model.conv2, 150), (model.fc1, 400), (model.fc2, 120), (model.fc3, 84)):
        for p in (layer.w.value, layer.b.value):
            assert np.abs(p).max() <= 1 / np.sqrt(fan_in) and np.abs(p).max() > 0.8 / np.sqrt(fan_in)
    assert model.fc1.w.value.flags.f_contiguous  # Linear's layout is kept
    he = fg.LeNet(rng=0, init='he')
    assert not he.conv1.b.value.any() and he.conv1.w.value.std() > 0.2
    with pytest.raises(ValueError, match='init'):
        fg.LeNet(init='glorot')


def test_lenet_state_dict_round_trip(tmp_path):
    a, b = fg.LeNet(rng=0), fg.LeNet(rng=1)
    a.save(tmp_path / 'lenet.npz')
    b.load(tmp_path / 'lenet.npz')
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    assert set(a.state_dict()) == {f'{layer}.{p}' for layer in ('conv1', 'conv2', 'fc1', 'fc2', 'fc3') for p in 'wb'}


# -- training
def tiny_images(n_train=96, n_val=32, seed=0):
    """Two classes told apart by where the bright square is: LeNet learns it in a few epochs."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 2, n)
        x = rng.uniform(0, 0.2, (n, 1, 28, 28)).astype(np.float32)
        for i, label in enumerate(y):
            r = 4 if label else 18
            x[i, 0, r:r + 6, r:r + 6] += 0.8
        return x, y.astype(np.int64)

    return make(n_train), make(n_val), 2


def test_train_lenet_learns():
    config = TrainConfig(dataset='mnist', model='lenet', epochs=3, batch_size=8)
    # each model's defaults for what is left at None
    assert (config.lr, config.schedule) == (0.05, 'cosine') and config.batch_size == 8
    assert (TrainConfig(model='lenet').batch_size, TrainConfig().batch_size) == (64, 128)
    assert (TrainConfig().lr, TrainConfig().schedule) == (0.01, 'constant')
    summary = train(config, data=tiny_images())
    assert isinstance(summary['model'], fg.LeNet)
    assert summary['final_accuracy'] == 1.0


def test_train_lenet_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path):
    data = tiny_images()
    config = TrainConfig(dataset='mnist', model='lenet', epochs=3, batch_size=8, seed=2)  # batch 8 as above: one compiled step
    whole = train(config, data=data)
    train(TrainConfig(**{**config.__dict__, 'epochs': 1}), data=data, checkpoint=tmp_path)
    resumed = train(config, data=data, checkpoint=tmp_path, resume=True)
    assert [r['train_loss'] for r in resumed['history']] == [r['train_loss'] for r in whole['history']]
    for p, q in zip(whole['model'].parameters(), resumed['model'].parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    with pytest.raises(ValueError, match='different settings .*model'):
        train(TrainConfig(dataset='mnist', epochs=3, batch_size=8, seed=2, lr=0.05), data=(
            (data[0][0].reshape(96, -1), data[0][1]), (data[1][0].reshape(32, -1), data[1][1]), 2),
            checkpoint=tmp_path, resume=True)


def test_lenet_needs_images():
    with pytest.raises(ValueError, match='--model lenet needs images'):
        train(TrainConfig(dataset='synth', model='lenet', epochs=1))
    with pytest.raises(ValueError, match='--hidden'):
        train(TrainConfig(dataset='mnist', model='lenet', hidden=[10], epochs=1), data=tiny_images())


@pytest.mark.slow
def test_cli_train_lenet_on_idx_images_with_log_plot_and_checkpoint(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    from fastgrad import cli
    from test_data import make_idx_dataset
    make_idx_dataset(tmp_path / 'idx', n_train=64, n_test=16)
    log, plot, ck = tmp_path / 'log.jsonl', tmp_path / 'curves.png', tmp_path / 'ck'
    # a step schedule of a set size, since resuming with more epochs would change a cosine schedule's rates
    args = ['train', '-D', 'mnist', '--model', 'lenet', '--data-dir', str(tmp_path / 'idx'), '--final', '-e', '2',
            '-b', '32', '--schedule', 'step', '--step-size', '1', '--log', str(log), '--plot', str(plot),
            '--checkpoint', str(ck), '--no-progress']
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert 'epoch 001' in out and 'best accuracy' in out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1] and records[0]['lr'] == 0.05
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert cli.main(args[:-1] + ['-e', '3', '--resume', '--no-progress']) == 0
    assert [json.loads(line)['epoch'] for line in log.read_text().splitlines()] == [0, 1, 2]
