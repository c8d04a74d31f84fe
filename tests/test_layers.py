"""The architecture, enforced: three packages, one import direction, layers inside the core.

``l2cache_tools`` (dev tools) -> ``l2cache_ops`` (operations) -> ``l2cache`` (cloud core),
never back; inside the core each layer imports only from its own layer or the ones
below; and no module imports itself back through others (no circle), counting the
imports made inside functions too. Read from the source with ``ast``, nothing is run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {
    "l2cache": REPO / "shared" / "l2cache",
    "l2cache_ops": REPO / "ops" / "l2cache_ops",
    "l2cache_tools": REPO / "tools" / "l2cache_tools",
}
PACKAGE_RANK = {"l2cache": 0, "l2cache_ops": 1, "l2cache_tools": 2}
# the core's layers, bottom up (docs/design.md, "Layout")
CORE_RANK = {
    "support": 0,
    "domain": 0,
    "config": 1,
    "engine": 2,
    "gcp": 2,
    "inputs": 3,
    "store": 3,
    "compute": 4,
    "serving": 4,
    "handlers": 5,
}
PURE = ("domain",)  # no I/O libraries at module level
IO_LIBRARIES = ("google", "grpc", "flask", "cloudvolume", "cloudfiles", "middle_auth_client")


def modules() -> dict[str, Path]:
    out = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def imports_of(path: Path, module_level_only: bool = False) -> set[str]:
    """First-party modules ``path`` imports (a ``from a import b`` names ``a.b`` when that
    is a module, else ``a``); relative imports resolved."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    me = next(m for m, p in MODULES.items() if p == path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return found


def third_party_of(path: Path) -> set[str]:
    """Top-level names of the libraries ``path`` imports at module level."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def graph() -> dict[str, set[str]]:
    return {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def core_layer(module: str) -> int:
    parts = module.split(".")
    return CORE_RANK[parts[1]] if len(parts) > 1 else 0


def test_every_package_and_layer_is_known():
    assert {m.split(".")[0] for m in MODULES} == set(ROOTS)
    unknown = {m for m in MODULES if m.startswith("l2cache.") and m.split(".")[1] not in CORE_RANK}
    assert not unknown, f"a new core module needs a layer in CORE_RANK: {sorted(unknown)}"


def test_imports_point_one_way_between_packages():
    wrong = [
        f"{m} -> {t}"
        for m, targets in graph().items()
        for t in targets
        if PACKAGE_RANK[t.split(".")[0]] > PACKAGE_RANK[m.split(".")[0]]
    ]
    assert not wrong, "the core never imports operations or tools, operations never tools"


def test_core_layers_import_only_downwards():
    wrong = [
        f"{m} (layer {core_layer(m)}) -> {t} (layer {core_layer(t)})"
        for m, targets in graph().items()
        if m.split(".")[0] == "l2cache"
        for t in targets
        if core_layer(t) > core_layer(m)
    ]
    assert not wrong, wrong


def test_no_import_circle_even_inside_functions():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(g[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[1:2] == ["domain"]))
def test_domain_is_pure(module):
    libs = third_party_of(MODULES[module]) & set(IO_LIBRARIES)
    assert not libs, f"{module} imports {libs} at module level"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The rules above can fail: a planted upward import is seen by the same reader."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from l2cache.handlers import lookup\n")
    MODULES["l2cache.domain.planted"] = planted
    try:
        assert "l2cache.handlers.lookup" in imports_of(planted)
        with pytest.raises(AssertionError):
            test_core_layers_import_only_downwards()
    finally:
        del MODULES["l2cache.domain.planted"]
