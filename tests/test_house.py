"""The house's rules that a machine can check: imports point one way, kernels stand alone."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imports(package_dir, package):
    """{module: set of modules of the same package it imports}, function-level imports included."""
    graph = {}
    for path in sorted(package_dir.glob('*.py')):
        name = path.stem
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    found.add(node.module.split('.')[0])
                elif node.level == 1:  # from . import a, b
                    found.update(alias.name for alias in node.names)
                elif node.level == 0 and node.module and node.module.startswith(package + '.'):
                    found.add(node.module.split('.')[1])
        graph[name] = {m for m in found if (package_dir / f'{m}.py').exists() and m != name}
    return graph


def cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 'done'
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_fastgrad_has_no_import_cycle():
    graph = imports(ROOT / 'fastgrad', 'fastgrad')
    graph.pop('__init__', None)  # the package's front door imports everything
    assert 'ops' not in graph['core'] and 'core' in graph['ops']
    assert cycle(graph) is None, ' -> '.join(cycle(graph))


def test_cycle_finder_finds_one():
    assert cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert cycle({'a': {'b'}, 'b': set()}) is None


def test_kernels_never_import_fastgrad():
    for path in (ROOT / 'kernels').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n == 'fastgrad' or n.startswith('fastgrad.') for n in names), path
