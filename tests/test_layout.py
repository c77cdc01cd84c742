"""The shape of the repository: an installed package, scripts that are flags plus one call, and
comments a reader of the repo can follow."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("seg/**/*.py"), *ROOT.glob("experiments/*.py"),
                  *ROOT.glob("configs/*.py"), *ROOT.glob("tests/*.py")])


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_path_tricks_anywhere():
    for path in SOURCES:
        if path.name == "test_layout.py":
            continue
        text = path.read_text()
        assert "sys.path" not in text, path
        assert "noqa: E402" not in text, path


def test_nothing_imports_a_script():
    for path in SOURCES:
        if path.name == "test_layout.py":
            continue
        assert not {m for m in _imports(path) if m.split(".")[0] == "experiments"}, path


def test_the_library_never_imports_configs_or_defines_flags():
    for path in ROOT.glob("seg/**/*.py"):
        imports = _imports(path)
        assert not {m for m in imports if m.split(".")[0] == "configs"}, path
        assert "DEFINE_" not in path.read_text(), path


def test_the_main_script_is_flags_and_one_call():
    assert len((ROOT / "experiments/train.py").read_text().splitlines()) <= 80


def test_comments_cite_what_a_reader_can_open():
    for path in [*SOURCES, ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        text = path.read_text()
        if path.name == "test_layout.py":
            continue
        assert "DESIGN.md" not in text, path
        assert not re.search(r"\bseeds? 00\d", text), path
