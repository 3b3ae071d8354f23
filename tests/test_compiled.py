"""fastgrad.compile: the compiled step does what the eager step does, or refuses at trace time."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import TensorNode, backend
from fastgrad import compiled as compiled_module
from fastgrad.compiled import TraceError
from fastgrad.train import training_step


def dataset(kind, dtype, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    if kind == 'synth':
        (x, y), _, classes = fg.load_synth(num_train=n, num_val=1, seed=seed, dtype=dtype)
        return x, y, classes
    if kind == 'mixed':  # a layer for BLAS, then one small enough to be written out as loops
        x = rng.standard_normal((n, 20)).astype(dtype)
        return x, (x[:, 0] * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5), 3
    x = rng.random((n, 784)).astype(dtype)  # sparse, mnist: 19 % nonzero, so the first layer takes the sparse path
    x[rng.random(x.shape) > 0.19] = 0
    return x, rng.integers(0, 10, n), 10


def make(kind, activation, optimizer, dtype, classes, features):
    hidden = {'synth': [16], 'mnist': [300]}.get(kind, [64])  # mnist: the 784-300-10
    model = fg.MLP(features, classes, hidden=hidden, activation=activation, dtype=dtype, rng=0)
    if optimizer == 'sgd':
        opt = fg.SGD(model.parameters(), lr=0.05, momentum=0.9)
    elif optimizer == 'nesterov':
        opt = fg.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        opt = fg.Adam(model.parameters(), lr=0.01)

    def step(xb, yb):
        opt.zero_grad()
        loss = fg.cross_entropy(model(TensorNode(xb, requires_grad=False)), yb)
        loss.backward()
        opt.step()
        return loss
    return model, opt, step


def assert_close(got, want, rtol):
    """Equal to rtol relative to the array's scale (its largest magnitude); rtol 0: bit for bit."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    if rtol == 0 or got.dtype.kind != 'f':
        np.testing.assert_array_equal(got, want)
    else:
        assert np.abs(got - want).max(initial=0) <= rtol * np.abs(want).max(initial=0), (got, want)


def assert_same_training(a, b, rtol):
    (ma, oa), (mb, ob) = a, b
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert_close(q.value, p.value, rtol)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert_close(sb[key], sa[key], rtol)


