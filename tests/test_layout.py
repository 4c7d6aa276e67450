"""The package's layout, checked from its source: imports point one way (docs/architecture.md).

Every import between the package's modules counts, those under
``TYPE_CHECKING`` and inside functions too: a circle there is a design circle
even when Python never runs into it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from support import ROOT

PACKAGE = ROOT / "rtgateway"
TESTS = ROOT / "tests"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
# Modules that may import nothing of the package but these.
PURE = {
    "errors": set(),
    "protocol": {"errors"},
    "config": {"errors", "protocol"},
    "namespaces": {"errors", "protocol", "config"},
    "apimsg": {"protocol", "httpmsg"},
    "ratelimit": set(),
    "admission": set(),
    "http11": {"httpmsg"},
    "httpmsg": set(),
    "client": set(),
    "testing": set(),
}


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """(the package's modules it imports, the other top-level imports), wherever they are."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                ours.update(n.split(".")[0] for n in names)
            elif node.module:
                theirs.add(node.module)
        elif isinstance(node, ast.Import):
            theirs.update(alias.name for alias in node.names)
    ours.discard("__init__")
    return {m for m in ours if m in MODULES}, theirs


GRAPH = {module: imports_of(module)[0] for module in MODULES}


def test_the_import_graph_of_the_package_has_no_circle() -> None:
    """A depth-first walk never comes back to a module it is inside."""
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep) :], module, dep])
            elif dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [])
    assert circles == []


def test_only_the_command_line_imports_app() -> None:
    """Nothing below app holds the gateway: it is given a Context and a ServerState."""
    assert sorted(m for m, deps in GRAPH.items() if "app" in deps) == ["__main__"]


def test_pure_modules_import_only_what_they_are_allowed() -> None:
    """protocol, config, errors, ratelimit... import nothing of the package with I/O in it."""
    wrong = {m: sorted(GRAPH[m] - allowed) for m, allowed in PURE.items() if GRAPH[m] - allowed}
    assert wrong == {}


def test_only_the_client_uses_websockets_asyncio_layer() -> None:
    """The gateway drives websockets' sans-I/O protocol itself: only the client uses its asyncio."""
    users = sorted(
        module
        for module in MODULES
        if any(name.startswith("websockets.asyncio") for name in imports_of(module)[1])
    )
    assert users == ["client"]


def test_every_module_says_what_it_owns_and_what_it_exports() -> None:
    """A module docstring, and __all__ declared (websockets' habit)."""
    missing = []
    for module in MODULES:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        exports = any(
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
            for node in tree.body
        )
        if ast.get_docstring(tree) is None or (not exports and module != "__main__"):
            missing.append(module)
    assert missing == []


def test_no_module_is_longer_than_the_house_allows() -> None:
    """About 500 lines a module (STYLE.md): one concept per module."""
    long = {
        m: n for m in MODULES if (n := len((PACKAGE / f"{m}.py").read_text().splitlines())) > 550
    }
    assert long == {}


def where_tested(module: str) -> Path:
    """Where a module's tests live: tests/test_<module>.py, __main__'s in test_main.py."""
    return TESTS / f"test_{module.strip('_')}.py"


def test_every_module_has_its_test_module() -> None:
    """Tests mirror the modules: each module of the package has tests/test_<module>.py."""
    assert where_tested("__main__").name == "test_main.py"
    assert [m for m in MODULES if not where_tested(m).exists()] == []


def test_every_test_says_in_one_line_what_it_shows() -> None:
    """Each test function has a one-line docstring stating the behaviour it shows."""
    missing = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
                "test"
            ):
                doc = ast.get_docstring(node)
                if not doc or "\n" in doc.strip():
                    missing.append(f"{path.name}::{node.name}")
    assert missing == []
