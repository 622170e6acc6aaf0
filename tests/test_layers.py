"""The package's folders are its layers: each imports only the layers below it.

docs/architecture.md draws the picture; this test keeps the code to it. Imports under
`if TYPE_CHECKING:` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hub

ROOT = Path(hub.__file__).parent
BASE = {"errors", "timeouts"}  # leaf modules any layer may use
ALLOWED: dict[str, set[str]] = {
    "rules": set(),
    "store": {"rules"},
    "ssh": set(),
    "tunnel": {"rules", "store", "ssh"},
    "access": {"rules", "store", "ssh", "tunnel"},
    "intake": {"rules", "store", "ssh", "tunnel"},
    "netconf": {"rules", "store", "ssh", "tunnel", "access"},
    "web": {"rules", "store", "ssh", "tunnel", "access", "intake"},
    "app": {"rules", "store", "ssh", "tunnel", "access", "intake", "netconf", "web"},
    "cluster": {"rules", "store", "ssh", "tunnel", "access"},
}
ALLOWED["app"].add("cluster")
# Value classes a lower layer may name: the registry's rows are plain attrs values.
VALUES = {"hub.store.rows"}


def runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hub"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hub"))
    return found


def test_every_folder_is_a_known_layer() -> None:
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(ALLOWED)


def test_layers_import_only_the_layers_below_them() -> None:
    wrong: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        layer = rel.parts[0] if len(rel.parts) > 1 else None
        for module in runtime_imports(path):
            target = module.split(".")[1] if "." in module else ""
            if target == "" or target in BASE:  # `hub` itself (__version__) and the leaves
                ok = True
            elif layer is None:
                ok = False
            else:
                ok = target == layer or target in ALLOWED[layer] or module in VALUES
            if not ok:
                wrong.append(f"{rel} imports {module}")
    assert wrong == []
