"""The test suite's own rule: test modules share code through tests/helpers and fixtures through
tests/conftest.py, and no test module imports another."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_no_test_module_imports_another():
    modules = sorted(TESTS.glob("test_*.py")) + [TESTS / "conftest.py"]
    assert len(modules) > 30
    for path in modules:
        for name in _imported_modules(path):
            last = name.rsplit(".", 1)[-1]
            assert not (last.startswith("test_") or last == "conftest"), f"{path.name} imports {name}"
