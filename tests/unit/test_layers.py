"""Every import arrow points down: the layers of README "How it is built", read from the source.

The package is built in layers; a module imports its own package and the layers below it,
never a layer above or a sibling package of its own layer. An import hidden inside a function
(or under ``if TYPE_CHECKING``) is still an arrow: it hides a cycle instead of removing it, so
it is allowed only where it is there for start-up time, listed in ``HIDDEN_ALLOWED`` with its
reason. These tests read the source with ``ast`` and import nothing of the package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vmbusify"

#: Bottom to top. A module's layer is that of its top-level package or module under vmbusify
#: (``vmbusify`` itself is the package's ``__init__``: its version). Keep in step with the
#: README's "How it is built".
LAYERS: list[set[str]] = [
    {"vmbusify", "errors", "text"},
    {"logs", "system", "config_file", "runtime"},
    {"protocol"},
    {"transport"},
    {"config"},
    {"users", "bus"},
    {"mux", "workers"},
    {"control"},
    {"lab", "files"},
    {"client"},
    {"cli"},
]

#: Packages whose sub-packages are independent of each other (a worker never imports another;
#: a module directly inside, such as a base class, is shared).
INDEPENDENT_PARTS = {"workers"}

#: Lower parts a part must not import although they are below it: part -> (parts, why).
FORBIDDEN = {
    "lab": ({"bus", "mux", "workers", "control"},
            ("the lab runs the stacks as programs (supervisord, their CLIs, their config "
             "files) and reaches into none of them")),
}

#: Imports inside a function or under ``if TYPE_CHECKING``, allowed for start-up time only:
#: (importing module, imported module) -> why.
HIDDEN_ALLOWED = {
    ("vmbusify.control.exec_wire", "vmbusify.config_file"):
        "vmbusifyexec's start is its latency (docs/exec.md, 'A light client')",
    ("vmbusify.control.exec_wire", "vmbusify.control.token"):
        "vmbusifyexec's start is its latency (docs/exec.md, 'A light client')",
    ("vmbusify.control.exec_wire", "vmbusify.control.verify"):
        "vmbusifyexec's start is its latency (docs/exec.md, 'A light client')",
    ("vmbusify.control.client", "vmbusify.control.exec_wire"):
        "vmbusifyctl's start: only an exec (a copy's transport) needs the exec wire",
    ("vmbusify.client", "vmbusify.client.api"):
        "types only: vmbusify.client loads its names lazily, vmbusifyexec imports client.wire",
    ("vmbusify.client", "vmbusify.client.execution"):
        "types only: vmbusify.client loads its names lazily, vmbusifyexec imports client.wire",
    ("vmbusify.client", "vmbusify.client.forward"):
        "types only: vmbusify.client loads its names lazily, vmbusifyexec imports client.wire",
    ("vmbusify.client", "vmbusify.client.status"):
        "types only: vmbusify.client loads its names lazily, vmbusifyexec imports client.wire",
    ("vmbusify.client", "vmbusify.control.exec_wire"):
        "types only: vmbusify.client loads its names lazily, vmbusifyexec imports client.wire",
    ("vmbusify.client", "vmbusify.protocol.exec_api"):
        "types only: vmbusify.client loads its names lazily, vmbusifyexec imports client.wire",
    ("vmbusify.client", "vmbusify.files"):
        "types only: vmbusify.client loads its names lazily, vmbusifyexec imports client.wire",
    ("vmbusify.client.api", "vmbusify.client.forward"):
        "Client loads it for forward, push/pull or config only: status and exec (Ansible's "
        "inventory and connection plugins) skip ~40 ms of imports (docs/api.md, 'Start-up')",
    ("vmbusify.client.api", "vmbusify.config"):
        "Client loads it for forward, push/pull or config only: status and exec (Ansible's "
        "inventory and connection plugins) skip ~40 ms of imports (docs/api.md, 'Start-up')",
    ("vmbusify.client.api", "vmbusify.config_file"):
        "Client loads it for forward, push/pull or config only: status and exec (Ansible's "
        "inventory and connection plugins) skip ~40 ms of imports (docs/api.md, 'Start-up')",
    ("vmbusify.client.api", "vmbusify.files"):
        "Client loads it for forward, push/pull or config only: status and exec (Ansible's "
        "inventory and connection plugins) skip ~40 ms of imports (docs/api.md, 'Start-up')",
    ("vmbusify.control.verify", "vmbusify.users.peer"):
        "vmbusifyexec loads it for a TCP listener only",
    ("vmbusify.control.client", "vmbusify.config"):
        "a type only: vmbusifyctl's client is stdlib-only so it starts fast",
    ("vmbusify.cli.exec", "vmbusify.cli.completion"):
        "vmbusifyexec's start is its latency: its completion script only when asked",
    ("vmbusify.cli.exec", "vmbusify.cli.locate"):
        "vmbusifyexec's start is its latency (docs/exec.md, 'A light client')",
    ("vmbusify.cli.ctl", "vmbusify.cli.forward"):
        "vmbusifyctl loads forward (asyncio, msgpack) only when it runs (docs/cli.md)",
    ("vmbusify.cli.ctl", "vmbusify.cli.cp"):
        "vmbusifyctl loads cp (vmbusify.files) only when it runs",
    ("vmbusify.files.channel", "vmbusify.config"):
        "a type only: vmbusifyctl cp hands the copy its listener client, not the "
        "configuration model (~45 ms of its start: docs/performance.md)",
    ("vmbusify.files.copy", "vmbusify.config"):
        "push/pull load the configuration model only when given neither a config nor a "
        "client (vmbusifyctl cp gives its client: ~45 ms of its start)",
    ("vmbusify.cli.ctl", "vmbusify.config"):
        "vmbusifyctl loads the whole config model only for forward (docs/cli.md)",
    ("vmbusify.cli.main", "vmbusify.cli.manpages"):
        "the man pages load every CLI, which no other vmbusify command needs",
    ("vmbusify.cli.programs", "vmbusify.mux.main"):
        "each program's process loads its own code only",
    ("vmbusify.cli.programs", "vmbusify.control.server"):
        "each program's process loads its own code only",
}

#: Third-party modules only one part of the package may import.
OWNED_IMPORTS = {"zmq": "bus"}
#: Modules that still import a library they do not own: (library, module) -> why. The test
#: fails when one is no longer needed, so the list only shrinks.
OWNED_EXCEPTIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Arrow:
    """One import: ``source`` imports ``target`` (both dotted module names)."""

    source: str
    target: str
    line: int
    hidden: bool

    def __str__(self) -> str:
        where = " (inside a function or TYPE_CHECKING)" if self.hidden else ""
        return f"{self.source}:{self.line} imports {self.target}{where}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    base = PACKAGE.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").is_file()


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """Ids of the import statements that run when the module is imported (not inside a
    function, nor under ``if TYPE_CHECKING``)."""
    out: set[int] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.add(id(node))
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return out


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool) -> list[str]:
    """The modules ``node`` imports; ``from P import N`` names ``P.N`` when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = source.split(".") if is_package else source.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if base.startswith("vmbusify") and _is_module(sub) else base)
    return out


