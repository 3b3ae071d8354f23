"""Files: every file fastgrad writes appears whole or not at all, with the mode `open()` would give it;
.npz archives are read without pickle, from their headers first.

`load_npz(path, expected)` reads the zip directory and each member's .npy header (numpy.lib.format) before
any data: unexpected or missing keys, shapes, dtypes and sizes that do not match what the caller expects,
or that the member cannot hold, are refused without reading (or allocating for) a single array. Every
damaged archive is one ValueError that names the file and what is wrong with it.
"""
import contextlib
import errno
import os
import re
import secrets
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

TEMPORARY = re.compile(r'^(\..+\.[0-9a-f]{16}|tmp[a-z0-9_]{8})\.tmp$')  # atomic_open's names, and mkstemp's of old
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than this: a size claiming more is a lie


# -- writing
def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mode_of(path):
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return None


@contextlib.contextmanager
def atomic_open(path, mode='w', **kwargs):
    """Opens a temporary file beside `path` and renames it into place only if the block succeeds;
    on any error (Ctrl-C included) the temporary file is removed and `path` is left as it was.

    The data are flushed to disk before the rename and the folder after it, so a power cut leaves the old
    file or the new one. The file gets the mode open() would give it: an existing file's own, otherwise
    0666 less the umask. Errors name `path`, never the temporary file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        while True:
            tmp = os.path.join(folder, f'.{os.path.basename(path)}.{secrets.token_hex(8)}.tmp')
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
                break
            except FileExistsError:
                continue
    except OSError as e:
        raise type(e)(e.errno, f'cannot write {path}: {e.strerror}') from None
    try:
        existing = _mode_of(path)
        if existing is not None:
            os.chmod(tmp, existing)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename in (tmp, None):
            raise type(e)(e.errno, f'cannot write {path}: {e.strerror}') from None
        raise
    _fsync_folder(folder)


def remove_stale_temporaries(folder):
    """Removes the temporary files that a process killed while writing left in `folder` (only names that
    atomic_open makes, or made). Call it only while holding the folder's lock."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if TEMPORARY.match(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


class FolderInUse(ValueError):
    """Another process holds the lock on a folder."""


LOCK_FILE = 'lock'


@contextlib.contextmanager
def folder_lock(folder):
    """Holds an exclusive lock on `folder` (made if missing) for the block: a second process asking for it
    fails at once with FolderInUse naming the holder's pid. The lock is the kernel's (flock on
    folder/lock), so it is released when its holder exits, however it exits (kill -9 included)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = os.pread(fd, 64, 0).decode('ascii', 'replace').strip() or 'unknown'
                raise FolderInUse(f'{folder}: in use by another fastgrad run (pid {holder}); wait for it to end '
                                  f'or use another folder') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
        yield folder
    finally:
        os.close(fd)  # releases the lock


# -- output paths, checked before any work (errors name the option as the user typed it)
def check_output_file(option, path):
    """That `path` can be written (atomically: a new file in its folder, renamed over it), before any work."""
    if os.path.isdir(path):
        raise ValueError(f'{option} {path}: is a folder; give a file name')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise ValueError(f'{option} {path}: the folder {folder} does not exist')
    if not os.path.isdir(folder):
        raise ValueError(f'{option} {path}: {folder} is not a folder')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f'{option} {path}: cannot write in the folder {folder} (permission denied)')


def check_output_folder(option, path):
    """That `path` is a folder fastgrad can write in, made if missing, before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f'{option} {path}: not a folder (a file of that name exists)')
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f'{option} {path}: cannot make the folder ({e.strerror})') from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f'{option} {path}: cannot write in the folder (permission denied)')


def save_npz(path, arrays):
    """np.savez to `path`, atomically: a crash leaves no half-written file."""
    with atomic_open(path, 'wb') as f:
        np.savez(f, **arrays)


# -- reading
class Member(NamedTuple):
    """What load_npz expects of one entry: its shape (None: any), the dtype kinds it may have (numpy's
    dtype.kind letters: 'f' float, 'i'/'u' integers, 'b' bool, 'U' text), whether it must be there, and,
    for entries of any shape, the most bytes it may hold."""
    shape: tuple = None
    kinds: str = 'biuf'
    required: bool = True
    max_bytes: int = None


KIND_NAMES = {'b': 'bool', 'i': 'integer', 'u': 'unsigned integer', 'f': 'float', 'c': 'complex', 'U': 'text',
              'S': 'bytes', 'O': 'object (pickle)', 'V': 'structured', 'M': 'datetime', 'm': 'timedelta'}


class _Damaged(Exception):
    """What is wrong with the archive; load_npz adds the file's name."""


