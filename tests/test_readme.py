"""The README's Python examples run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)  # the tour saves model.npz
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), 'exec'), namespace)
    assert (tmp_path / 'model.npz').exists()
    assert namespace['accuracy'] > 0.9