# Through the BLAS kernels relu runs the same kernels in the same order as eager: bit for bit; sigmoid and
# tanh get exp/tanh from numpy's SIMD loops in eager ops and from libm in compiled code, an ulp apart, which
# 200 float32 steps grow to about 1e-6 (1.2e-5 under Adam, whose normalised steps carry tiny differences). The synth MLP's layers are small enough to be written out as loops
# (LOOP_MAX_WEIGHT), which sum over the batch in another order: float32 within about 3e-6 of an array's scale
# after 200 steps (1e-5 here), float64 within 1e-14 (1e-12 here).
CASES = [
    pytest.param('sparse', 'relu', 'sgd', np.float32, 0, 'blas', id='sparse-relu-sgd-f32'),
    pytest.param('synth', 'relu', 'sgd', np.float32, 1e-5, 'loops', id='synth-relu-sgd-f32-loops'),
    pytest.param('synth', 'sigmoid', 'adam', np.float64, 1e-6, 'loops', id='synth-sigmoid-adam-f64-loops'),
    pytest.param('synth', 'relu', 'adam', np.float32, 0, 'blas', id='synth-relu-adam-f32-blas'),
    pytest.param('synth', 'tanh', 'nesterov', np.float32, 1e-5, 'loops', id='synth-tanh-nesterov-f32-loops',
                 marks=pytest.mark.slow),
    pytest.param('sparse', 'sigmoid', 'adam', np.float32, 3e-5, 'blas', id='sparse-sigmoid-adam-f32',
                 marks=pytest.mark.slow),
    pytest.param('synth', 'relu', 'adam', np.float64, 0, 'blas', id='synth-relu-adam-f64-blas', marks=pytest.mark.slow),
    pytest.param('synth', 'relu', 'adam', np.float64, 1e-12, 'loops', id='synth-relu-adam-f64-loops',
                 marks=pytest.mark.slow),
    pytest.param('mixed', 'tanh', 'sgd', np.float32, 1e-5, 'loops', id='mixed-tanh-sgd-f32-loops',
                 marks=pytest.mark.slow),
    pytest.param('mnist', 'relu', 'adam', np.float64, 0, 'blas', id='mnist-relu-adam-f64', marks=pytest.mark.slow),
    pytest.param('mnist', 'tanh', 'sgd', np.float64, 1e-12, 'blas', id='mnist-tanh-sgd-f64', marks=pytest.mark.slow),
    pytest.param('mnist', 'sigmoid', 'sgd', np.float32, 1e-5, 'blas', id='mnist-sigmoid-sgd-f32',
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize('kind, activation, optimizer, dtype, rtol, layers', CASES)
def test_compiled_steps_equal_eager_steps(kind, activation, optimizer, dtype, rtol, layers, monkeypatch):
    if layers == 'blas':
        monkeypatch.setattr(compiled_module, 'LOOP_MAX_WEIGHT', 0)
    x, y, classes = dataset(kind, dtype)
    eager, compiled = (make(kind, activation, optimizer, dtype, classes, x.shape[1]) for _ in range(2))
    step = fg.compile(compiled[2])
    order = np.random.default_rng(1).permutation(len(x))
    for k in range(200):
        idx = order[(k * 64) % 1920:(k * 64) % 1920 + 64]
        want = eager[2](x[idx], y[idx])
        got = step(x[idx], y[idx])
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == ()
        np.testing.assert_allclose(got, want.value, rtol=max(rtol, 1e-12) * 10)
    assert len(step.programs) == 1  # traced once
    assert_same_training(eager[:2], compiled[:2], rtol)
    for p, q in zip(eager[0].parameters(), compiled[0].parameters()):  # .grad as the eager step leaves it
        assert_close(q.grad, p.grad, rtol * 100)
    program = step.programs[next(iter(step.programs))]
    loop_layers = {'blas': 0, 'loops': 1 if kind == 'mixed' else 2}[layers]  # mixed: 20-64 by BLAS, 64-3 loops
    assert program.loop_layers == loop_layers
    if kind in ('sparse', 'mnist'):
        assert program.has_sparse


def test_run_is_the_loop_of_steps_with_a_short_last_batch():
    x, y, classes = dataset('synth', np.float32, n=1000)
    a, b, c = (make('synth', 'relu', 'sgd', np.float32, classes, 2) for _ in range(3))
    order = np.random.default_rng(3).permutation(len(x))
    want = [float(a[2](x[order[i:i + 128]], y[order[i:i + 128]]).value) for i in range(0, 1000, 128)]
    step_b, step_c = fg.compile(b[2]), fg.compile(c[2])
    got = [float(step_b(x[order[i:i + 128]], y[order[i:i + 128]])) for i in range(0, 1000, 128)]
    ran = step_c.run(x, y, 128, order)
    assert ran.tolist() == got  # the same generated step, in one call or one call a batch
    np.testing.assert_allclose(got, want, rtol=1e-6)  # small layers as loops: eager to rounding
    assert len(step_c.programs) == 2  # the full batches and the last one (104 rows), each traced once
    assert_same_training(b[:2], c[:2], 0)
    assert_same_training(a[:2], c[:2], 1e-5)
    again = step_c.run(x, y, 128)  # in sequence, with nothing new to trace
    assert len(again) == 8 and len(step_c.programs) == 2
    for outside in (np.arange(1, 1001), np.r_[np.arange(999), -1]):  # numpy would take row -1 as the last
        with pytest.raises(ValueError, match='order holds row indices outside'):
            step_c.run(x, y, 128, outside)
    with pytest.raises(ValueError, match='batch_size must be a positive integer'):
        step_c.run(x, y, 0)


def test_run_gathers_big_batches_on_numbas_threads():
    """A batch of 64k values or more is gathered by the parallel kernel when numba owns the cores: the same
    losses and parameters as one call a batch, and eager's (relu through BLAS: bit for bit)."""
    x, y, classes = dataset('sparse', np.float32, n=600)
    a, b, c = (make('sparse', 'relu', 'sgd', np.float32, classes, 784) for _ in range(3))
    order = np.random.default_rng(4).permutation(len(x))
    with backend.threads_restored():
        fg.set_threads('numba')
        want = [float(a[2](x[order[i:i + 128]], y[order[i:i + 128]]).value) for i in range(0, 600, 128)]
        step_b, step_c = fg.compile(b[2]), fg.compile(c[2])
        got = [float(step_b(x[order[i:i + 128]], y[order[i:i + 128]])) for i in range(0, 600, 128)]
        ran = step_c.run(x, y, 128, order)
    with open(step_c.programs[next(iter(step_c.programs))].source) as f:
        source = f.read()
    assert '_gather_rows(xf, order' in source and '_gather_rows(yf' not in source
    assert ran.tolist() == got == want
    assert_same_training(b[:2], c[:2], 0)
    assert_same_training(a[:2], c[:2], 0)


@pytest.mark.parametrize('optimizer, dtype', [('sgd', np.float32), ('nesterov', np.float64), ('adam', np.float32),
                                              pytest.param('adam', np.float64, marks=pytest.mark.slow)])
def test_without_grads_the_sparse_update_is_fused_and_equals_eager(optimizer, dtype):
    """compile(fn, keep_grads=False): the first layer's update takes its gradient row by row inside the
    sparse kernel; on sparse batches and on the dense ones between them (each branch picked per call),
    parameters and optimizer state equal eager's bit for bit, and every gradient is left cleared."""
    x, y, classes = dataset('sparse', dtype, n=1040)
    dense = np.arange(len(x)) % 384 >= 256  # every third batch of 128 rows takes the dense path
    x[dense] = np.random.default_rng(5).random((dense.sum(), 784)) + 0.5
    eager, kept, fused = (make('sparse', 'relu', optimizer, dtype, classes, 784) for _ in range(3))
    step_kept, step_fused = fg.compile(kept[2]), fg.compile(fused[2], keep_grads=False)
    for start in range(0, 512, 128):
        batch = slice(start, start + 128)
        want = eager[2](x[batch], y[batch]).value
        assert fg.kernels.sparse_enough(x[batch]) == (start != 256)
        assert step_kept(x[batch], y[batch]) == want == step_fused(x[batch], y[batch])
    assert all(p.grad_if_any is None for p in fused[0].parameters())
    assert all(p.grad_if_any is not None for p in kept[0].parameters())
    ran = step_fused.run(x[512:], y[512:], 128)  # a whole epoch in one call, and the short last batch
    for start in range(512, 1040, 128):
        eager[2](x[start:start + 128], y[start:start + 128])
    assert len(ran) == 5 and all(p.grad_if_any is None for p in fused[0].parameters())
    assert_same_training(eager[:2], fused[:2], 0)
    with open(step_fused.programs[((128, 784), np.dtype(dtype)), ((128,), y.dtype)].source) as f:
        source = f.read()
    assert '_sparse_weight_grad_update(' in source and '_sparse_weight_grad(' not in source
    with pytest.raises(TypeError, match="keep_grads must be True or False, got 'no'"):
        fg.compile(fused[2], keep_grads='no')


def off_cache_line(a):
    """A copy of the parameter array a, laid out as a, whose data starts 16 bytes past a cache line (where
    numpy puts big arrays)."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + 16
    t = raw[start:start + a.nbytes].view(a.dtype).reshape(a.T.shape)  # C order: a is F-ordered
    t[...] = a.T
    return t.T


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_a_compiled_epoch_runs_the_fused_weight_on_rows_padded_to_cache_lines(optimizer):
    """run() copies the fused weight and its state into rows that start on cache lines for the epoch, and
    back into the same arrays after it: parameters and state equal eager's bit for bit (sparse and dense
    batches). A weight that shares its memory with another parameter (two layers tied to one array, each
    stepped) is not copied, so that each update lands on the other too, as eagerly; nor one that another op
    of the step reads."""
    x, y, classes = dataset('sparse', np.float32, n=1024)
    x[640:768] = np.random.default_rng(5).random((128, 784)) + 0.5  # a dense batch
    eager, fused = (make('sparse', 'relu', optimizer, np.float32, classes, 784) for _ in range(2))
    w = fused[0].layers[0].w
    w.value = off_cache_line(w.value)
    weight, opt = w.value, fused[1]
    step = fg.compile(fused[2], keep_grads=False)
    step.run(x[:256], y[:256], 128)
    state = {k: v for k, v in opt.state[w].items() if k != 'step'}
    step.run(x[256:], y[256:], 128)
    for start in range(0, 1024, 128):
        eager[2](x[start:start + 128], y[start:start + 128])
    assert_same_training(eager[:2], fused[:2], 0)
    program = step.programs[next(iter(step.programs))]
    position = next(i for i, p in enumerate(program.params) if p is w)
    assert len(program.row_args) == 1 + len(state)  # the weight and its momentum, or Adam's two moments
    assert position in program.pads and set(program.pads) <= set(program.row_args)  # (a state may be aligned already)
    assert all(pad.ctypes.data % 64 == 0 and pad.strides[0] % 64 == 0 for pad in program.pads.values())
    assert w.value is weight and all(opt.state[w][k] is v for k, v in state.items())

    runs = []
    for compiled in (False, True):
        first, twin, head = fg.Linear(784, 64, rng=0), fg.Linear(784, 64, rng=2), fg.Linear(64, classes, rng=1)
        first.w.value = off_cache_line(first.w.value)
        twin.w.value = first.w.value
        sgd = fg.SGD(first.parameters() + twin.parameters() + head.parameters(), lr=0.05, momentum=0.9)

        def shared(xb, yb):
            sgd.zero_grad()
            xn = TensorNode(xb, requires_grad=False)
            loss = fg.cross_entropy(head(first(xn, activation='relu') + twin(xn)), yb)
            loss.backward()
            sgd.step()
            return loss
        run = fg.compile(shared, keep_grads=False).run if compiled else None
        losses = run(x, y, 128) if compiled else [float(shared(x[i:i + 128], y[i:i + 128]).value)
                                                  for i in range(0, 1024, 128)]
        runs.append((list(losses), first.w.value.copy(), twin.w.value is first.w.value))
        if compiled:
            with open(run.__self__.programs[next(iter(run.__self__.programs))].source) as f:
                assert '_sparse_weight_grad_update(' in f.read()
            program = run.__self__.programs[next(iter(run.__self__.programs))]
            tied = [k for k in program.row_args if k < len(program.params)]
            assert len(tied) == 2 and not set(program.pads) & set(tied)  # (their momenta may be padded)
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1]) and runs[1][2]

    # the fused weight read by another op too (its layer under no_grad on one small row: a dense product
    # that would take the padded rows as they are) is left in place
    twins = []
    for compiled in (False, True):
        model = fg.MLP(784, classes, hidden=[60], activation='relu', rng=0)  # rows padded from 60 to 64
        sgd = fg.SGD(model.parameters(), lr=0.05, momentum=0.9)
        layer = model.layers[0]
        layer.w.value = off_cache_line(layer.w.value)

        def probed(xb, yb):
            sgd.zero_grad()
            xn = TensorNode(xb, requires_grad=False)
            loss = fg.cross_entropy(model(xn), yb)
            loss.backward()
            sgd.step()
            with fg.no_grad():
                probe = layer(xn.sum(axis=0).reshape(1, 784))
            return loss + probe.sum() * 0
        step = fg.compile(probed, keep_grads=False)
        twins.append(((step.run(x, y, 128) if compiled else
                       [float(probed(x[i:i + 128], y[i:i + 128]).value) for i in range(0, 1024, 128)]), model, sgd))
        if compiled:
            program = step.programs[next(iter(step.programs))]
            assert program.row_states and not program.pads  # fused, not padded
    assert list(twins[0][0]) == list(twins[1][0])
    assert_same_training(twins[0][1:], twins[1][1:], 0)


def test_without_grads_a_gradient_used_after_the_update_is_not_fused():
    """A backward() after the step adds to the first layer's gradient: that update cannot consume it."""
    x, y, classes = dataset('sparse', np.float32, n=384)
    runs = []
    for keep_grads in (None, True, False):
        model, opt, _ = make('sparse', 'relu', 'sgd', np.float32, classes, 784)

        def step(xb, yb):
            opt.zero_grad()
            loss = fg.cross_entropy(model(TensorNode(xb, requires_grad=False)), yb)
            loss.backward()
            opt.step()
            fg.cross_entropy(model(TensorNode(xb, requires_grad=False)), yb).backward()
            return loss
        run = step if keep_grads is None else fg.compile(step, keep_grads=keep_grads)
        for start in range(0, 384, 128):
            run(x[start:start + 128], y[start:start + 128])
        runs.append((model, opt))
        if keep_grads is False:
            with open(run.programs[next(iter(run.programs))].source) as f:
                assert '_sparse_weight_grad_update(' not in f.read()
    assert_same_training(runs[0], runs[1], 0)
    assert_same_training(runs[0], runs[2], 0)


def twins(build, loss_fn, *batch, steps=4):
    """The same step eager and compiled on twin models: (eager parameters, compiled parameters)."""
    out = []
    for compiled in (False, True):
        params = build()
        opt = fg.SGD(params, lr=0.1, momentum=0.9)

        def step(*arrays):
            opt.zero_grad()
            loss = loss_fn(params, *arrays)
            loss.backward()
            opt.step()
            return loss
        fn = fg.compile(step) if compiled else step
        for _ in range(steps):
            fn(*batch)
        out.append(params)
    return out


def assert_twins(pair, rtol):
    for p, q in zip(*pair):
        assert_close(q.value, p.value, rtol)


def test_small_heads_on_a_shared_trunk_and_ops_on_weights():
    """Gradients of transposed values (small layers' and a Linear weight's) added, negated, multiplied:
    each such expression's result is taken as it is laid out."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 20)).astype(np.float32)
    ya, yb = rng.integers(0, 3, 32), rng.integers(0, 2, 32)

    def build():
        trunk, a, b = fg.Linear(20, 20, rng=0), fg.Linear(20, 3, rng=1), fg.Linear(20, 2, rng=2)
        return trunk.parameters() + a.parameters() + b.parameters()

    def loss(params, xb, ta, tb):
        tw, tbias, aw, ab, bw, bb = params
        h = fg.ops.Linear.do_forward(TensorNode(xb, requires_grad=False), tw, tbias, activation='relu')
        la = fg.cross_entropy(fg.ops.Linear.do_forward(h, aw, ab), ta)
        lb = fg.cross_entropy(fg.ops.Linear.do_forward(h, bw, bb), tb)
        return la - (-lb) + (aw * aw).sum() * 0.01 + (tw / (tw * tw + 1)).sum(axis=0).sum() * 0.01
    assert_twins(twins(build, loss, x, ya, yb), 1e-5)


def test_a_parameter_of_another_dtype_into_a_small_layer():
    y = np.random.default_rng(0).integers(0, 3, 16)

    def build():  # a float64 parameter stored F-ordered, into a float32 layer written out as loops
        return [TensorNode(np.asfortranarray(np.random.default_rng(3).standard_normal((16, 2))))] + \
            fg.Linear(2, 3, rng=1).parameters()

    def loss(params, yb):
        return fg.cross_entropy(fg.ops.Linear.do_forward(*params), yb)
    assert_twins(twins(build, loss, y), 1e-5)


def test_a_read_only_batch_in_a_node_that_requires_grad():
    """TensorNode(xb) requires a gradient by default; undoing the traced run touches only what the
    optimizer stepped, never the batch."""
    x = np.random.default_rng(0).standard_normal((16, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    x.setflags(write=False)

    def build():
        return fg.MLP(2, 2, hidden=[8], rng=0).parameters()

    def loss(params, xb, yb):
        h = fg.ops.Linear.do_forward(TensorNode(xb), params[0], params[1], activation='relu')
        return fg.cross_entropy(fg.ops.Linear.do_forward(h, params[2], params[3]), yb)
    assert_twins(twins(build, loss, x, y), 1e-5)


def test_values_a_step_returns_are_its_own():
    """Small layers keep their values in buffers that every call reuses: what a step returns (the logits
    too) and the gradients it leaves in .grad are arrays of their own, not overwritten by the next call."""
    x, y, classes = dataset('synth', np.float32, n=256)
    model = fg.MLP(2, classes, hidden=[8], rng=0)
    opt = fg.SGD(model.parameters(), lr=0.1)

    def step(xb, yb):
        opt.zero_grad()
        logits = model(TensorNode(xb, requires_grad=False))
        loss = fg.cross_entropy(logits, yb)
        loss.backward()
        opt.step()
        return loss, logits

    compiled = fg.compile(step)
    compiled(x[:64], y[:64])  # traced
    loss, logits = compiled(x[64:128], y[64:128])
    grads = [p.grad for p in model.parameters()]
    kept = logits.copy(), [g.copy() for g in grads]
    assert compiled.programs[next(iter(compiled.programs))].loop_layers == 2
    compiled(x[128:192], y[128:192])
    np.testing.assert_array_equal(logits, kept[0])
    for g, k in zip(grads, kept[1]):
        np.testing.assert_array_equal(g, k)


def test_a_new_shape_or_dtype_traces_again():
    x, y, classes = dataset('synth', np.float64, n=300)
    eager, compiled = (make('synth', 'tanh', 'sgd', np.float64, classes, 2) for _ in range(2))
    step = fg.compile(compiled[2])
    for rows in (64, 32, 64, 32):
        for batch in (slice(0, rows), slice(100, 100 + rows)):
            np.testing.assert_allclose(step(x[batch], y[batch]), eager[2](x[batch], y[batch]).value, rtol=1e-12)
    step(x[:64].astype(np.float32), y[:64])
    eager[2](x[:64].astype(np.float32), y[:64])
    assert len(step.programs) == 3
    assert_same_training(eager[:2], compiled[:2], 1e-9)


@pytest.mark.parametrize('layers, rtol', [('blas', 0), ('loops', 1e-5)])
def test_changes_after_compiling_take_effect(layers, rtol, monkeypatch):
    """The learning rate (a schedule), a parameter given a new array, a loaded optimizer state: read on every
    call; switching momentum on traces again."""
    if layers == 'blas':
        monkeypatch.setattr(compiled_module, 'LOOP_MAX_WEIGHT', 0)
    x, y, classes = dataset('synth', np.float32, n=600)
    eager, compiled = (make('synth', 'relu', 'sgd', np.float32, classes, 2) for _ in range(2))
    step = fg.compile(compiled[2])
    schedules = [fg.StepLR(m[1], step_size=1, gamma=0.5) for m in (eager, compiled)]

    def both(batch):
        eager[2](x[batch], y[batch])
        step(x[batch], y[batch])

    for k in range(4):
        both(slice(k * 64, k * 64 + 64))
        for s in schedules:
            s.step()
    assert compiled[1].lr == 0.05 / 16
    for model, _, _ in (eager, compiled):  # a new array of the same shape and layout
        model.layers[0].w.value = model.layers[0].w.value * 0.5
    both(slice(0, 64))
    state = eager[1].state_dict()
    for _, opt, _ in (eager, compiled):
        opt.load_state_dict(state)
    both(slice(64, 128))
    for _, opt, _ in (eager, compiled):
        opt.momentum = 0.0
    both(slice(128, 192))
    for _, opt, _ in (eager, compiled):
        opt.momentum = 0.5
    both(slice(192, 256))
    assert len(step.programs) == 1  # the same shapes: the variant was replaced when momentum changed
    assert_same_training(eager[:2], compiled[:2], rtol)


def test_a_bad_target_raises_as_eager_does_and_changes_nothing():
    x, y, classes = dataset('synth', np.float32, n=200)
    model, opt, fn = make('synth', 'relu', 'sgd', np.float32, classes, 2)
    step = fg.compile(fn)
    step(x[:64], y[:64])
    step(x[64:128], y[64:128])
    before = [p.value.copy() for p in model.parameters()]
    bad = y[:64].copy()
    bad[5] = 7
    with pytest.raises(ValueError, match=r'CrossEntropy: targets must lie in \[0, 2\), got 7 at position 5'):
        step(x[:64], bad)
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.value, b)
    with pytest.raises(ValueError, match='got 7 at position 5'):
        step.run(np.concatenate([x[:128], x[:64]]), np.concatenate([y[:128], bad]), 64)


def test_a_bad_target_of_a_loss_after_the_update_raises_after_one_update_as_eager():
    """A second loss computed after opt.step() with bad targets: the compiled call returns before any update
    and runs the step eagerly, which updates once and raises, as eager does (not twice)."""
    x, y, classes = dataset('synth', np.float32, n=200)
    bad = y[:64].copy()
    bad[3] = 9
    runs = []
    for compiled in (False, True):
        model, opt, fn = make('synth', 'relu', 'sgd', np.float32, classes, 2)

        def step(xb, yb, yb2):
            loss = fn(xb, yb)
            return loss, fg.cross_entropy(model(TensorNode(xb, requires_grad=False)), yb2)
        run = fg.compile(step) if compiled else step
        run(x[:64], y[:64], y[:64])
        with pytest.raises(ValueError, match='got 9 at position 3'):
            run(x[64:128], y[64:128], bad)
        runs.append((model, opt))
    assert_same_training(runs[0], runs[1], 1e-5)  # small layers as loops: eager to rounding


def test_without_grads_a_step_with_small_loop_layers_is_not_fused():
    """A step with layers written out as loops is compiled with fastmath, which contracts the updates inlined
    into it; its sparse layer's update is then not fused, so that keep_grads=False moves the weights exactly
    as keep_grads=True does."""
    x, y, classes = dataset('sparse', np.float32, n=256)
    runs = []
    for keep_grads in (True, False):
        model = fg.MLP(784, classes, hidden=[16], activation='relu', rng=0)  # 16 x 10 weights: loops
        opt = fg.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = fg.compile(training_step(model, opt), keep_grads=keep_grads)
        step.run(x, y, 128)
        program = step.programs[next(iter(step.programs))]
        assert program.loop_layers == 1 and program.has_sparse
        with open(program.source) as f:
            assert '_sparse_weight_grad_update(' not in f.read()
        runs.append((model, opt))
    assert_same_training(runs[0], runs[1], 0)


class Cube(fg.Op):
    @staticmethod
    def forward(context, x):
        context['x'] = x
        return x ** 3

    @staticmethod
    def backward(context, go):
        return 3 * context['x'] ** 2 * go


class MyReLU(fg.ReLU):
    """A subclass of a built-in op with a backward of its own: not the built-in's compiled form."""
    @classmethod
    def backward(cls, context, go):
        return go * (context['y'] > 0)


@pytest.mark.parametrize('op', [Cube, MyReLU])
def test_an_op_without_a_compiled_form_is_refused_by_name(op):
    w = TensorNode(np.ones((2, 3)))
    opt = fg.SGD([w], lr=0.1)

    def step(xb):
        opt.zero_grad()
        loss = op.do_forward(TensorNode(xb, requires_grad=False) @ w).sum()
        loss.backward()
        opt.step()
        return loss

    with pytest.raises(TraceError, match=f'the op {op.__name__} has no compiled form'):
        fg.compile(step)(np.ones((4, 2)))
    np.testing.assert_array_equal(w.value, np.ones((2, 3)))  # the traced eager run is undone


def test_what_a_compiled_step_cannot_keep_is_refused():
    w = TensorNode(np.ones((2, 3)))
    opt = fg.SGD([w], lr=0.1)

    def hand_update(xb):  # vugrad's course loop: the update is numpy, invisible to a tracer
        loss = (TensorNode(xb, requires_grad=False) @ w).sum()
        loss.backward()
        w.value -= 0.1 * w.grad
        loss.zero_grad()
        return loss

    with pytest.raises(TraceError, match='changed during the step without an optimizer step'):
        fg.compile(hand_update)(np.ones((4, 2)))

    def scaled(xb):  # an array made from the batch in Python would be frozen at trace time
        opt.zero_grad()
        loss = (TensorNode(xb / 2, requires_grad=False) @ w).sum()
        loss.backward()
        opt.step()
        return loss

    with pytest.raises(TraceError, match="neither one of the step's arguments nor a parameter"):
        fg.compile(scaled)(np.ones((4, 2)))

    def accumulates(xb):  # no zero_grad: gradients would pile up across calls
        loss = (TensorNode(xb, requires_grad=False) @ w).sum()
        loss.backward()
        opt.step()
        return loss

    with pytest.raises(TraceError, match='no zero_grad'):
        fg.compile(accumulates)(np.ones((4, 2)))
    with pytest.raises(TypeError, match='argument 0 is a TensorNode'):
        fg.compile(scaled)(TensorNode(np.ones((4, 2))))

    def steps_first(xb):  # eagerly this steps on the gradient the previous call left in w.grad
        opt.step()
        opt.zero_grad()
        loss = (TensorNode(xb, requires_grad=False) @ w).sum()
        loss.backward()
        return loss

    before = w.value.copy()
    with pytest.raises(TraceError, match=r'opt.step\(\) comes before backward\(\) in the step'):
        fg.compile(steps_first)(np.ones((4, 2)))
    np.testing.assert_array_equal(w.value, before)  # the traced run undone


def test_the_same_array_as_two_arguments_is_two_arguments():
    """Traced with one array passed twice, a step still reads each argument on later calls."""
    x, y, classes = dataset('synth', np.float32, n=200)
    runs = []
    for compiled in (False, True):
        model, opt, fn = make('synth', 'relu', 'sgd', np.float32, classes, 2)

        def step(xb, yb, yb2):
            return fn(xb, yb), fg.cross_entropy(model(TensorNode(xb, requires_grad=False)), yb2)
        run = fg.compile(step) if compiled else step
        targets = y[:64]
        run(x[:64], targets, targets)
        other = (y[64:128] + 1) % classes
        losses = run(x[64:128], y[64:128], other)
        runs.append([float(np.asarray(getattr(v, 'value', v))) for v in losses])
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)
    assert runs[1][0] != runs[1][1]


