"""fastgrad.vugrad: vugrad's names, signatures and data on fastgrad's engine, and the runner
`python -m fastgrad.vugrad`. Written from vugrad's documented behaviour (its docstrings, its README and the
course's scripts), not from its files."""
import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastgrad as fg
import fastgrad.vugrad as vg
from fastgrad import data


@pytest.fixture
def global_seed():
    """vugrad draws from numpy's global random state: seed it, and leave it as it was."""
    state = np.random.get_state()
    np.random.seed(0)
    yield
    np.random.set_state(state)


# -- names
def test_vugrad_names_and_module_paths():
    for sub in ('core', 'ops', 'functions', 'modules', 'mnist'):
        importlib.import_module(f'fastgrad.vugrad.{sub}')
    for name in ('TensorNode OpNode Op Module Add Multiply MatrixMultiply Log Id Exp Sum RowMax RowSum Normalize '
                 'BatchMM Sigmoid Expand Select Squeeze Unsqueeze Linear MLP load_synth load_mnist celoss '
                 'logceloss sigmoid softmax logsoftmax init load').split():
        assert hasattr(vg, name), name
    for name in ('TensorNode', 'OpNode', 'Op', 'Module', 'Add', 'Sub', 'Multiply', 'MatrixMultiply'):
        assert hasattr(vg.core, name), name
    assert callable(vg.mnist.init) and callable(vg.mnist.load)


def test_the_engine_objects_are_fastgrads_own():
    assert vg.TensorNode is fg.TensorNode and vg.core.Op is fg.Op and vg.core.OpNode is fg.OpNode
    assert vg.core.Module is fg.Module and vg.core.Add is fg.Add and vg.core.Multiply is fg.Multiply
    assert vg.core.MatrixMultiply is fg.MatrixMultiply and vg.core.Sub is vg.Sub is fg.Subtract
    assert vg.Sum is fg.Sum and vg.Expand is fg.Expand and vg.BatchMM is fg.BatchMM
    assert issubclass(vg.Linear, fg.Module) and isinstance(vg.Linear(2, 3), fg.Linear)
    a = vg.TensorNode(np.ones(2))
    assert isinstance(a - a, fg.TensorNode) and (a - a).source.op is vg.core.Sub


# -- TensorNode and backward with vugrad's signatures
def test_tensornode_takes_vugrads_positional_name():
    a = vg.TensorNode(np.ones((2, 2)), None, 'a')
    assert a.name == 'a' and a.source is None and a.requires_grad
    assert "'a'" in repr(a) and vg.TensorNode(np.ones(1)).name is None
    b = fg.TensorNode(np.ones(2), requires_grad=False)
    assert not b.requires_grad
    with pytest.raises(TypeError):
        fg.TensorNode(np.ones(2), None, None, False)  # requires_grad is keyword-only


def test_backward_takes_vugrads_start_argument():
    x = vg.TensorNode(np.array([1.0, 2.0]))
    vg.Sum.do_forward(x * x).backward(start=True)
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])
    with pytest.raises(ValueError, match='start=False'):
        vg.Sum.do_forward(x).backward(start=False)


# -- the ops fastgrad did not have
def test_id_passes_values_and_gradients_through_diamonds():
    a = vg.TensorNode(np.array([1.0]))
    b = vg.Id.do_forward(a)
    assert b.value is a.value and b.source.op is vg.Id
    left, right = vg.Id.do_forward(b), vg.Id.do_forward(b)
    top = vg.Id.do_forward(left + right)
    e = top + a                      # a feeds the graph twice, once through the diamond
    (vg.Id.do_forward(e) + vg.Id.do_forward(e)).backward()
    assert e.grad.item() == 2.0 and top.grad.item() == 2.0 and left.grad.item() == 2.0
    assert b.grad.item() == 4.0 and a.grad.item() == 6.0


