"""`fastgrad train` end to end on synth: epoch lines, JSON log, plot, checkpoints, resume, bad arguments."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from fastgrad import cli
from fastgrad.files import load_npz
from fastgrad.train import TrainConfig, train


def fastgrad(*args, **kwargs):
    return subprocess.run([sys.executable, '-m', 'fastgrad', *args], capture_output=True, text=True, **kwargs)


@pytest.mark.slow
def test_train_synth_end_to_end(tmp_path, capsys):
    log, plot = tmp_path / 'log.jsonl', tmp_path / 'curves.png'
    code = cli.main(['train', '-D', 'synth', '-e', '3', '--activation', 'relu', '--seed', '1', '-l', '0.05',
                     '--log', str(log), '--plot', str(plot), '--no-progress'])
    out = capsys.readouterr().out
    assert code == 0
    for k in range(3):
        assert f'epoch {k:03}' in out
    lines = out.splitlines()
    assert lines[1].startswith('       accuracy: 0.') and lines[2].startswith('   running loss: ')
    assert 'best accuracy' in out and 'samples/s' in out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1, 2]
    assert {'epoch', 'val_accuracy', 'train_loss', 'seconds', 'samples_per_second'} <= set(records[0])
    assert records[-1]['val_accuracy'] > 0.95
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_python_dash_m_and_no_progress_bar_in_pipes():
    out = fastgrad('train', '-D', 'synth', '-e', '1', '--hidden', '4')
    assert out.returncode == 0, out.stderr
    assert 'epoch 000' in out.stdout and 'it/s' not in out.stderr


@pytest.mark.parametrize('args,message', [
    (['train', '-D', 'cifar'], "invalid choice: 'cifar' (choose from synth, mnist)"),
    (['train', '--activation', 'gelu'], "invalid choice: 'gelu'"),
    (['train', '--optimizer', 'rmsprop'], "choose from sgd, adam"),
    (['train', '-b', '0'], 'argument -b/--batch-size: must be a positive integer, not 0'),
    (['train', '--resume'], '--resume needs --checkpoint'),
])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    assert exit.value.code == 2
    assert message.replace("'", '') in capsys.readouterr().err.replace("'", '')


@pytest.mark.slow
def test_missing_dataset_says_how_to_get_it(tmp_path):
    out = fastgrad('train', '-D', 'mnist', '--data-dir', str(tmp_path), '-e', '1')
    assert out.returncode == 2
    assert 'train-images-idx3-ubyte' in out.stderr and str(tmp_path) in out.stderr


def final_weights(folder):
    return {k: v for k, v in load_npz(os.path.join(folder, 'checkpoint.npz')).items() if k != 'meta'}


def history(folder):
    meta = json.loads(str(load_npz(os.path.join(folder, 'checkpoint.npz'))['meta']))
    return [{k: v for k, v in r.items() if k not in ('seconds', 'samples_per_second')} for r in meta['history']]


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_resume_equals_uninterrupted(tmp_path, optimizer):
    config = dict(dataset='synth', epochs=4, hidden=[6], optimizer=optimizer, lr=0.02, seed=5)
    train(TrainConfig(**config), checkpoint=tmp_path / 'whole')
    train(TrainConfig(**dict(config, epochs=2)), checkpoint=tmp_path / 'parts')
    train(TrainConfig(**config), checkpoint=tmp_path / 'parts', resume=True)
    whole, parts = final_weights(tmp_path / 'whole'), final_weights(tmp_path / 'parts')
    assert whole.keys() == parts.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], parts[key], err_msg=key)
    assert history(tmp_path / 'whole') == history(tmp_path / 'parts')


def test_resume_refuses_other_settings(tmp_path):
    train(TrainConfig(dataset='synth', epochs=1, hidden=[4]), checkpoint=tmp_path)
    with pytest.raises(ValueError, match='different settings.*hidden'):
        train(TrainConfig(dataset='synth', epochs=2, hidden=[5]), checkpoint=tmp_path, resume=True)


def test_resume_with_other_epochs_only_where_the_epochs_run_keep_their_rates(tmp_path):
    """A cosine schedule is laid out over --epochs: after two epochs of four, the second epoch's rate would
    differ under eight; after one it would not (epoch 0 always runs at the initial rate)."""
    cosine = dict(dataset='synth', hidden=[4], schedule='cosine')
    train(TrainConfig(**cosine, epochs=2), checkpoint=tmp_path / 'two')
    with pytest.raises(ValueError, match=r'two/checkpoint.npz: its epochs ran at learning rates \[0.01, 0.005\], but '
                                         r'a cosine schedule over --epochs 4 gives them \[0.01, 0.0085'):
        train(TrainConfig(**cosine, epochs=4), checkpoint=tmp_path / 'two', resume=True)
    whole = train(TrainConfig(**cosine, epochs=3))
    train(TrainConfig(**cosine, epochs=1), checkpoint=tmp_path / 'one')
    resumed = train(TrainConfig(**cosine, epochs=3), checkpoint=tmp_path / 'one', resume=True)
    assert [r['lr'] for r in resumed['history']] == [r['lr'] for r in whole['history']]


@pytest.mark.parametrize('lr, dtype, value', [('1e-50', 'float32', '0.0'), ('1e300', 'float32', 'inf'),
                                              ('1e-46', 'float32', '0.0')])
def test_a_learning_rate_the_dtype_cannot_hold_is_refused(lr, dtype, value):
    with pytest.raises(ValueError, match=re.escape(f'--learning-rate {float(lr)} is {value} in {dtype}')):
        train(TrainConfig(dataset='synth', epochs=1, hidden=[4], lr=float(lr), dtype=dtype))


def test_too_few_training_images_to_keep_10000_for_validation(tmp_path):
    from test_data import make_idx_dataset
    make_idx_dataset(tmp_path / 'idx', n_train=44, n_test=16)
    with pytest.raises(ValueError, match=r'idx: 44 training images, but the last 10,000 validate.*--final'):
        train(TrainConfig(dataset='mnist', epochs=1, hidden=[4], data_dir=str(tmp_path / 'idx')))


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
    """A real process stopped by SIGTERM mid-run keeps its last whole checkpoint; resuming it ends the same.

    The signal goes out once the first epoch's lines are printed (its checkpoint is written before them), into
    a run of a thousand epochs, far too long to finish first: the stop is tested every time, after at least one
    whole epoch; a run that ignores the signal finishes with 0 and fails the test."""
    args = ['train', '-D', 'synth', '-e', '1000', '--hidden', '16', '--seed', '3', '--no-progress']
    ckpt = tmp_path / 'stopped'
    with open(tmp_path / 'stderr', 'w+') as stderr:
        proc = subprocess.Popen([sys.executable, '-m', 'fastgrad', *args, '--checkpoint', str(ckpt)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            printed = []
            for line in proc.stdout:
                printed.append(line)
                if line.startswith('   running loss: '):
                    break
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=600)  # a guard against a hang, not a speed limit
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr.seek(0)
        err = stderr.read()
    assert printed[:1] == ['epoch 000\n'] and printed[-1].startswith('   running loss: '), ''.join(printed) + err
    assert proc.returncode == 130 and 'resume with --resume' in err, err
    done = len(history(ckpt))
    assert done >= 1
    epochs = str(done + 2)
    resumed = fastgrad(*args[:4], epochs, *args[5:], '--checkpoint', str(ckpt), '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert f'epoch {done:03}' in resumed.stdout and 'epoch 000' not in resumed.stdout
    whole = fastgrad(*args[:4], epochs, *args[5:], '--checkpoint', str(tmp_path / 'whole'))
    assert whole.returncode == 0
    for key, value in final_weights(tmp_path / 'whole').items():
        np.testing.assert_array_equal(value, final_weights(ckpt)[key], err_msg=key)
    assert history(tmp_path / 'whole') == history(ckpt)