def test_vugrad_style_graph_compiles():
    """BatchMM + Expand Linear, logsoftmax and logceloss (Select, Sum), as the course writes them."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 2)), rng.integers(0, 2, 256)

    def make_net():
        w1, b1 = TensorNode(rng.standard_normal((8, 2)) * 0.5), TensorNode(np.zeros((1, 8)))
        w2, b2 = TensorNode(rng.standard_normal((2, 8)) * 0.5), TensorNode(np.zeros((1, 2)))
        params = [w1, b1, w2, b2]
        opt = fg.SGD(params, lr=0.01, momentum=0.5)

        def step(xb, yb):
            opt.zero_grad()
            n = xb.shape[0]
            h = fg.sigmoid(fg.BatchMM.do_forward(w1, TensorNode(xb)) + fg.Expand.do_forward(b1, dim=0, repeats=n))
            out = fg.BatchMM.do_forward(w2, h) + fg.Expand.do_forward(b2, dim=0, repeats=n)
            loss = fg.logceloss(fg.logsoftmax(out), yb)
            loss.backward()
            opt.step()
            return loss
        return params, step

    state = rng.bit_generator.state
    p_eager, eager = make_net()
    rng.bit_generator.state = state
    p_comp, comp = make_net()
    step = fg.compile(comp)
    for k in range(0, 256, 32):
        np.testing.assert_allclose(step(x[k:k + 32], y[k:k + 32]), eager(x[k:k + 32], y[k:k + 32]).value, rtol=1e-10)
    for p, q in zip(p_eager, p_comp):
        np.testing.assert_allclose(q.value, p.value, rtol=1e-10)


SECOND_PROCESS = """
import numpy as np, fastgrad as fg
from fastgrad.train import training_step
model = fg.MLP(2, 2, hidden=8, rng=0)
step = fg.compile(training_step(model, fg.SGD(model.parameters(), lr=0.1, momentum=0.9)))
x = np.random.default_rng(0).standard_normal((256, 2)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int64)
losses = step.run(x, y, 64)
program = next(iter(step.programs.values()))
print(losses[-1], program.source, program.epoch.stats.cache_hits, program.epoch.stats.cache_misses)
"""


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_step_from_the_cache(tmp_path):
    env = dict(os.environ, FASTGRAD_CACHE=str(tmp_path / 'steps'), NUMBA_CACHE_DIR=str(tmp_path / 'numba'))
    runs = [subprocess.run([sys.executable, '-c', SECOND_PROCESS], capture_output=True, text=True, env=env)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    (loss1, source1, hits1, misses1), (loss2, source2, hits2, misses2) = (r.stdout.split(' ', 3) for r in runs)
    assert loss1 == loss2 and source1 == source2 and source1.startswith(str(tmp_path / 'steps'))
    assert 'Counter()' in misses2 and hits2 != 'Counter()', runs[1].stdout  # loaded, not compiled


TRAIN_ONE_EPOCH = """
import hashlib
from fastgrad.train import TrainConfig, train
result = train(TrainConfig(dataset='synth', epochs=1, hidden=[16], seed=3))
print(repr(result['history'][0]['train_loss']),
      hashlib.sha256(b''.join(p.value.tobytes() for p in result['model'].parameters())).hexdigest())
