"""The layout ARCHITECTURE.md promises: small modules, benchmarks independent of tests, every named home present."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "progadv_trl"


def test_no_library_module_outside_demo_exceeds_500_lines():
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if "demo" not in p.parts
           and (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}  # fmt: skip
    assert big == {}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_benchmarks_import_nothing_from_tests():
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for script in (ROOT / "benchmarks").glob("*.py"):
        assert not (_imports(script) & test_modules), script
        assert '"tests"' not in script.read_text(encoding="utf-8"), f"{script} puts tests/ on its path"


def test_architecture_names_existing_homes():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:[a-z_]+/)?[a-z_]+(?:\.py|/))`", text))
    assert named, "ARCHITECTURE.md names no module"
    missing = [n for n in named if not ((PKG / n).exists() or (ROOT / n).exists())]
    assert missing == []