def _read_header(z, info):
    """(shape, fortran_order, dtype, header bytes) of a member, from its .npy header alone."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f'.npy format version {version} (1.0 and 2.0 are read)')
        return shape, fortran, dtype, f.tell()


def _check_member(key, info, header, member):
    shape, fortran, dtype, offset = header
    if dtype.hasobject:
        raise _Damaged(f'{key} holds Python objects (object dtype), which would need pickle: refused')
    if dtype.fields is not None or dtype.subdtype is not None:
        raise _Damaged(f'{key} has a structured dtype {dtype}: refused')
    if dtype.kind not in member.kinds:
        want = 'numbers' if member.kinds == 'biuf' else ' or '.join(KIND_NAMES.get(k, k) for k in member.kinds)
        raise _Damaged(f'{key} holds {KIND_NAMES.get(dtype.kind, dtype.kind)} data ({dtype}); expected {want}')
    if member.shape is not None and tuple(shape) != tuple(member.shape):
        raise _Damaged(f'{key} has shape {shape}; expected {tuple(member.shape)}')
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if member.max_bytes is not None and nbytes > member.max_bytes:
        raise _Damaged(f'{key} claims shape {shape} of {dtype} ({nbytes} bytes), more than the {member.max_bytes} '
                       f'bytes such an entry may hold')
    if offset + nbytes != info.file_size:
        raise _Damaged(f'{key} claims shape {shape} of {dtype} ({nbytes} bytes) but its member holds '
                       f'{info.file_size - offset} data bytes')
    limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO * info.compress_size + 1024
    if info.file_size > limit:
        raise _Damaged(f'{key} claims {info.file_size} bytes, more than its {info.compress_size} compressed bytes '
                       f'can hold')
    return shape, fortran, dtype, offset, nbytes


def _read_member(z, info, shape, fortran, dtype, offset, nbytes):
    """The array, read straight into its own buffer (no second copy)."""
    raw = np.empty(nbytes, dtype=np.uint8)
    with z.open(info) as f:
        f.read(offset)
        view, done = memoryview(raw), 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise _Damaged(f'{info.filename[:-4]} is truncated')
            done += n
        if f.read(1):  # also has zipfile check the CRC at the end of the member
            raise _Damaged(f'{info.filename[:-4]} holds more data than its header declares')
    return raw.view(dtype).reshape(shape, order='F' if fortran else 'C')


def load_npz(path, expected=None, only=None):
    """The arrays of an .npz archive as a dict, read without pickle.

    expected: {key: Member(...)}, what the caller can use. Keys it does not name, keys it requires that are
    missing, shapes, dtype kinds and sizes are checked from the zip directory and the .npy headers before
    any data is read, and only the expected members are ever read. Without `expected` every member is read,
    each still checked against the size of its member before anything is allocated. `only`: look at these
    keys alone (read them, check them against `expected`), leaving every other member unread and unchecked.

    Raises FileNotFoundError for a missing file, ValueError (naming the file and what is wrong) otherwise.
    """
    path = os.fspath(path)
    try:
        with open(path, 'rb') as raw:
            start = raw.read(6)
            if not start:
                raise _Damaged('the file is empty')
            if start == b'\x93NUMPY':
                raise _Damaged('a .npy file (one array), not an .npz archive of named arrays')
            raw.seek(0)
            with zipfile.ZipFile(raw) as z:
                infos = z.infolist()
                keys = {}
                for info in infos:
                    if not info.filename.endswith('.npy') or info.is_dir():
                        raise _Damaged(f'member {info.filename!r} is not a .npy array')
                    key = info.filename[:-4]
                    if key in keys:
                        raise _Damaged(f'{key} appears twice')
                    keys[key] = info
                if only is not None:
                    keys = {key: info for key, info in keys.items() if key in only}
                    expected = {key: m for key, m in (expected or {}).items() if key in only} or None
                if expected is not None:
                    missing = sorted(k for k, m in expected.items() if m.required and k not in keys)
                    unexpected = sorted(keys.keys() - expected.keys())
                    if missing or unexpected:
                        raise _Damaged(', '.join(filter(None, [missing and f'missing {missing}',
                                                               unexpected and f'unexpected {unexpected}'])))
                plans = {}
                for key, info in keys.items():
                    member = expected[key] if expected is not None else Member(kinds='biufcUS')
                    try:
                        header = _read_header(z, info)
                    except (ValueError, EOFError) as e:
                        raise _Damaged(f'{key}: not a readable .npy header ({e})') from None
                    plans[key] = info, _check_member(key, info, header, member)
                return {key: _read_member(z, info, *plan) for key, (info, plan) in plans.items()}
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise ValueError(f'{path}: is a folder, not an .npz file') from None
    except _Damaged as e:
        raise ValueError(f'{path}: {e}') from None
    except zipfile.BadZipFile as e:
        raise ValueError(f'{path}: not an .npz file (not a readable zip archive: {e})') from None
    except (OSError, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError, OverflowError) as e:
        raise ValueError(f'{path}: not a readable .npz file ({type(e).__name__}: {e})') from None