"""


@pytest.mark.slow
def test_a_run_from_a_cold_cache_equals_one_from_the_warm_cache(tmp_path):
    """The first process compiles the epoch, the second loads it from numba's cache: the same losses and
    parameters bit for bit (compiled in another order, the epoch's cached code once ran otherwise)."""
    env = dict(os.environ, FASTGRAD_CACHE=str(tmp_path / 'steps'), NUMBA_CACHE_DIR=str(tmp_path / 'numba'))
    runs = [subprocess.run([sys.executable, '-c', TRAIN_ONE_EPOCH], capture_output=True, text=True, env=env)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout == runs[1].stdout


def fastgrad_train(tmp_path, *args):
    run = subprocess.run([sys.executable, '-m', 'fastgrad', 'train', '--no-progress', *args], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    return run


def run_train(tmp_path, *args):
    return fastgrad_train(tmp_path, '-D', 'synth', '--hidden', '8', *args)


def log(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ('seconds', 'samples_per_second')}
            for line in path.read_text().splitlines()]


def assert_same_log(got, want, rtol):
    """The same epochs, accuracies and learning rates; training losses equal to rtol (0: bit for bit)."""
    assert [{k: v for k, v in line.items() if k != 'train_loss'} for line in got] == \
        [{k: v for k, v in line.items() if k != 'train_loss'} for line in want]
    np.testing.assert_allclose([line['train_loss'] for line in got], [line['train_loss'] for line in want],
                               rtol=rtol, atol=0)


@pytest.mark.slow
def test_train_compiled_and_eager_give_the_same_log_and_resume_across(tmp_path):
    # the 2-8-2 MLP's layers are written out as loops: its losses agree with eager's to rounding
    run_train(tmp_path, '-e', '3', '--log', 'compiled.jsonl')
    run_train(tmp_path, '-e', '3', '--eager', '--log', 'eager.jsonl')
    assert_same_log(log(tmp_path / 'compiled.jsonl'), log(tmp_path / 'eager.jsonl'), 1e-6)
    run_train(tmp_path, '-e', '2', '--eager', '--checkpoint', 'ck')
    run_train(tmp_path, '-e', '3', '--checkpoint', 'ck', '--resume', '--log', 'resumed.jsonl')
    assert_same_log(log(tmp_path / 'resumed.jsonl'), log(tmp_path / 'eager.jsonl'), 1e-6)
    run_train(tmp_path, '-e', '2', '--checkpoint', 'ck-compiled')  # and a compiled checkpoint resumed eagerly
    run_train(tmp_path, '-e', '3', '--eager', '--checkpoint', 'ck-compiled', '--resume', '--log', 'resumed-eager.jsonl')
    assert_same_log(log(tmp_path / 'resumed-eager.jsonl'), log(tmp_path / 'compiled.jsonl'), 1e-6)
    # a wider MLP runs the eager kernels: bit for bit, both ways
    run_train(tmp_path, '-e', '2', '--hidden', '200', '--log', 'wide-compiled.jsonl')
    run_train(tmp_path, '-e', '2', '--hidden', '200', '--eager', '--log', 'wide-eager.jsonl')
    assert log(tmp_path / 'wide-compiled.jsonl') == log(tmp_path / 'wide-eager.jsonl')
    run_train(tmp_path, '-e', '1', '--hidden', '200', '--checkpoint', 'ck-wide')
    run_train(tmp_path, '-e', '2', '--hidden', '200', '--eager', '--checkpoint', 'ck-wide', '--resume',
              '--log', 'wide-resumed-eager.jsonl')
    assert log(tmp_path / 'wide-resumed-eager.jsonl') == log(tmp_path / 'wide-eager.jsonl')


# -- convolutions
def images(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28)).astype(dtype), rng.integers(0, 10, n)


def conv_training(model, optimizer):
    if optimizer == 'sgd':
        opt = fg.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = fg.Adam(model.parameters(), lr=0.01)
    return model, opt, training_step(model, opt)


def lenet(dtype, optimizer):
    return conv_training(fg.LeNet(dtype=dtype, rng=0), optimizer)


def strided_net(dtype, optimizer):
    """Strides, paddings and kernels of two sizes, overlapping pooling windows, sigmoid, tanh and an unfused
    relu op after the convolutions: 28 -> 14 (conv) -> 6 (pool 3, stride 2) -> 6 x 3 (conv) -> 5 x 3 (pool)."""
    rng = np.random.default_rng(0)
    model = fg.Sequential(
        fg.Conv2d(1, 4, 3, stride=2, padding=1, dtype=dtype, rng=rng), fg.sigmoid, fg.MaxPool2d(3, stride=2),
        fg.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), dtype=dtype, rng=rng), fg.tanh,
        fg.MaxPool2d((2, 1), stride=1), fg.relu, fg.Flatten(), fg.Linear(6 * 5 * 3, 10, dtype=dtype, rng=rng))
    return conv_training(model, optimizer)