def test_rowmax_and_rowsum():
    x = np.array([[0.0, 1.0], [4.0, 5.0], [9.0, 0.0], [2.0, 2.0]])
    ctx = {}
    np.testing.assert_array_equal(vg.RowMax.forward(ctx, x), [1.0, 5.0, 9.0, 2.0])
    np.testing.assert_array_equal(vg.RowMax.backward(ctx, np.array([0.1, 0.2, 0.3, 0.4])),
                                  [[0.0, 0.1], [0.0, 0.2], [0.3, 0.0], [0.4, 0.0]])  # ties: the first maximum
    # RowSum's backward reads the input's shape from the context under the key RowMax also uses
    np.testing.assert_array_equal(vg.RowSum.backward(ctx, np.array([1.0, 2.0, 3.0, 4.0])),
                                  [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    ctx = {}
    np.testing.assert_array_equal(vg.RowSum.forward(ctx, x), [1.0, 9.0, 9.0, 4.0])
    with pytest.raises(ValueError, match=r'RowMax: input must be a matrix.*\(3,\)'):
        vg.RowMax.do_forward(vg.TensorNode(np.ones(3)))
    a = np.random.default_rng(0).standard_normal((4, 5))
    assert fg.gradcheck(lambda t: vg.RowMax.do_forward(t), a)
    assert fg.gradcheck(lambda t: vg.RowSum.do_forward(t), a)


def test_the_courses_logsoftmax_from_rowmax_and_rowsum_matches_logsoftmax():
    """The course builds a stable log-softmax from RowMax, Unsqueeze, Expand, Sub, Exp, RowSum and Log."""
    def course_logsoftmax(x):
        cols = x.value.shape[1]
        xmax = vg.Expand.do_forward(vg.Unsqueeze.do_forward(vg.RowMax.do_forward(x), dim=1), dim=1, repeats=cols)
        diff = x - xmax
        lse = vg.Log.do_forward(vg.RowSum.do_forward(vg.Exp.do_forward(diff)))
        return diff - vg.Expand.do_forward(vg.Unsqueeze.do_forward(lse, dim=1), dim=1, repeats=cols)

    values = np.random.default_rng(1).standard_normal((6, 4)) * 10
    a, b = vg.TensorNode(values), vg.TensorNode(values)
    out_a, out_b = course_logsoftmax(a), vg.logsoftmax(b)
    np.testing.assert_allclose(out_a.value, out_b.value, rtol=1e-12, atol=1e-12)
    weights = vg.TensorNode(np.random.default_rng(2).standard_normal((6, 4)))
    vg.Sum.do_forward(out_a * weights).backward()
    vg.Sum.do_forward(out_b * weights).backward()
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)


# -- data and modules from numpy's global random state, float64
def test_load_synth_draws_from_numpys_global_state(global_seed):
    (x, y), (xv, yv), k = vg.load_synth(num_train=300, num_val=100)
    assert k == 2 and x.shape == (300, 2) and xv.shape == (100, 2) and x.dtype == np.float64
    np.random.seed(0)
    expected = np.random.randn(400, 2)
    np.testing.assert_array_equal(np.concatenate([x, xv]), expected)
    np.testing.assert_array_equal(np.concatenate([y, yv]), data.synth_labels(expected))
    (x, _), (xv, _), _ = vg.load_synth()
    assert x.shape == (60_000, 2) and xv.shape == (10_000, 2)


def test_linear_is_vugrads_from_the_global_state(global_seed):
    layer = vg.Linear(3, 5)
    np.random.seed(0)
    np.testing.assert_array_equal(layer.w.value, np.random.randn(5, 3) * np.sqrt(2.0 / 8))
    assert layer.w.value.dtype == np.float64 and layer.w.shape == (5, 3)
    np.testing.assert_array_equal(layer.b.value, np.zeros((1, 5)))
    assert layer.parameters() == [layer.w, layer.b]
    x = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_allclose(layer(vg.TensorNode(x)).value, x @ layer.w.value.T + layer.b.value, rtol=1e-12)
    with pytest.raises(ValueError, match=r'Linear: input \(4, 2\)'):
        layer(vg.TensorNode(np.ones((4, 2))))


def test_the_courses_mlp_returns_probabilities_for_celoss(global_seed):
    """vugrad's test: the MLP's probabilities into celoss, a finite difference against backprop."""
    (x, y), _, k = vg.load_synth(num_train=100, num_val=10)
    mlp = vg.MLP(input_size=2, output_size=k)
    assert [p.shape for p in mlp.parameters()] == [(8, 2), (1, 8), (2, 8), (1, 2)]
    probs = mlp(vg.TensorNode(x))
    np.testing.assert_allclose(probs.value.sum(axis=1), 1.0, rtol=1e-12)
    loss0 = vg.celoss(probs, y)
    loss0.backward()
    parm = mlp.parameters()[0]
    eps = 1e-6
    parm.value[0, 0] += eps
    loss1 = vg.celoss(mlp(vg.TensorNode(x)), y)
    assert np.isfinite(loss0.value)
    assert (loss1.value - loss0.value) / eps == pytest.approx(parm.grad[0, 0], rel=1e-4, abs=1e-6)
    assert vg.MLP(2, 3, hidden_mult=2).layer1.w.shape == (4, 2)


def test_fastgrads_own_mlp_still_returns_logits():
    out = fg.MLP(2, 3, hidden=4, rng=0)(fg.TensorNode(np.ones((5, 2))))
    assert not np.allclose(out.value.sum(axis=1), 1.0)


# -- MNIST as vugrad gives it
@pytest.mark.slow
def test_vugrads_mnist_split_and_raw_pixels():
    try:
        arrays = data.mnist_arrays()
    except FileNotFoundError:
        pytest.skip('MNIST is not available offline (pip install "fastgrad[mnist]")')
    (x, y), (xv, yv), k = vg.load_mnist()
    assert k == 10 and x.shape == (55_000, 784) and xv.shape == (5_000, 784)
    assert x.dtype == np.uint8 and y.dtype == np.uint8 and x.max() == 255 and y.max() == 9
    np.testing.assert_array_equal(xv, arrays['train_images'][-5_000:].reshape(5_000, -1))
    np.testing.assert_array_equal(y, arrays['train_labels'][:55_000])
    (x, y), (xt, yt), _ = vg.load_mnist(final=True, flatten=False)
    assert x.shape == (60_000, 28, 28) and xt.shape == (10_000, 28, 28)
    assert list(y[:5]) == [5, 0, 4, 1, 9] and list(yt[:5]) == [7, 2, 1, 0, 4]
    vg.mnist.init()
    images, labels, test_images, test_labels = vg.mnist.load()
    assert images.shape == (60_000, 784) and test_images.shape == (10_000, 784) and labels.shape == (60_000,)


# -- the course's training loop
class CourseLinear(vg.Module):
    """The course's Linear: BatchMM for the weights, Expand to broadcast the bias, its own parameters()."""
    def __init__(self, input_size, output_size):
        super().__init__()
        self.w = vg.TensorNode(np.random.randn(output_size, input_size) * np.sqrt(2.0 / (input_size + output_size)))
        self.b = vg.TensorNode(np.zeros((1, output_size)))

    def forward(self, input):
        n, f = input.size()
        x = vg.BatchMM.do_forward(self.w, input)
        return x + vg.Expand.do_forward(self.b, dim=0, repeats=n)

    def parameters(self):
        return [self.w, self.b]


class CourseMLP(vg.Module):
    def __init__(self, input_size, output_size, hidden_mult=4):
        super().__init__()
        self.layer1 = CourseLinear(input_size, hidden_mult * input_size)
        self.layer2 = CourseLinear(hidden_mult * input_size, output_size)

    def forward(self, input):
        return vg.logsoftmax(self.layer2(vg.sigmoid(self.layer1(input))))

    def parameters(self):
        return self.layer1.parameters() + self.layer2.parameters()


def course_training(epochs, lr, batch):
    """The course's loop through fastgrad.vugrad: (accuracy before each epoch, summed loss) per epoch."""
    (xtrain, ytrain), (xval, yval), num_classes = vg.load_synth(num_train=3_000, num_val=1_000)
    mlp = CourseMLP(input_size=2, output_size=num_classes)
    initial = [p.value.copy() for p in mlp.parameters()]
    log = []
    for epoch in range(epochs):
        o = mlp(vg.TensorNode(xval))
        acc = (np.argmax(o.value, axis=1) == yval).sum() / yval.shape[0]
        o.clear()
        cl = 0.0
        for fr in range(0, len(xtrain), batch):
            to = min(fr + batch, len(xtrain))
            loss = vg.logceloss(mlp(vg.TensorNode(value=xtrain[fr:to, :])), ytrain[fr:to])
            cl += loss.value
            loss.backward()
            for parm in mlp.parameters():
                parm.value -= lr * parm.grad
            loss.zero_grad()
            loss.clear()
        log.append((acc, cl))
    return log, initial, (xtrain, ytrain), (xval, yval)


def fastgrad_training(initial, train, val, epochs, lr, batch):
    """The same model, data and steps in fastgrad's own idiom: MLP, cross_entropy, SGD."""
    (xtrain, ytrain), (xval, yval) = train, val
    model = fg.MLP(2, 2, hidden=8, activation='sigmoid', dtype=np.float64)
    model.load_state_dict(dict(zip(['layers.0.w', 'layers.0.b', 'layers.1.w', 'layers.1.b'], initial)))
    opt = fg.SGD(model.parameters(), lr=lr)
    log = []
    for epoch in range(epochs):
        with fg.no_grad():
            acc = (np.argmax(model(fg.TensorNode(xval)).value, axis=1) == yval).mean()
        cl = 0.0
        for fr in range(0, len(xtrain), batch):
            opt.zero_grad()
            loss = fg.cross_entropy(model(fg.TensorNode(xtrain[fr:fr + batch], requires_grad=False)),
                                    ytrain[fr:fr + batch], reduction='sum')
            cl += loss.value
            loss.backward()
            opt.step()
        log.append((acc, cl))
    return log


def test_the_courses_training_loop_matches_fastgrads_own_path(global_seed):
    course, initial, train, val = course_training(epochs=4, lr=0.1, batch=64)
    own = fastgrad_training(initial, train, val, epochs=4, lr=0.1, batch=64)
    assert [acc for acc, _ in course] == [acc for acc, _ in own]
    np.testing.assert_allclose([cl for _, cl in course], [cl for _, cl in own], rtol=1e-9)
    assert course[-1][0] > 0.9, course


def test_the_courses_training_loop_repeats_under_the_same_seed(global_seed):
    first = course_training(epochs=2, lr=0.01, batch=128)[0]
    np.random.seed(0)
    assert course_training(epochs=2, lr=0.01, batch=128)[0] == first


# -- the runner
FAKE_VUGRAD = '''raise ImportError("the checkout's vugrad was imported instead of fastgrad.vugrad")\n'''

SCRIPT = '''\
import os, sys, importlib.abc, importlib.util

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, '..', 'checkout'))     # as the course's _context.py does


class CheckoutFinder(importlib.abc.MetaPathFinder):          # and a finder of its own, first in line
    def find_spec(self, name, path=None, target=None):
        if name == 'vugrad' or name.startswith('vugrad.'):
            return importlib.util.spec_from_file_location(
                name, os.path.join(here, '..', 'checkout', 'vugrad', '__init__.py'))
        return None


sys.meta_path.insert(0, CheckoutFinder())
import vugrad
import vugrad.core
import vugrad.mnist
from vugrad.ops import RowMax
from vugrad.core import Sub, TensorNode
import vugrad as vg
import fastgrad
import helper                                                # the script's folder leads sys.path

assert vugrad is fastgrad.vugrad and vugrad.core is fastgrad.vugrad.core
assert TensorNode is fastgrad.TensorNode and Sub is fastgrad.Subtract and RowMax is fastgrad.vugrad.RowMax
print('name', __name__)
print('argv', sys.argv[1:])
if '--fail' in sys.argv:
    sys.exit(3)
'''


@pytest.fixture
def course_folder(tmp_path):
    (tmp_path / 'checkout' / 'vugrad').mkdir(parents=True)
    (tmp_path / 'checkout' / 'vugrad' / '__init__.py').write_text(FAKE_VUGRAD)
    (tmp_path / 'checkout' / 'vugrad' / 'core.py').write_text(FAKE_VUGRAD)
    (tmp_path / 'experiments').mkdir()
    (tmp_path / 'experiments' / 'train.py').write_text(SCRIPT)
    (tmp_path / 'experiments' / 'helper.py').write_text('')
    return tmp_path


def runner(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'fastgrad.vugrad', *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
def test_runner_gives_the_layer_to_a_script_that_puts_a_checkout_first(course_folder):
    run = runner('experiments/train.py', '-D', 'mnist', '--lr', '1e-4', cwd=course_folder)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ['name __main__', "argv ['-D', 'mnist', '--lr', '1e-4']"]
    run = runner('experiments/train.py', '--fail', cwd=course_folder)
    assert run.returncode == 3 and run.stdout.splitlines()[-1] == "argv ['--fail']", run.stderr
    run = subprocess.run([sys.executable, 'experiments/train.py'], cwd=course_folder, capture_output=True, text=True)
    assert "the checkout's vugrad was imported" in run.stderr  # without the runner the checkout wins


@pytest.mark.slow
def test_runner_runs_a_module_such_as_unittest(course_folder):
    (course_folder / 'test_course.py').write_text(textwrap.dedent('''\
        import sys, os, unittest
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'checkout'))
        import numpy as np
        import vugrad as vg

        class TestCourse(unittest.TestCase):
            def test_rowmax(self):
                ctx = {}
                vg.RowMax.forward(ctx, np.array([[0., 1.], [9., 0.]]))
                self.assertTrue((vg.RowMax.backward(ctx, np.array([.5, .25])) == [[0, .5], [.25, 0]]).all())
        '''))
    run = runner('-m', 'unittest', 'test_course', cwd=course_folder)
    assert run.returncode == 0 and 'Ran 1 test' in run.stderr and 'OK' in run.stderr, run.stderr


@pytest.mark.slow
def test_runner_usage_and_a_missing_script(tmp_path):
    run = runner(cwd=tmp_path)
    assert run.returncode == 2 and 'usage: python -m fastgrad.vugrad SCRIPT' in run.stderr
    run = runner('nowhere.py', cwd=tmp_path)
    assert run.returncode == 2 and "can't open file 'nowhere.py'" in run.stderr
