"""Atomic file writes: every file fastgrad writes appears whole or not at all."""
import contextlib
import os
import tempfile


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