def arrows() -> Iterator[Arrow]:
    """Every import statement in the package, as arrows."""
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        top = _top_level_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, source, path.name == "__init__.py"):
                    yield Arrow(source, target, node.lineno, id(node) not in top)


ARROWS = list(arrows())
INTERNAL = [a for a in ARROWS if a.target.split(".")[0] == "vmbusify"]


def part(module: str) -> str:
    """The top-level part of the package a module belongs to (``vmbusify`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vmbusify"


def layer(module: str) -> int:
    """The index of ``module``'s layer in LAYERS."""
    name = part(module)
    for i, members in enumerate(LAYERS):
        if name in members:
            return i
    raise AssertionError(f"{module}: part {name!r} is in no layer: add it to LAYERS")


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {part(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert [p for p in sorted(parts) if not any(p in layer for layer in LAYERS)] == []
    named = [p for layer in LAYERS for p in layer]
    assert len(named) == len(set(named)), "a part is in two layers"


def test_every_arrow_points_down() -> None:
    up = []
    for a in INTERNAL:
        src, dst = part(a.source), part(a.target)
        if src == dst:
            if src in INDEPENDENT_PARTS:
                mine, theirs = a.source.split(".")[:3], a.target.split(".")[:3]
                if mine != theirs and _is_package(".".join(theirs)):
                    up.append(f"{a} (one {src} package imports another)")
            continue
        if layer(a.target) >= layer(a.source):
            up.append(f"{a} (layer {layer(a.source)} -> {layer(a.target)})")
        elif dst in FORBIDDEN.get(src, ((), ""))[0]:
            up.append(f"{a} ({src} must not import {dst}: {FORBIDDEN[src][1]})")
    assert up == []


def test_no_hidden_imports_but_the_listed_start_up_ones() -> None:
    hidden = {(a.source, a.target): a for a in INTERNAL if a.hidden}
    assert [str(a) for key, a in sorted(hidden.items()) if key not in HIDDEN_ALLOWED] == []
    # A listed one that is gone (moved to the top, or deleted) leaves the list too.
    assert sorted(set(HIDDEN_ALLOWED) - set(hidden)) == []


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for a in INTERNAL:
        graph.setdefault(a.source, set()).add(a.target)
    # A submodule's import runs its package's __init__ first: that is not an arrow back.
    for src, targets in graph.items():
        graph[src] = {t for t in targets if not src.startswith(f"{t}.")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert [" -> ".join(c) for c in cycles] == []


@pytest.mark.parametrize(("library", "owner"), sorted(OWNED_IMPORTS.items()))
def test_only_its_owner_imports_a_library(library: str, owner: str) -> None:
    users = {a.source for a in ARROWS
             if a.target.split(".")[0] == library and part(a.source) != owner}
    known = {module for lib, module in OWNED_EXCEPTIONS if lib == library}
    assert sorted(users - known) == []
    assert sorted(known - users) == [], "no longer needed: remove it from OWNED_EXCEPTIONS"


def test_the_checker_sees_what_it_must() -> None:
    """The rules above are only as good as the arrows found: check the reader on a sample."""
    tree = ast.parse("from __future__ import annotations\n"
                     "import os\n"
                     "from vmbusify.lab import netns as ip\n"
                     "from vmbusify.config import Config\n"
                     "TYPE_CHECKING = False\n"
                     "if TYPE_CHECKING:\n"
                     "    from vmbusify.bus import link\n"
                     "def f() -> None:\n"
                     "    from vmbusify.mux.main import run_mux\n")
    top = _top_level_nodes(tree)
    found = [(t, id(n) not in top) for n in ast.walk(tree)
             if isinstance(n, ast.Import | ast.ImportFrom)
             for t in _targets(n, "vmbusify.lab.lab", False)]
    assert found == [("__future__", False), ("os", False), ("vmbusify.lab.netns", False),
                     ("vmbusify.config", False), ("vmbusify.bus.link", True),
                     ("vmbusify.mux.main", True)]
    assert layer("vmbusify.cli.exec") > layer("vmbusify.control.verify") > layer("vmbusify")
