"""python -m fastgrad.vugrad SCRIPT [ARGS] | -m MODULE [ARGS]: runs code written for vugrad, unchanged, on
fastgrad.

The script runs as __main__ with sys.argv = [SCRIPT, ARGS...] and its folder first on sys.path, as under
`python SCRIPT`; with -m a module runs as under `python -m MODULE` (e.g. `-m unittest`, `-m pytest`).
Either way `import vugrad` and `import vugrad.<sub>` give fastgrad.vugrad, also when the code puts a
vugrad checkout first on sys.path (the course's _context.py does) or puts finders of its own first.
"""
import importlib
import os
import runpy
import sys

USAGE = 'usage: python -m fastgrad.vugrad SCRIPT [ARGS...] | -m MODULE [ARGS...]'
SUBMODULES = ('core', 'ops', 'functions', 'modules', 'mnist')


def alias_vugrad():
    """Makes `vugrad` and `vugrad.<sub>` name fastgrad.vugrad and its submodules in this process.

    The import system looks in sys.modules before it consults sys.path or any finder, so nothing a script
    does to those afterwards can make `import vugrad` load another copy."""
    sys.modules['vugrad'] = importlib.import_module('fastgrad.vugrad')
    for name in SUBMODULES:
        sys.modules[f'vugrad.{name}'] = importlib.import_module(f'fastgrad.vugrad.{name}')


def main(argv):
    if not argv or argv[0] in ('-h', '--help') or (argv[0] == '-m' and len(argv) < 2):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    alias_vugrad()
    if argv[0] == '-m':
        sys.argv = argv[1:]  # runpy puts the module's file name in sys.argv[0], as `python -m` does
        runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
        return 0
    script = argv[0]
    if not os.path.exists(script):
        print(f"python -m fastgrad.vugrad: can't open file {script!r}", file=sys.stderr)
        return 2
    sys.argv = list(argv)
    if not sys.flags.safe_path and os.path.isfile(script):
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # where `python SCRIPT` looks first
    runpy.run_path(script, run_name='__main__')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
