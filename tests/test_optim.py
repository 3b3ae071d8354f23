"""Optimizers as torch.optim keeps them (param_groups, state[p]) and the learning-rate schedules."""
import json
import subprocess
import sys

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import TensorNode

try:
    import torch
except ImportError:
    torch = None


def quadratic_grads(params, seed):
    rng = np.random.default_rng(seed)
    for p in params:
        p.grad = rng.standard_normal(p.shape)


def test_param_groups_and_per_parameter_state():
    a, b = TensorNode(np.ones((2, 3))), TensorNode(np.ones(4))
    opt = fg.SGD([{'params': [a]}, {'params': [b], 'lr': 0.5}], lr=0.1, momentum=0.9)
    assert [g['lr'] for g in opt.param_groups] == [0.1, 0.5]
    assert opt.param_groups[1]['momentum'] == 0.9  # the rest from the optimizer's own
    a.grad, b.grad = np.ones((2, 3)), np.ones(4)
    opt.step()
    np.testing.assert_allclose(a.value, 0.9)
    np.testing.assert_allclose(b.value, 0.5)
    assert set(opt.state) == {a, b}
    np.testing.assert_array_equal(opt.state[a]['momentum_buffer'], np.ones((2, 3)))
    opt.lr = 0.01  # one-group habits: sets every group
    assert [g['lr'] for g in opt.param_groups] == [0.01, 0.01]
    with pytest.raises(ValueError, match="unknown hyperparameter 'betas'"):
        fg.SGD([{'params': [a], 'betas': (0.9, 0.99)}], lr=0.1)
    with pytest.raises(ValueError, match='a parameter appears twice'):
        fg.SGD([{'params': [a]}, {'params': [a]}], lr=0.1)
    with pytest.raises(ValueError, match='lr is required'):
        fg.SGD([a], lr=None)


@pytest.mark.parametrize('make', [lambda p: fg.SGD(p, lr=0.1, momentum=0.9), lambda p: fg.Adam(p, lr=0.01)])
def test_state_dict_of_several_groups_round_trips(make):
    def build():
        a, b = TensorNode(np.ones((2, 3))), TensorNode(np.full(4, 2.0))
        opt = make([{'params': [a]}, {'params': [b], 'lr': 0.05}])
        return [a, b], opt

    params, opt = build()
    for seed in range(3):
        quadratic_grads(params, seed)
        opt.step()
    state = opt.state_dict()
    assert state['param_groups.1.lr'] == 0.05
    params2, opt2 = build()
    for p, q in zip(params, params2):
        q.value[...] = p.value
    opt2.load_state_dict(state)
    assert opt2.param_groups[1]['lr'] == 0.05
    for ps in (params, params2):
        quadratic_grads(ps, 7)
    opt.step()
    opt2.step()
    for p, q in zip(params, params2):
        np.testing.assert_array_equal(p.value, q.value)


def test_adam_keeps_a_step_count_per_parameter():
    a, b = TensorNode(np.ones(3)), TensorNode(np.ones(3))
    opt = fg.Adam([a, b], lr=0.1)
    a.grad = np.ones(3)
    opt.step()
    a.grad, b.grad = np.ones(3), np.ones(3)
    opt.step()
    assert opt.state[a]['step'] == 2 and opt.state[b]['step'] == 1
    np.testing.assert_array_equal(opt.state_dict()['step'], [2, 1])
    # the first step of b is bias-corrected as a first step: it moves by lr exactly, as a's first did
    np.testing.assert_allclose(b.value, 1 - 0.1)


@pytest.mark.skipif(torch is None, reason='torch is not installed')
@pytest.mark.parametrize('name, ours, theirs', [
    ('step', lambda o: fg.StepLR(o, step_size=3, gamma=0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
    ('cosine', lambda o: fg.CosineAnnealingLR(o, T_max=7, eta_min=0.001),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 7, eta_min=0.001)),
])
def test_schedules_match_torch(name, ours, theirs):
    opt = fg.SGD([TensorNode(np.ones(2))], lr=0.1, momentum=0.9)
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
    mine, reference = ours(opt), theirs(topt)
    for epoch in range(12):
        np.testing.assert_allclose(mine.get_last_lr(), reference.get_last_lr(), rtol=1e-12)
        topt.step()
        mine.step()
        reference.step()
    assert mine.state_dict() == {'last_epoch': 12}


def test_schedule_resumes_at_its_epoch():
    def lrs(schedule, epochs):
        out = []
        for _ in range(epochs):
            out.append(schedule.optimizer.lr)
            schedule.step()
        return out

    straight = lrs(fg.CosineAnnealingLR(fg.SGD([TensorNode(np.ones(2))], lr=0.1), T_max=10), 10)
    resumed = fg.CosineAnnealingLR(fg.SGD([TensorNode(np.ones(2))], lr=0.1), T_max=10)
    resumed.load_state_dict({'last_epoch': 4})
    assert lrs(resumed, 6) == straight[4:]
    with pytest.raises(ValueError, match='step_size must be a positive integer, not 0'):
        fg.StepLR(resumed.optimizer, step_size=0)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'fastgrad', 'train', '--no-progress', *args], cwd=cwd,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_cli_schedule_logs_each_epochs_lr_and_resumes_exactly(tmp_path):
    common = ['-D', 'synth', '-e', '4', '--schedule', 'step', '--step-size', '1', '--gamma', '0.5', '--hidden', '8']
    run = run_cli(*common, '--log', 'full.jsonl', cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    full = [json.loads(line) for line in (tmp_path / 'full.jsonl').read_text().splitlines()]
    assert [r['lr'] for r in full] == [0.01, 0.005, 0.0025, 0.00125]
    run = run_cli(*common[:3], '2', *common[4:], '--checkpoint', 'ck', cwd=tmp_path)  # two epochs, then on to four
    assert run.returncode == 0, run.stderr
    run = run_cli(*common, '--checkpoint', 'ck', '--resume', '--log', 'resumed.jsonl', cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    resumed = [json.loads(line) for line in (tmp_path / 'resumed.jsonl').read_text().splitlines()]
    keep = ('epoch', 'val_accuracy', 'train_loss', 'lr')
    assert [[r[k] for k in keep] for r in resumed] == [[r[k] for k in keep] for r in full]
    bad = run_cli('--schedule', 'linear', cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'linear'" in bad.stderr
