"""Files: every file fastgrad writes appears whole or not at all; .npz archives are read without pickle."""
import contextlib
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_open(path, mode='w', **kwargs):
    """Opens a temporary file beside `path` and renames it into place only if the block succeeds;
    on any error (Ctrl-C included) the temporary file is removed and `path` is left as it was."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_npz(path, arrays):
    """np.savez to `path`, atomically: a crash leaves no half-written file."""
    with atomic_open(path, 'wb') as f:
        np.savez(f, **arrays)


def load_npz(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: not a readable fastgrad .npz file ({e})') from None
