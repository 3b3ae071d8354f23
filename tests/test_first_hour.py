"""A newcomer's first hour (issue 14), through the command line: what the first run says while numba
compiles, --help, the sweep's default, Ctrl-C and --resume messages, the end-of-run summary, the figure."""
import json
import os
import signal
import subprocess
import sys

import pytest

from fastgrad.plots import plot_curves


def fastgrad(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, '-m', 'fastgrad', *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, **kwargs)


@pytest.mark.slow
def test_a_cold_first_run_says_it_compiles_and_keeps_it_out_of_the_epoch_time(tmp_path):
    """With an empty numba cache the run says at once (on stderr, piped too) that it compiles, and how long
    it took; the epoch's seconds leave the compilation out. A second run loads the cache and says nothing."""
    env = {'NUMBA_CACHE_DIR': str(tmp_path / 'numba'), 'FASTGRAD_CACHE': str(tmp_path / 'steps')}
    log = tmp_path / 'log.jsonl'
    cold = fastgrad('train', '-e', '1', '--hidden', '8', '--log', str(log), env=env)
    assert cold.returncode == 0, cold.stderr
    lines = cold.stderr.splitlines()
    assert lines[0] == ("fastgrad: compiling fastgrad's kernels for float32, first run only (later runs load "
                        "them from numba's cache)"), cold.stderr
    compiled = [line for line in lines if line.startswith('fastgrad: compiled in ')]
    assert len(compiled) == 1, cold.stderr
    compile_seconds = float(compiled[0].split()[3])
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record['seconds'] < compile_seconds  # the compile is not in the epoch
    assert 'epoch 000' in cold.stdout
    warm = fastgrad('train', '-e', '1', '--hidden', '8', env=env)
    assert warm.returncode == 0 and 'compiling' not in warm.stderr, warm.stderr


def option_help(help_text):
    """{option line's first words: the option's whole help text} from argparse's --help output."""
    options, current = {}, None
    for line in help_text.split('options:', 1)[1].splitlines():
        if line.startswith('  -'):
            current = line.strip()
            options[current] = ''
        elif current is not None:
            options[current] += ' ' + line.strip()
    return {' '.join(k.split()): ' '.join(v.split()) for k, v in options.items()}


def help_of(options, option):
    (text,) = [k + ' ' + v for k, v in options.items() if k.startswith(option)]
    return text


@pytest.mark.slow
def test_help_shows_every_default():
    options = option_help(fastgrad('train', '--help').stdout)
    for option, default in [('-D {synth,mnist}', 'synth'), ('-b BATCH_SIZE', '128'), ('-e EPOCHS', '20'),
                            ('-l LR', '0.01'), ('--optimizer', 'sgd'), ('--schedule', 'constant'),
                            ('--dtype', 'float32'), ('--seed', '0'), ('--activation', 'relu')]:
        assert f'default: {default}' in help_of(options, option), (option, help_of(options, option))
    assert 'default 0.9' in help_of(options, '--momentum')
    sweep = option_help(fastgrad('experiment', 'sweep', '--help').stdout)
    assert 'default: relu' in help_of(sweep, '--activation')


@pytest.mark.slow
def test_sweep_defaults_to_relu_like_train(tmp_path):
    out = fastgrad('experiment', 'sweep', '--lr', '0.05', '--momentum', '0.9', '--epochs', '1', '--hidden', '16',
                   '--workers', '1', '--out', str(tmp_path), '--no-progress')
    assert out.returncode == 0, out.stderr
    train = fastgrad('train', '-l', '0.05', '--momentum', '0.9', '-e', '1', '--hidden', '16', '--log',
                     str(tmp_path / 'log.jsonl'))
    swept = (tmp_path / 'sweep.csv').read_text().splitlines()[1].split(',')
    record = json.loads((tmp_path / 'log.jsonl').read_text())
    assert float(swept[3]) == pytest.approx(record['val_accuracy'])  # the same model: relu in both
    assert record['val_accuracy'] > 0.9, train.stdout


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved_and_resume_says_it_starts_over(tmp_path):
    """--resume without a checkpoint says it starts from epoch 0 (after the signal handlers are in place);
    SIGINT then stops the run within epoch 0, before any checkpoint: the message says nothing was saved."""
    ckpt = tmp_path / 'ckpt'
    proc = subprocess.Popen([sys.executable, '-m', 'fastgrad', 'train', '-e', '1000', '--checkpoint', str(ckpt),
                             '--resume', '--no-progress'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)  # a guard against a hang, not a speed limit
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first == f'no checkpoint in {ckpt} yet: starting from epoch 0\n'
    assert proc.returncode == 130, err
    assert 'epoch 000' not in out and not (ckpt / 'checkpoint.npz').exists()
    assert 'no epoch was saved' in err and 'nothing to resume' in err and 'resume with' not in err, err


@pytest.mark.slow
def test_the_end_of_a_run_says_where_the_outputs_went(tmp_path):
    log, plot, ckpt = tmp_path / 'log.jsonl', tmp_path / 'curves.png', tmp_path / 'ckpt'
    out = fastgrad('train', '-e', '2', '--hidden', '8', '--log', str(log), '--plot', str(plot),
                   '--checkpoint', str(ckpt))
    assert out.returncode == 0, out.stderr
    tail = out.stdout.splitlines()[-3:]
    assert tail == [f'       log: {log}', f'      plot: {plot}', f'checkpoint: {ckpt / "checkpoint.npz"}']
    assert log.exists() and plot.exists() and (ckpt / 'checkpoint.npz').exists()
    plain = fastgrad('train', '-e', '1', '--hidden', '8')
    assert plain.stdout.splitlines()[-1].startswith('best accuracy')  # no outputs, no lines about them


def test_the_figure_has_whole_epoch_ticks(tmp_path):
    pytest.importorskip('matplotlib')
    history = [{'epoch': k, 'val_accuracy': 0.5 + k / 40, 'train_loss': 100.0 / (k + 1)} for k in range(10)]
    fig = plot_curves({'relu': history, 'sigmoid': history}, tmp_path / 'curves.png')
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert all('.' not in label.get_text() for label in ax.get_xticklabels())
