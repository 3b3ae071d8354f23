"""The framework comparison script end to end: a smoke test of its table (it times, but no speed is asserted)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # frameworks trained in subprocesses

SCRIPT = Path(__file__).resolve().parents[1] / 'asv_benchmarks' / 'compare_frameworks.py'


def test_compare_frameworks_prints_medians_and_round_ratios():
    run = subprocess.run([sys.executable, str(SCRIPT), '--workload', 'B', '--repeats', '2', '--epochs', '2',
                          '--only', 'fastgrad-step', 'numpy'], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    header = next(line for line in lines if line.startswith('| workload'))
    names = [cell.strip()[:-2] for cell in header.strip('|').split('|')[1:] if cell.strip().endswith(' s')]
    assert names == ['fastgrad', 'fastgrad-step', 'numpy']
    cells = [cell.strip() for cell in next(line for line in lines if line.startswith('| B:')).strip('|').split('|')]
    times, ratios = cells[1:1 + len(names)], cells[1 + len(names):]
    assert all(float(t) > 0 for t in times)
    assert len(ratios) == len(names) - 1  # the compiled epoch against each other column
    parsed = [re.fullmatch(r'(\d+\.\d\d)x \((\d+\.\d\d)-(\d+\.\d\d)\)', cell) for cell in ratios]
    assert all(parsed), ratios  # the ratio of the medians, then the lowest and highest ratio of one round
    for _, low, high in (map(float, match.groups()) for match in parsed):
        assert 0 <= low <= high, run.stdout  # 0.00: a round's ratio under 0.005 (a peer stalled on a busy machine)
    # fastgrad / numpy: the ratio is of the medians before rounding, printed to two decimals; the times are
    # rounded to four, so their quotient bounds it only within what that rounding allows
    mine, numpy_s = float(times[0]), float(times[2])
    ratio, half = float(parsed[1][1]), 0.00005
    low, high = (mine - half) / (numpy_s + half) - 0.005, (mine + half) / (numpy_s - half) + 0.005
    assert low - 1e-9 <= ratio <= high + 1e-9, run.stdout


def test_peers_start_from_weights_drawn_as_fastgrads_mlp():
    """numpy, PyTorch and JAX start from the weights fastgrad's relu MLP starts from (He normal before a relu,
    Glorot for the output): the same first loss, and the same spread as fastgrad's."""
    sys.path.insert(0, str(SCRIPT.parent))
    import compare_frameworks as cf
    import fastgrad as fg
    sizes = [784, 300, 10]
    for w, layer in zip(cf.initial_weights(sizes), fg.MLP(784, 10, hidden=[300], rng=0).layers):
        assert w.shape == layer.w.value.T.shape and w.dtype == layer.w.value.dtype
        assert w.std() == pytest.approx(layer.w.value.std(), rel=0.03)
    rng = np.random.default_rng(1)
    xb, yb = rng.random((64, 784), dtype=np.float32), rng.integers(0, 10, 64)
    losses = {'numpy': cf.numpy_step(sizes, 0.01, 0.9)(xb, yb), 'torch': cf.torch_trainer(sizes, 0.01, 0.9)[1](xb, yb)}
    if importlib.util.find_spec('jax'):
        losses['jax'] = cf.jax_step_trainer(sizes, 0.01, 0.9)[1](xb, yb)
    assert all(loss == pytest.approx(losses['numpy'], rel=1e-5) for loss in losses.values()), losses