def assert_same_steps(make, dtype, optimizer, rtol, steps=6, batch=8):
    """`steps` compiled steps against as many eager ones from the same initial weights: the losses, then
    the parameters, the optimizer's state and the gradients, equal to rtol (0: bit for bit)."""
    x, y = images(steps * batch, dtype)
    eager, compiled = make(dtype, optimizer), make(dtype, optimizer)
    step = fg.compile(compiled[2])
    for k in range(0, steps * batch, batch):
        want = eager[2](x[k:k + batch], y[k:k + batch]).value
        got = step(x[k:k + batch], y[k:k + batch])
        assert got.dtype == want.dtype
        assert_close(got, want, rtol)
    (program,) = step.programs.values()  # traced once
    assert program.has_conv
    assert_same_training(eager[:2], compiled[:2], rtol)
    for p, q in zip(eager[0].parameters(), compiled[0].parameters()):
        assert_close(q.grad, p.grad, rtol * 100)


# relu LeNet runs the same kernels with the same arguments in the same order as the eager ops: bit for bit
@pytest.mark.parametrize('dtype, optimizer', [
    pytest.param(np.float32, 'sgd', id='f32-sgd'),
    pytest.param(np.float64, 'adam', id='f64-adam', marks=pytest.mark.slow),
    pytest.param(np.float32, 'adam', id='f32-adam', marks=pytest.mark.slow),
    pytest.param(np.float64, 'sgd', id='f64-sgd', marks=pytest.mark.slow),
])
def test_compiled_lenet_steps_equal_eager_steps_bit_for_bit(dtype, optimizer):
    assert_same_steps(lenet, dtype, optimizer, 0)


