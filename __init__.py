"""Not part of fastgrad: the repository folder's stand-in, for a Python started in the folder above a clone named
fastgrad. There `import fastgrad` finds this folder first (the current folder leads sys.path, and setuptools'
editable finder comes after the path search), and without this file it would be an empty namespace package.
Here it hands over to the installed fastgrad, or says that none is installed."""
import importlib
import os
import sys

if __name__ == 'fastgrad':
    _here = os.path.dirname(os.path.abspath(__file__))

    def _is_parent(entry):
        try:
            return os.path.samefile(entry or os.curdir, os.path.dirname(_here))
        except OSError:
            return False

    _hidden = [(i, entry) for i, entry in enumerate(sys.path) if _is_parent(entry)]
    for _i, _ in reversed(_hidden):
        del sys.path[_i]
    del sys.modules[__name__]  # the import below puts the installed package there, and the import system returns it
    try:
        importlib.import_module(__name__)
    except ModuleNotFoundError as e:
        if e.name != __name__:
            raise
        raise ModuleNotFoundError(
            f'{_here} is the fastgrad repository, imported because Python started in the folder above it, and '
            f'fastgrad is not installed: pip install -e {_here}, or start Python in another folder',
            name=__name__) from None
    finally:
        for _i, _entry in _hidden:
            sys.path.insert(_i, _entry)
