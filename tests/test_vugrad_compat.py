"""Code written for vugrad runs unchanged: the course's training loop, the report's ReLU op, its tests."""
import numpy as np

import fastgrad as vg


def synth(n, seed):
    """vugrad's synthetic task: class 1 where x^T [[1, .5], [1, .2]] x exceeds 0.6."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2))
    q = np.einsum('bf, fk, bk -> b', x, np.array([[1, 0.5], [1, 0.2]]), x)
    return x, (q > 0.6).astype(np.int64)


class ReLU(vg.Op):
    """The report's own ReLU, as a user-defined op."""
    @staticmethod
    def forward(context, input):
        relu = np.maximum(0, input)
        context['relu'] = relu
        return relu

    @staticmethod
    def backward(context, goutput):
        relu = context['relu']
        relu[relu > 0] = 1  # the report turns the stored forward value into a mask in place
        return goutput * relu


class VugradLinear(vg.Module):
    """vugrad's Linear, written with BatchMM and Expand."""
    def __init__(self, input_size, output_size):
        super().__init__()
        self.w = vg.TensorNode(np.random.default_rng(0).standard_normal((output_size, input_size)) * 0.5)
        self.b = vg.TensorNode(np.zeros((1, output_size)))

    def forward(self, input):
        n, f = input.size()
        x = vg.BatchMM.do_forward(self.w, input)
        exb = vg.Expand.do_forward(self.b, dim=0, repeats=n)
        return x + exb

    def parameters(self):
        return [self.w, self.b]


class VugradMLP(vg.Module):
    def __init__(self, input_size, output_size, hidden_mult=4):
        super().__init__()
        hidden_size = hidden_mult * input_size
        self.layer1 = VugradLinear(input_size, hidden_size)
        self.layer2 = VugradLinear(hidden_size, output_size)

    def forward(self, input):
        hidden = ReLU.do_forward(self.layer1(input))
        return vg.logsoftmax(self.layer2(hidden))

    def parameters(self):
        return self.layer1.parameters() + self.layer2.parameters()


def test_course_training_loop_runs_unchanged():
    xtrain, ytrain = synth(6000, 0)
    xval, yval = synth(1000, 1)
    mlp = VugradMLP(input_size=2, output_size=2, hidden_mult=8)
    n, b, lr = xtrain.shape[0], 128, 0.01
    for epoch in range(8):
        cl = 0.0
        for fr in range(0, n, b):
            to = min(fr + b, n)
            batch = vg.TensorNode(value=xtrain[fr:to, :])
            loss = vg.logceloss(mlp(batch), ytrain[fr:to])
            cl += loss.value
            loss.backward()
            for parm in mlp.parameters():
                parm.value -= lr * parm.grad
            loss.zero_grad()
            loss.clear()
    o = mlp(vg.TensorNode(xval))
    acc = (np.argmax(o.value, axis=1) == yval).mean()
    o.clear()
    assert acc > 0.95, acc


def test_report_relu_matches_builtin():
    x = np.random.default_rng(2).standard_normal((4, 5))
    a, b = vg.TensorNode(x), vg.TensorNode(x)
    ra, rb = ReLU.do_forward(a), vg.relu(b)
    np.testing.assert_array_equal(ra.value, rb.value)
    (ra * 3.0).sum().backward()
    (rb * 3.0).sum().backward()
    np.testing.assert_array_equal(a.grad, b.grad)


def test_vugrad_finite_difference_routine():
    """The course's test helper: backward, perturb one element, zero_grad and clear both graphs."""
    def fn(x):
        return vg.Sum.do_forward(vg.Normalize.do_forward(vg.Exp.do_forward(vg.MatrixMultiply.do_forward(x, x))))

    inp = vg.TensorNode(np.random.default_rng(4).standard_normal((4, 4)) * 0.3)
    for i in range(4):
        for j in range(4):
            eps = 1e-6
            loss0 = fn(inp)
            loss0.backward()
            bp = inp.grad[i, j]
            inpe = vg.TensorNode(inp.value.copy())
            inpe.value[i, j] += eps
            loss1 = fn(inpe)
            assert abs((loss1.value - loss0.value) / eps - bp) < 1e-4
            loss0.zero_grad()
            loss1.zero_grad()
            loss0.clear()
            loss1.clear()


def test_float64_data_into_float32_model():
    """vugrad's data is float64; the default modules are float32: the Linear op casts, the gradient comes back."""
    mlp = vg.MLP(2, 2, hidden=8, rng=0)
    x = vg.TensorNode(np.random.default_rng(0).standard_normal((5, 2)))
    loss = vg.cross_entropy(mlp(x), np.array([0, 1, 0, 1, 1]))
    assert loss.dtype == np.float32
    loss.backward()
    assert x.grad.dtype == np.float64 and x.grad.any()


def test_modern_training_with_optimizer():
    xtrain, ytrain = synth(6000, 0)
    xval, yval = synth(1000, 1)
    mlp = vg.MLP(2, 2, hidden=32, activation='relu', rng=0)
    opt = vg.Adam(mlp.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    for epoch in range(5):
        order = rng.permutation(len(xtrain))
        for fr in range(0, len(order), 64):
            idx = order[fr:fr + 64]
            opt.zero_grad()
            vg.cross_entropy(mlp(vg.TensorNode(xtrain[idx], requires_grad=False)), ytrain[idx]).backward()
            opt.step()
    with vg.no_grad():
        acc = (np.argmax(mlp(vg.TensorNode(xval)).value, axis=1) == yval).mean()
    assert acc > 0.97, acc