# sigmoid and tanh: exp/tanh from libm in compiled code, from numpy's SIMD loops eagerly (see CASES)
@pytest.mark.parametrize('dtype, optimizer, rtol', [
    pytest.param(np.float32, 'sgd', 1e-5, id='f32-sgd'),
    pytest.param(np.float64, 'adam', 1e-6, id='f64-adam', marks=pytest.mark.slow),
])
def test_compiled_strided_sigmoid_tanh_convolutions_equal_eager_steps(dtype, optimizer, rtol):
    assert_same_steps(strided_net, dtype, optimizer, rtol, steps=20)


def test_only_a_step_with_conv_ops_hands_the_cores_to_numba():
    """Under 'auto' the conv kernels take numba's threads (backend.conv_parts), as eager conv ops do; a
    compiled MLP step leaves the cores to BLAS."""
    x, y, classes = dataset('synth', np.float32, n=256)
    with backend.threads_restored():
        fg.set_threads('auto')
        step = fg.compile(make('synth', 'relu', 'sgd', np.float32, classes, 2)[2])
        for k in range(0, 256, 64):
            step(x[k:k + 64], y[k:k + 64])
        assert backend.threads()['owner'] == 'blas'
        (program,) = step.programs.values()
        assert not program.has_conv
        xi, yi = images(16, np.float32)
        step = fg.compile(lenet(np.float32, 'sgd')[2])
        step(xi[:8], yi[:8])  # traced: the eager conv ops hand the cores over
        fg.set_threads('auto')
        step(xi[8:], yi[8:])  # compiled
        assert backend.threads()['owner'] == 'numba'


