"""`fastgrad experiment activations` and `... sweep` end to end on small synth runs."""
import csv

import pytest

from fastgrad import cli, experiments


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_activations(tmp_path, capsys):
    code = cli.main(['experiment', 'activations', '-e', '3', '--hidden', '8', '--out', str(tmp_path), '--no-progress'])
    out = capsys.readouterr().out
    assert code == 0
    rows = read_csv(tmp_path / 'activations.csv')
    assert list(rows[0]) == ['epoch', 'activation', 'val_accuracy', 'train_loss']
    assert [(r['epoch'], r['activation']) for r in rows] == [(str(e), a) for a in ('sigmoid', 'relu') for e in range(3)]
    assert (tmp_path / 'activations.png').read_bytes()[:4] == b'\x89PNG'
    for activation in ('sigmoid', 'relu'):
        final = float([r for r in rows if r['activation'] == activation][-1]['val_accuracy'])
        assert f'{activation:>7}: final accuracy {final:.4f}, final running loss ' in out
    # seed 0: the sigmoid net predicts the majority class for two epochs (as the README says), then moves
    sigmoid = [float(r['val_accuracy']) for r in rows if r['activation'] == 'sigmoid']
    assert sigmoid[0] == sigmoid[1] == 0.5447 != sigmoid[2]
    assert 'sigmoid accuracy sat still over epochs 0-1 (at 0.5447)\n' in out


@pytest.mark.slow
def test_activations_eager_and_compiled_agree(tmp_path):
    """`--eager` runs the same experiment op by op: the same accuracies, losses to rounding (the 2-8-2
    MLP's compiled layers are loops, which sum in another order)."""
    runs = {}
    for mode in ('compiled', 'eager'):
        args = ['experiment', 'activations', '-e', '2', '--hidden', '8', '--out', str(tmp_path / mode), '--no-progress']
        assert cli.main(args + (['--eager'] if mode == 'eager' else [])) == 0
        runs[mode] = read_csv(tmp_path / mode / 'activations.csv')
    compiled, eager = runs['compiled'], runs['eager']
    assert [{k: v for k, v in r.items() if k != 'train_loss'} for r in compiled] == \
        [{k: v for k, v in r.items() if k != 'train_loss'} for r in eager]
    assert [float(r['train_loss']) for r in compiled] == pytest.approx([float(r['train_loss']) for r in eager], rel=1e-6)


def test_still_epochs():
    history = [{'epoch': k, 'val_accuracy': a} for k, a in enumerate([0.5, 0.5, 0.5, 0.7, 0.8, 0.8])]
    assert experiments.still_epochs(history) == [(0, 2), (4, 5)]


SWEEP = ['experiment', 'sweep', '--lr', '0.05', '1e8', '--momentum', '0.5', '0.9', '--epochs', '1', '2',
         '--hidden', '8', '--activation', 'relu', '--no-progress']


def sweep_results(tmp_path, workers, capsys):
    out_dir = tmp_path / f'workers{workers}'
    assert cli.main(SWEEP + ['--workers', str(workers), '--out', str(out_dir)]) == 0
    out = capsys.readouterr().out
    rows = read_csv(out_dir / 'sweep.csv')
    assert list(rows[0]) == ['lr', 'momentum', 'epochs', 'val_accuracy', 'train_loss', 'seconds', 'error']
    assert len(rows) == 8 and out.count('[') >= 8
    table = (out_dir / 'sweep.md').read_text()
    assert '**best**' in table and table.count('\n') == 10
    return {(r['lr'], r['momentum'], r['epochs']): (r['val_accuracy'], r['train_loss'], r['error']) for r in rows}


@pytest.mark.slow
def test_sweep_on_one_and_two_workers_agree_and_keep_failures(tmp_path, capsys):
    pytest.importorskip('dask.distributed')
    one, two = sweep_results(tmp_path, 1, capsys), sweep_results(tmp_path, 2, capsys)
    assert one == two
    failed = {key: value for key, value in one.items() if value[2]}
    assert set(failed) == {('100000000.0', m, e) for m in ('0.5', '0.9') for e in ('1', '2')}
    assert all('loss became nan' in error for _, _, error in failed.values())
    assert all(float(acc) > 0.9 for key, (acc, _, error) in one.items() if not error)


def test_sweep_without_dask_runs_in_process(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name.startswith('dask'):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_dask)
    assert cli.main(['experiment', 'sweep', '--lr', '0.05', '--momentum', '0.9', '--epochs', '1', '--hidden', '4',
                     '--out', str(tmp_path), '--no-progress']) == 0
    assert 'Dask is not installed' in capsys.readouterr().err
    assert len(read_csv(tmp_path / 'sweep.csv')) == 1
