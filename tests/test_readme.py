"""The README's Python examples run as written, each block on its own (a reader copies one at a time)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
BLOCKS = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_each_readme_python_block_runs_on_its_own(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the tour saves model.npz
    namespace = {}  # a fresh namespace per block: no block leans on another's imports or names
    exec(compile(BLOCKS[index], f'{README} (python block {index})', 'exec'), namespace)
    if 'model.save(' in BLOCKS[index]:
        assert (tmp_path / 'model.npz').exists()
        assert namespace['accuracy'] > 0.9
        out = capsys.readouterr().out
        assert 'MLP(\n' in out and '(layers.0): Linear(in_features=2, out_features=32' in out
        assert f'{namespace["model"].num_parameters()}' in out