@pytest.mark.slow
def test_lenet_run_is_the_loop_of_steps_with_a_short_last_batch():
    x, y = images(44, np.float32)
    a, b = lenet(np.float32, 'sgd'), lenet(np.float32, 'sgd')
    order = np.random.default_rng(3).permutation(len(x))
    step_a, step_b = fg.compile(a[2]), fg.compile(b[2])
    want = [float(step_a(x[order[i:i + 8]], y[order[i:i + 8]])) for i in range(0, 44, 8)]
    assert step_b.run(x, y, 8, order).tolist() == want
    assert len(step_b.programs) == 2  # the full batches and the last one (4 images)
    assert_same_training(a[:2], b[:2], 0)


@pytest.mark.slow
def test_train_lenet_compiled_and_eager_give_the_same_log_and_resume_across(tmp_path):
    from test_data import make_idx_dataset
    make_idx_dataset(tmp_path / 'idx', n_train=44, n_test=16)
    lenet_args = ('-D', 'mnist', '--model', 'lenet', '--data-dir', 'idx', '--final', '-b', '8')
    fastgrad_train(tmp_path, *lenet_args, '-e', '2', '--log', 'compiled.jsonl')
    fastgrad_train(tmp_path, *lenet_args, '-e', '2', '--eager', '--log', 'eager.jsonl')
    assert log(tmp_path / 'compiled.jsonl') == log(tmp_path / 'eager.jsonl')
    fastgrad_train(tmp_path, *lenet_args, '-e', '1', '--eager', '--checkpoint', 'ck')
    fastgrad_train(tmp_path, *lenet_args, '-e', '2', '--checkpoint', 'ck', '--resume', '--log', 'resumed.jsonl')
    assert log(tmp_path / 'resumed.jsonl') == log(tmp_path / 'eager.jsonl')


# -- what the step's Python read at trace time (a review of changes after compiling)
def small_mlp_steps(change, frozen=False):
    """An MLP step eager and compiled from twin models: a batch, `change(model, opt)` (on both), then two
    more; returns the twins' (model, opt) pairs and whether the compiled step traced again after the change.
    The optimizer has two groups: the first layer's parameters and the second's (lr 0.001)."""
    x, y, classes = dataset('synth', np.float32, n=256)
    runs = []
    for compiled in (False, True):
        model = fg.MLP(2, classes, hidden=[16], rng=0)
        if frozen:
            for p in model.layers[0].parameters():
                p.requires_grad = False
        opt = fg.SGD([{'params': [p for p in model.layers[0].parameters() if p.requires_grad]},
                      {'params': model.layers[1].parameters(), 'lr': 0.001}], lr=0.1, momentum=0.9)
        step = training_step(model, opt)
        if compiled:
            step = fg.compile(step)
        step(x[:64], y[:64])
        first = compiled and list(step.programs.values())
        change(model, opt)
        step(x[64:128], y[64:128])
        step(x[128:192], y[128:192])
        runs.append((model, opt))
    return runs, list(step.programs.values()) != first


@pytest.mark.parametrize('what', ['requires_grad', 'activation', 'layer_appended', 'moved_between_groups'])
def test_what_the_step_read_at_trace_time_changed_traces_again(what):
    def change(model, opt):
        if what == 'requires_grad':  # eager leaves a weight without a gradient alone
            model.layers[0].w.requires_grad = False
        elif what == 'activation':
            model.activation = 'tanh'
        elif what == 'layer_appended':  # into the second group
            model.layers.append(fg.Linear(model.layers[-1].w.shape[0], model.layers[-1].w.shape[0], rng=3))
            opt.param_groups[1]['params'] += model.layers[-1].parameters()
        else:  # the first layer's bias into the second group (lr 0.001): still two groups
            opt.param_groups[1]['params'].append(opt.param_groups[0]['params'].pop())
    (eager, compiled), traced_again = small_mlp_steps(change)
    assert traced_again
    assert_same_training(eager, compiled, 1e-5)  # small layers as loops: eager to rounding
    if what == 'requires_grad':
        assert compiled[0].layers[0].w.grad_if_any is None


def test_a_frozen_layer_is_read_on_every_call():
    """Fine-tuning: a layer whose parameters need no gradient is passed in like a parameter (not refused as a
    data array), so a change to its weight takes effect."""
    def change(model, opt):
        model.layers[0].w.value *= 2  # in place: the second layer then trains on other inputs
    (eager, compiled), traced_again = small_mlp_steps(change, frozen=True)
    assert not traced_again
    assert_same_training(eager, compiled, 1e-5)


def test_a_frozen_node_changed_by_hand_in_the_step_is_refused_and_undone():
    """A teacher's weight moved by hand in the step (an EMA) would not move in compiled code."""
    x, y, classes = dataset('synth', np.float32, n=64)
    student, teacher = (fg.MLP(2, classes, hidden=[16], rng=0) for _ in range(2))
    for p in teacher.parameters():
        p.requires_grad = False
    opt = fg.SGD(student.parameters(), lr=0.1)
    before = teacher.layers[0].w.value.copy()

    def step(xb, yb):
        opt.zero_grad()
        data = TensorNode(xb, requires_grad=False)
        loss = fg.cross_entropy(student(data), yb) + fg.cross_entropy(teacher(data), yb)
        loss.backward()
        opt.step()
        teacher.layers[0].w.value[...] = 0.9 * teacher.layers[0].w.value + 0.1 * student.layers[0].w.value
        return loss
    with pytest.raises(TraceError, match='changed during the step without an optimizer step'):
        fg.compile(step)(x, y)
    np.testing.assert_array_equal(teacher.layers[0].w.value, before)


