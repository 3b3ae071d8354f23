"""Issue 13: a hostile user's damaged and crafted files, threads, kill -9 and bad arguments.

Each test here failed before the fix it covers; together they keep what held (no pickle, exact resume)
and what was fixed (thread-local grad mode, files checked from their headers before any data is read,
state dicts validated whole before anything is written, output paths checked before training).
"""
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import cli
from fastgrad.core import TensorNode
from fastgrad.files import atomic_open, load_npz, save_npz
from fastgrad.train import CHECKPOINT_FILE, TrainConfig, train


# -- 2 and 3. damaged and crafted .npz files: one ValueError naming the file, read from the headers first
def npy_bytes(array=None, header=None):
    """The bytes of a .npy member: array's, or a bare header claiming `header` = (shape, dtype)."""
    f = io.BytesIO()
    if header is None:
        np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
    else:
        shape, dtype = header
        np.lib.format.write_array_header_1_0(f, {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  'fortran_order': False, 'shape': shape})
    return f.getvalue()


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, 'w', compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.fixture
def mlp_file(tmp_path):
    mlp = fg.MLP(3, 2, hidden=4, rng=0)
    path = tmp_path / 'model.npz'
    mlp.save(path)
    return mlp, path


def damaged(path, how):
    raw = path.read_bytes()
    if how == 'truncated':
        path.write_bytes(raw[:len(raw) // 2])
    elif how == 'empty':
        path.write_bytes(b'')
    elif how == 'npy':
        path.write_bytes(npy_bytes(np.zeros(3)))
    elif how == 'text':
        path.write_text('hello')
    elif how == 'flipped':  # a bit flipped inside the data: the CRC check catches it
        path.write_bytes(raw[:200] + bytes([raw[200] ^ 0x40]) + raw[201:])
    return path


@pytest.mark.parametrize('how,what', [('truncated', 'zip'), ('empty', 'empty'), ('npy', '.npy file'),
                                      ('text', 'zip'), ('flipped', '')])
def test_damaged_model_file_is_one_value_error_naming_it(mlp_file, how, what):
    mlp, path = mlp_file
    before = [p.value.copy() for p in mlp.parameters()]
    damaged(path, how)
    with pytest.raises(ValueError, match=f'model.npz.*{what}') as e:
        mlp.load(path)
    assert type(e.value).__name__ in ('ValueError', 'FileFormatError', 'StateDictError')
    for p, b in zip(mlp.parameters(), before):
        np.testing.assert_array_equal(p.value, b)


def test_missing_and_unexpected_keys_are_value_errors_naming_them(mlp_file, tmp_path):
    mlp, path = mlp_file
    state = load_npz(path)
    del state['layers.0.w']
    state['extra'] = np.zeros(1)
    save_npz(tmp_path / 'keys.npz', state)
    with pytest.raises(ValueError, match=r"keys.npz.*missing.*layers\.0\.w.*unexpected.*extra"):
        mlp.load(tmp_path / 'keys.npz')
    with pytest.raises(ValueError, match=r'missing.*layers\.0\.w'):
        mlp.load_state_dict(state)


def test_a_member_claiming_a_huge_shape_is_refused_before_allocating(mlp_file, tmp_path):
    mlp, path = mlp_file
    members = {f'{k}.npy': npy_bytes(v) for k, v in load_npz(path).items()}
    members['layers.0.w.npy'] = npy_bytes(header=((2 ** 40,), '<f8'))
    write_zip(tmp_path / 'bomb.npz', members)
    with pytest.raises(ValueError, match=r'bomb.npz.*layers\.0\.w.*\(1099511627776,\)'):
        mlp.load(tmp_path / 'bomb.npz')
    with pytest.raises(ValueError, match=r'bomb.npz.*layers\.0\.w'):
        load_npz(tmp_path / 'bomb.npz')  # without expectations: the header must match the member's size


def test_an_unexpected_key_is_refused_before_its_data_is_read(mlp_file, tmp_path, monkeypatch):
    mlp, path = mlp_file
    members = {f'{k}.npy': npy_bytes(v) for k, v in load_npz(path).items()}
    members['extra.npy'] = npy_bytes(np.zeros(1000))
    write_zip(tmp_path / 'extra.npz', members, zipfile.ZIP_DEFLATED)
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, 'open', lambda self, name, *a, **k: opened.append(
        getattr(name, 'filename', name)) or real_open(self, name, *a, **k))
    with pytest.raises(ValueError, match=r"extra.npz.*unexpected.*'extra'"):
        mlp.load(tmp_path / 'extra.npz')
    assert 'extra.npy' not in opened


def test_pickled_members_are_refused(tmp_path):
    write_zip(tmp_path / 'pickle.npz', {'a.npy': npy_bytes(header=((1,), object))})
    with pytest.raises(ValueError, match='pickle.npz.*a.*object'):
        load_npz(tmp_path / 'pickle.npz')


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.npz'):
        fg.MLP(2, 2).load(tmp_path / 'nothing.npz')


# -- 5. module state dicts: dtypes checked, nothing written unless everything fits
def test_module_load_state_dict_refuses_lossy_casts_and_is_atomic():
    mlp = fg.MLP(3, 2, hidden=4, rng=0)
    before = [p.value.copy() for p in mlp.parameters()]
    good = {k: v + 1 for k, v in mlp.state_dict().items()}
    for bad_key, bad_value, message in [
            ('layers.1.b', np.full((1, 2), 1e300), 'outside float32'),
            ('layers.1.b', np.ones((1, 2)) * (1 + 1j), 'complex'),
            ('layers.1.b', np.array([['a', 'b']]), 'not numbers'),
            ('layers.1.b', np.zeros((2, 1)), r'shape \(2, 1\)')]:
        with pytest.raises(ValueError, match=f'layers.1.b.*{message}'):
            mlp.load_state_dict(dict(good, **{bad_key: bad_value}))
        for p, b in zip(mlp.parameters(), before):
            np.testing.assert_array_equal(p.value, b)
    mlp.load_state_dict(dict(good, **{'layers.1.b': np.array([[1, 2]])}))  # ints fit exactly: fine
    np.testing.assert_array_equal(mlp.layers[1].b.value, [[1, 2]])


# -- 4 and 5. optimizer state dicts: every entry validated, then written all at once
def stepped(make):
    mlp = fg.MLP(3, 2, hidden=4, rng=0)
    opt = make(mlp.parameters())
    x = TensorNode(np.ones((2, 3), dtype=np.float32), requires_grad=False)
    fg.cross_entropy(mlp(x), [0, 1]).backward()
    opt.step()
    return mlp, opt


SGD = lambda p: fg.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
ADAM = lambda p: fg.Adam(p, lr=0.01)  # noqa: E731


@pytest.mark.parametrize('make,key,value,message', [
    (SGD, 'lr', np.array('abc'), 'lr must be a finite number >= 0'),
    (SGD, 'lr', np.array([0.1, 0.2]), 'lr must be a finite number'),
    (SGD, 'lr', np.array(np.nan), 'lr must be a finite number'),
    (SGD, 'lr', np.array(-1.0), 'lr must be a finite number >= 0'),
    (SGD, 'momentum', np.array(np.inf), 'momentum'),
    (SGD, 'nesterov', np.array('yes'), 'nesterov must be True or False'),
    (SGD, 'momentum_buffer.0', np.full((4, 3), np.nan, dtype=np.float32), 'momentum_buffer.0.*finite'),
    (SGD, 'momentum_buffer.0', np.ones((4, 3)) * 1j, 'momentum_buffer.0.*complex'),
    (SGD, 'momentum_buffer.0', np.full((4, 3), 1e300), 'momentum_buffer.0.*outside float32'),
    (SGD, 'momentum_buffer.7', np.zeros(1), "unexpected entry 'momentum_buffer.7'"),
    (SGD, 'velocity.0', np.zeros((4, 3)), "unexpected entry 'velocity.0'"),
    (ADAM, 'step', np.array([2.7, 1, 1, 1]), 'step.*whole numbers'),
    (ADAM, 'step', np.array([-1, 1, 1, 1]), 'step.*>= 0'),
    (ADAM, 'step', np.array([0, 1, 1, 1]), 'exp_avg.0'),
    (ADAM, 'betas', np.array(0.9), r'betas must be two numbers in \[0, 1\)'),
    (ADAM, 'betas', np.array([0.9, 1.5]), r'betas must be two numbers in \[0, 1\)'),
    (ADAM, 'exp_avg_sq.1', -np.ones((1, 4), dtype=np.float32), 'exp_avg_sq.1.*>= 0'),
    (ADAM, 'eps', np.array(-1.0), 'eps'),
])
def test_tampered_optimizer_state_is_refused_and_nothing_changes(make, key, value, message):
    mlp, opt = stepped(make)
    state = opt.state_dict()
    fresh_mlp, fresh = stepped(make)
    before = fresh.state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(state)
    after = fresh.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_a_missing_hyperparameter_is_a_value_error_naming_it():
    _, opt = stepped(SGD)
    state = opt.state_dict()
    del state['lr']
    with pytest.raises(ValueError, match='SGD.load_state_dict: lr is missing'):
        opt.load_state_dict(state)


def test_adam_needs_its_buffers_with_its_step():
    _, opt = stepped(ADAM)
    state = opt.state_dict()
    del state['exp_avg_sq.2']
    with pytest.raises(ValueError, match='exp_avg_sq.2'):
        stepped(ADAM)[1].load_state_dict(state)


def test_constructors_check_hyperparameters_too():
    p = [TensorNode(np.zeros(2))]
    with pytest.raises(ValueError, match="SGD: lr must be a finite number >= 0, not nan"):
        fg.SGD(p, lr=float('nan'))
    with pytest.raises(ValueError, match='SGD: momentum must be a finite number >= 0'):
        fg.SGD(p, lr=0.1, momentum=-1)
    with pytest.raises(ValueError, match=r'Adam: betas must be two numbers in \[0, 1\)'):
        fg.Adam(p, betas=0.9)


# -- 9. the library refuses what makes no sense, naming it
def test_library_arguments():
    with pytest.raises(ValueError, match='MLP: input_size must be a positive integer, not 0'):
        fg.MLP(0, 2)
    with pytest.raises(ValueError, match=r'MLP: hidden sizes must be positive integers, not \[8, 0\]'):
        fg.MLP(2, 2, hidden=[8, 0])
    with pytest.raises(ValueError, match='MLP: dtype float16 is not supported'):
        fg.MLP(2, 2, dtype=np.float16)
    logp = fg.logsoftmax(TensorNode(np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r'Select: indices must be in \[0, 3\).*-1'):
        fg.logceloss(logp, [-1, 0])
    with pytest.raises(ValueError, match=r'Softmax.*0 columns.*\(2, 0\)'):
        fg.softmax(TensorNode(np.zeros((2, 0))))
    with pytest.raises(ValueError, match=r'LogSoftmax.*0 columns'):
        fg.logsoftmax(TensorNode(np.zeros((2, 0))))


def test_read_idx_takes_bytes_paths(tmp_path):
    path = tmp_path / 'a.idx'
    path.write_bytes(b'\0\0\x08\x01\0\0\0\x02\x05\x07')
    np.testing.assert_array_equal(fg.read_idx(os.fsencode(path)), [5, 7])


# -- 3. the MNIST cache: a crafted cache is ignored, not allocated
def test_a_crafted_mnist_cache_is_ignored(tmp_path, monkeypatch):
    from fastgrad import data
    monkeypatch.setenv('FASTGRAD_DATA', str(tmp_path))
    write_zip(tmp_path / 'mnist.npz', {'train_images.npy': npy_bytes(header=((2 ** 40,), '<u1'))})
    assert data._from_cache() is None


# -- 8. files are written with the umask's mode, as open() writes them
def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_npz(tmp_path / 'a.npz', {'x': np.zeros(1)})
        with atomic_open(tmp_path / 'b.txt') as f:
            f.write('hi')
    finally:
        os.umask(old)
    for name in ('a.npz', 'b.txt'):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    os.chmod(tmp_path / 'b.txt', 0o600)  # an existing file keeps its mode
    with atomic_open(tmp_path / 'b.txt') as f:
        f.write('again')
    assert stat.S_IMODE(os.stat(tmp_path / 'b.txt').st_mode) == 0o600


def test_atomic_open_names_the_users_path(tmp_path):
    with pytest.raises(OSError) as e:
        with atomic_open(tmp_path / 'no' / 'such' / 'log'):
            pass
    assert str(tmp_path / 'no' / 'such' / 'log') in str(e.value) and '.tmp' not in str(e.value)


# -- 6, 7 and 9. the command line: arguments and output paths checked before any training
@pytest.mark.parametrize('args,message', [
    (['--hidden', '0'], 'argument --hidden: must be a positive integer, not 0'),
    (['--hidden', '8', '0'], 'argument --hidden: must be a positive integer, not 0'),
    (['--momentum', '-1'], r'argument --momentum: must be a number in [0, 1), not -1'),
    (['--momentum', '5'], r'argument --momentum: must be a number in [0, 1), not 5'),
    (['--momentum', 'nan'], 'argument --momentum'),
    (['-l', 'nan'], 'argument -l/--learning-rate: must be a positive finite number, not nan'),
    (['-l', 'inf'], 'argument -l/--learning-rate: must be a positive finite number, not inf'),
    (['-l', '0'], 'argument -l/--learning-rate: must be a positive finite number, not 0'),
    (['--seed', '-1'], 'argument --seed: must be an integer >= 0, not -1'),
    (['-b', '0'], 'argument -b/--batch-size: must be a positive integer, not 0'),
])
def test_bad_arguments_name_the_option_as_typed(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(['train', '-D', 'synth', '-e', '1', *args])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('fastgrad: ') and err.count('\n') == 1, err
    assert message in err


@pytest.mark.parametrize('option,target,message', [
    ('--log', 'nodir/log.jsonl', 'nodir.*does not exist'),
    ('--log', '.', 'is a folder'),
    ('--checkpoint', 'afile', 'not a folder'),
    ('--plot', 'curves.xyz', "format 'xyz'"),
])
def test_output_paths_are_checked_before_training(option, target, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'afile').write_text('mine')
    trained = []
    monkeypatch.setattr(cli, 'train', lambda *a, **k: trained.append(1))
    assert cli.main(['train', '-D', 'synth', '-e', '1', option, target]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'fastgrad: {option} {target}: ') and err.count('\n') == 1, err
    import re
    assert re.search(message, err), err
    assert not trained and (tmp_path / 'afile').read_text() == 'mine'


@pytest.mark.parametrize('command', [['experiment', 'activations'], ['experiment', 'sweep', '--lr', '0.1',
                                                                       '--momentum', '0.9', '--epochs', '1']])
def test_experiment_out_folder_is_checked_before_training(command, tmp_path, capsys, monkeypatch):
    from fastgrad import experiments
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'afile').write_text('mine')
    monkeypatch.setattr(experiments, 'train', lambda *a, **k: pytest.fail('trained'))
    assert cli.main([*command, '-D', 'synth', '--no-progress', '--out', 'afile']) == 2
    err = capsys.readouterr().err
    assert err == 'fastgrad: --out afile: not a folder (a file of that name exists)\n', err


def test_plot_writes_the_format_its_extension_names(tmp_path):
    pytest.importorskip('matplotlib')
    from fastgrad.plots import plot_curves
    history = [{'epoch': 0, 'val_accuracy': 0.5, 'train_loss': 1.0}, {'epoch': 1, 'val_accuracy': 0.6, 'train_loss': 0.5}]
    plot_curves({'a': history}, tmp_path / 'c.pdf')
    plot_curves({'a': history}, tmp_path / 'c.svg')
    assert (tmp_path / 'c.pdf').read_bytes().startswith(b'%PDF')
    assert b'<svg' in (tmp_path / 'c.svg').read_bytes()[:1000]


def test_a_second_run_in_a_checkpoint_folder_fails_at_once_naming_the_holder(tmp_path, capsys, monkeypatch):
    from fastgrad.files import folder_lock
    trained = []
    monkeypatch.setattr(cli, 'train', lambda *a, **k: trained.append(1))
    with folder_lock(tmp_path / 'ckpt'):
        assert cli.main(['train', '-D', 'synth', '-e', '1', '--checkpoint', str(tmp_path / 'ckpt')]) == 2
    err = capsys.readouterr().err
    assert f'pid {os.getpid()}' in err and str(tmp_path / 'ckpt') in err and err.count('\n') == 1, err
    assert not trained


def test_stale_temporary_files_are_removed_by_the_next_run(tmp_path):
    folder = tmp_path / 'ckpt'
    train(TrainConfig(dataset='synth', epochs=1, hidden=[4], eager=True) if 'eager' in TrainConfig.__dataclass_fields__
          else TrainConfig(dataset='synth', epochs=1, hidden=[4]), checkpoint=folder)
    (folder / '.checkpoint.npz.0123456789abcdef.tmp').write_bytes(b'half')  # what kill -9 mid-write leaves
    (folder / 'tmp7q48ryzm.tmp').write_bytes(b'half')  # the older name
    (folder / 'notes.txt').write_text('mine')
    assert cli.main(['train', '-D', 'synth', '-e', '2', '--hidden', '4', '--no-progress', '--checkpoint', str(folder),
                     '--resume'] + (['--eager'] if 'eager' in TrainConfig.__dataclass_fields__ else [])) == 0
    assert sorted(p.name for p in folder.iterdir()) == ['checkpoint.npz', 'lock', 'notes.txt']


# -- 2, 3 and 4 through --resume: a damaged checkpoint is one line, exit 2, before any training
def checkpoint(tmp_path):
    folder = tmp_path / 'ckpt'
    config = dict(dataset='synth', epochs=1, hidden=[4], lr=0.05)
    train(TrainConfig(**config), checkpoint=folder)
    return folder, load_npz(folder / CHECKPOINT_FILE)


def resume(folder, capsys):
    capsys.readouterr()  # what making the checkpoint printed (a first-run compile notice) is not the resume's
    code = cli.main(['train', '-D', 'synth', '-e', '2', '--hidden', '4', '-l', '0.05', '--no-progress',
                     '--checkpoint', str(folder), '--resume'])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def meta_with(arrays, change):
    meta = json.loads(str(arrays['meta']))
    change(meta)
    return dict(arrays, meta=np.array(json.dumps(meta)))


@pytest.mark.parametrize('tamper,message', [
    (lambda a: {k: v for k, v in a.items() if k != 'optim.momentum_buffer.0'}, 'missing.*optim.momentum_buffer.0'),
    (lambda a: dict(a, **{'optim.lr': np.array('abc')}), 'optim.lr holds text data.*expected numbers'),
    (lambda a: dict(a, **{'optim.lr': np.array(np.nan)}), 'lr must be a finite number >= 0, not nan'),
    (lambda a: dict(a, **{'model.layers.0.w': np.full((4, 2), 1e300)}), 'layers.0.w.*outside float32'),
    (lambda a: {k: v for k, v in a.items() if k != 'model.layers.1.b'}, r'missing.*model\.layers\.1\.b'),
    (lambda a: dict(a, meta=np.array('{')), 'meta'),
    (lambda a: dict(a, meta=np.array('[]')), 'meta'),
    (lambda a: meta_with(a, lambda m: m['history'][0].pop('val_accuracy')), 'history'),
    (lambda a: meta_with(a, lambda m: m.update(history=[5])), 'history'),
    (lambda a: meta_with(a, lambda m: m['rng'].update(state='x')), 'rng'),
    (lambda a: meta_with(a, lambda m: m.pop('rng')), 'rng'),
    (lambda a: meta_with(a, lambda m: m['config'].update(colour='blue')), 'colour'),
])
def test_a_tampered_checkpoint_is_one_line_and_exit_2(tamper, message, tmp_path, capsys):
    folder, arrays = checkpoint(tmp_path)
    save_npz(folder / CHECKPOINT_FILE, tamper(arrays))
    code, out, err = resume(folder, capsys)
    assert code == 2, (out, err)
    assert err.startswith(f'fastgrad: {folder / CHECKPOINT_FILE}: ') and err.count('\n') == 1, err
    import re
    assert re.search(message, err), err
    assert 'epoch' not in out


@pytest.mark.parametrize('how', ['truncated', 'empty', 'npy'])
def test_a_damaged_checkpoint_is_one_line_and_exit_2(how, tmp_path, capsys):
    folder, _ = checkpoint(tmp_path)
    damaged(folder / CHECKPOINT_FILE, how)
    code, out, err = resume(folder, capsys)
    assert code == 2 and err.startswith(f'fastgrad: {folder / CHECKPOINT_FILE}: ') and err.count('\n') == 1, err


def test_a_checkpoint_with_a_huge_member_is_refused(tmp_path, capsys):
    folder, arrays = checkpoint(tmp_path)
    members = {f'{k}.npy': npy_bytes(v) for k, v in arrays.items()}
    members['optim.momentum_buffer.0.npy'] = npy_bytes(header=((2 ** 40,), '<f4'))
    write_zip(folder / CHECKPOINT_FILE, members)
    code, out, err = resume(folder, capsys)
    assert code == 2 and 'momentum_buffer.0' in err and err.count('\n') == 1, err


# -- 10. a bad --scheduler address: a few seconds, one line naming it
@pytest.mark.slow
def test_a_scheduler_that_is_not_one_is_one_line(tmp_path):
    pytest.importorskip('dask.distributed')
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(8)
    port = server.getsockname()[1]
    stop = threading.Event()

    def answer():  # an HTTP server's answer to anything: not Dask's protocol
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b'HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n' * 4)
            conn.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        out = subprocess.run([sys.executable, '-m', 'fastgrad', 'experiment', 'sweep', '--lr', '0.1', '--momentum',
                              '0.9', '--epochs', '1', '--no-progress', '--out', str(tmp_path),
                              '--scheduler', f'tcp://127.0.0.1:{port}'], capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        t.join()
        server.close()
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'fastgrad: --scheduler tcp://127.0.0.1:{port}: '), out.stderr
