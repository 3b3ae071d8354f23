"""The distribution as built: a wheel that claims no import name but fastgrad's, and running from a clone's parent."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def source_copy(dest):
    """The working tree's files that git tracks or would track (no build/, *.egg-info, venvs or caches)."""
    files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split('\0')
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a file deleted but not yet committed is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_wheel_holds_no_import_name_but_fastgrad(tmp_path):
    """pip builds the wheel (PyPI for the build backend); the repository's kernels/ installs as fastgrad.kernels.

    Built from a copy of the tree: setuptools would put whatever a stale build/lib holds into the wheel."""
    src = source_copy(tmp_path / 'src')
    run = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--quiet', '.', '-w', str(tmp_path)],
                         cwd=src, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    wheel, = tmp_path.glob('fastgrad-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split('/')[0] for name in names}
    assert {name for name in top if not name.endswith('.dist-info')} == {'fastgrad'}, sorted(top)
    assert 'fastgrad/kernels/linear.py' in names
    assert 'fastgrad/kernels/__init__.py' in names


def python_in(folder, code, *flags):
    return subprocess.run([sys.executable, *flags, '-c', code], cwd=folder, capture_output=True, text=True)


@pytest.mark.slow
def test_the_installed_package_wins_in_the_folder_above_a_clone(tmp_path):
    """`import fastgrad` beside a clone named fastgrad gets the installed package (editable or not), not the
    clone's folder as an empty namespace package; `python -m fastgrad` works there too."""
    import fastgrad
    source_copy(tmp_path / 'fastgrad')
    run = python_in(tmp_path, 'import fastgrad, fastgrad.kernels; print(fastgrad.__file__); fastgrad.TensorNode')
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == fastgrad.__file__
    run = subprocess.run([sys.executable, '-m', 'fastgrad', '--help'], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and 'usage: fastgrad' in run.stdout, run.stderr


@pytest.mark.slow
def test_the_folder_above_a_clone_without_an_install_says_so(tmp_path):
    clone = source_copy(tmp_path / 'fastgrad')
    run = python_in(tmp_path, 'import fastgrad', '-S', '-E')  # no site-packages: nothing installed
    assert run.returncode == 1
    assert f'{clone} is the fastgrad repository' in run.stderr and 'fastgrad is not installed' in run.stderr