def test_a_single_number_node_changed_after_compiling_traces_again():
    x, y, classes = dataset('synth', np.float32, n=128)
    losses = []
    for compiled in (False, True):
        model, opt, _ = make('synth', 'relu', 'sgd', np.float32, classes, 2)
        temperature = TensorNode(np.array(1.0, np.float32), requires_grad=False)

        def step(xb, yb):
            opt.zero_grad()
            loss = fg.cross_entropy(model(TensorNode(xb, requires_grad=False)) * temperature, yb)
            loss.backward()
            opt.step()
            return loss
        run = fg.compile(step) if compiled else step
        run(x[:64], y[:64])
        temperature.value[...] = 3.0
        loss = run(x[64:], y[64:])
        losses.append(float(np.asarray(getattr(loss, 'value', loss))))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_vugrad_losses_with_indices_out_of_range_raise_as_eager_and_change_nothing():
    """Select (vugrad's logceloss) with a bad label: its indices are checked before anything runs."""
    x, y, classes = dataset('sparse', np.float32, n=192)
    model = fg.MLP(784, 10, hidden=[32], rng=0)
    opt = fg.SGD(model.parameters(), lr=0.1)

    def step(xb, yb):
        opt.zero_grad()
        loss = fg.logceloss(fg.logsoftmax(model(TensorNode(xb, requires_grad=False))), yb)
        loss.backward()
        opt.step()
        return loss
    run = fg.compile(step)
    run(x[:64], y[:64])
    before = [p.value.copy() for p in model.parameters()]
    for bad in (10, -1, 1_000_000):
        labels = y[64:128].copy()
        labels[5] = bad
        with pytest.raises(ValueError, match=rf'Select: indices must be in \[0, 10\).*got {bad}'):
            run(x[64:128], labels)
        for p, b in zip(model.parameters(), before):
            np.testing.assert_array_equal(p.value, b)
    labels = y.copy()
    labels[70] = 12
    with pytest.raises(ValueError, match='got 12'):
        run.run(x, labels, 64)


@pytest.mark.parametrize('how', ['schedule', 'opt.lr', 'param_groups', 'param_groups before step'])
def test_a_step_that_changes_hyperparameters_is_refused_and_undone(how):
    x, y, classes = dataset('synth', np.float32, n=64)
    model, opt, fn = make('synth', 'relu', 'sgd', np.float32, classes, 2)
    schedule = fg.StepLR(opt, step_size=1, gamma=0.5)
    before = [p.value.copy() for p in model.parameters()]

    def step(xb, yb):
        if how == 'param_groups before step':  # a warm-up written by hand
            opt.param_groups[0]['lr'] = 0.01
        loss = fn(xb, yb)
        if how == 'schedule':
            schedule.step()
        elif how == 'opt.lr':
            opt.lr = 0.5
        else:
            opt.param_groups[0]['lr'] = 0.5
        return loss
    group = opt.param_groups[0]
    with pytest.raises(TraceError, match='outside the step, between calls'):
        fg.compile(step)(x, y)
    assert opt.lr == 0.05 and schedule.last_epoch == 0 and opt.param_groups[0] is group
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.value, b)


def test_run_refuses_a_step_without_one_loss_before_any_update():
    x, y, classes = dataset('synth', np.float32, n=256)
    model, opt, fn = make('synth', 'relu', 'sgd', np.float32, classes, 2)
    before = [p.value.copy() for p in model.parameters()]

    def logits(xb, yb):
        fn(xb, yb)
        return model(TensorNode(xb, requires_grad=False))

    def two(xb, yb):
        return fn(xb, yb), model(TensorNode(xb, requires_grad=False))
    for step in (logits, two):
        with pytest.raises(TypeError, match='return one loss'):
            fg.compile(step).run(x, y, 64)
        for p, b in zip(model.parameters(), before):
            np.testing.assert_array_equal(p.value, b)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_cleared_optimizer_state_starts_again_from_zero(optimizer):
    """opt.state.clear() (torch: a fresh state): both modes start the buffers again from zero."""
    x, y, classes = dataset('synth', np.float32, n=256)
    runs = []
    for mode in ('eager', 'compiled', 'zeroed'):
        model, opt, fn = make('synth', 'relu', optimizer, np.float32, classes, 2)
        run = fg.compile(fn) if mode == 'compiled' else fn
        run(x[:64], y[:64])
        if mode == 'zeroed':
            for state in opt.state.values():
                for name, value in state.items():
                    if isinstance(value, np.ndarray):
                        value[...] = 0
                    else:
                        state[name] = 0
        else:
            opt.state.clear()
        run(x[64:128], y[64:128])
        run(x[128:192], y[128:192])
        runs.append((model, opt))
    assert_same_training(runs[0], runs[2], 0)
    assert_same_training(runs[0], runs[1], 1e-5)


def test_a_read_only_parameter_is_named_in_both_modes():
    x, y, classes = dataset('synth', np.float32, n=128)
    for compiled in (False, True):
        model, opt, fn = make('synth', 'relu', 'sgd', np.float32, classes, 2)
        run = fg.compile(fn) if compiled else fn
        run(x[:64], y[:64])
        model.layers[1].b.value.flags.writeable = False
        with pytest.raises(ValueError, match='SGD: parameter 3 must be a writeable contiguous array'):
            run(x[64:], y[64:])


# -- the cache folder
def test_a_damaged_or_foreign_cached_step_is_written_and_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setenv('FASTGRAD_CACHE', str(tmp_path))
    for name in [n for n in sys.modules if n.startswith('fastgrad_step_')]:  # as in a new process
        monkeypatch.delitem(sys.modules, name)
    x, y, classes = dataset('synth', np.float32, n=256)
    results = []
    for damage in ('foreign', 'garbage', 'numba', None):  # each found by the next round
        model, opt, fn = make('synth', 'relu', 'sgd', np.float32, classes, 2)
        step = fg.compile(fn)
        losses = step.run(x, y, 96)  # two shapes: the full batches and the last
        results.append((losses, [p.value.copy() for p in model.parameters()]))
        files = sorted(tmp_path.glob('fastgrad_step_*.py'))
        assert len(files) == 2
        for path in files:  # as a new process would find them
            del sys.modules[path.stem]
        if damage == 'foreign':  # the full batches' file holds the last batch's step
            full, last = sorted(files, key=lambda p: 'range(96)' not in p.read_text())
            assert 'range(96)' not in last.read_text()
            full.write_text(last.read_text())
        elif damage == 'garbage':
            files[0].write_text('garbage (((')
        elif damage == 'numba':
            for index in (tmp_path / '__pycache__').glob('*.nbi'):
                index.write_bytes(index.read_bytes()[:50])
    for losses, params in results[1:]:
        np.testing.assert_array_equal(losses, results[0][0])
        for p, q in zip(params, results[0][1]):
            np.testing.assert_array_equal(p, q)


def test_a_cache_folder_that_cannot_be_written_gives_one_no_other_user_can_write(tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / 'file'
    not_a_folder.write_text('')
    monkeypatch.setenv('FASTGRAD_CACHE', str(not_a_folder))
    monkeypatch.setattr(compiled_module.tempfile, 'tempdir', str(tmp_path))
    shared = tmp_path / f'fastgrad-compiled-{os.getuid()}'
    for planted in (False, True):
        monkeypatch.setattr(compiled_module, '_FALLBACK', None)
        if planted:  # made by someone else's hand, writable by all: not used
            shared.chmod(0o777)
        folder = compiled_module.cache_dir()
        assert compiled_module.cache_dir() == folder and (folder == str(shared)) != planted
        info = os.stat(folder)
        assert info.st_uid == os.getuid() and info.st_mode & 0o077 == 0
        assert f'cannot write the cache folder {not_a_folder}; compiled steps go to {folder}' in capsys.readouterr().err
