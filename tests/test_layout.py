"""The package layout: no import cycle inside moela/, no function named as its module, README's module table and
settings table match the code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from moela.settings import reference

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moela"


def import_graph() -> dict[str, set[str]]:
    """moela module → the moela modules it imports (every import statement, those inside functions too)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                # ``from . import x`` imports the submodule x; ``from .m import f`` imports module m
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in names else module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in names and t != name}
    return graph


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_submodules_are_attributes_of_the_package_after_import_moela():
    """``import moela; moela.allocators.available()`` in a fresh interpreter (PEP 562 ``__getattr__``)."""
    code = "import moela; print(moela.allocators.available()[0], hasattr(moela, 'nosuch'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.split() == ["alphalora", "False"]


def test_readme_layout_table_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(moela/[^`]+)` \|", readme, re.M))
    present = {f"moela/{p.name}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    present |= {f"moela/{p.name}/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert listed == present


def test_readme_settings_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings:begin", 1)[1].split("-->", 1)[1].split("<!-- settings:end -->")[0]
    assert table.strip() == reference(markdown=True).strip(), "regenerate with moela.settings.reference(markdown=True)"


def test_no_top_level_function_or_class_shares_its_module_name():
    clashes = [f"{path.relative_to(ROOT)}: {node.name}" for path in PACKAGE.rglob("*.py")
               for node in ast.parse(path.read_text()).body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == path.stem]
    assert not clashes, clashes
