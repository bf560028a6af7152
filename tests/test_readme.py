"""The README's Python snippets run as written: each ```python block, on its own, in a fresh
namespace, in a temporary directory (the snippets may write files). A block that cannot run
here (it needs a GPU, a data folder, a long training) is preceded by a line
``<!-- not-run: the reason -->`` and is skipped with that reason."""
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _snippets():
    text = README.read_text() if README.exists() else ""
    blocks = []
    for match in re.finditer(r"(<!-- not-run: (?P<why>.*?) -->\s*)?^```python\n(?P<code>.*?)^```",
                             text, re.MULTILINE | re.DOTALL):
        line = text[: match.start("code")].count("\n") + 1
        blocks.append(pytest.param(match.group("code"), match.group("why"), id=f"README.md:{line}"))
    return blocks


SNIPPETS = _snippets()


def test_the_readme_has_snippets():
    if not README.exists():
        pytest.skip("no README.md beside the tests (an installed copy of the tests)")
    assert len(SNIPPETS) >= 7


@pytest.mark.parametrize("code, why", SNIPPETS)
def test_readme_snippet_runs_as_written(code, why, tmp_path, monkeypatch, capsys):
    if why:
        pytest.skip(why)
    pytest.importorskip("sklearn")  # the training snippets use scikit-learn's digits
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
