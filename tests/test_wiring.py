"""
Only the wiring imports the protocol: every other part knows a leg through
L{audiohangup.interfaces} (a flow as an C{ILeg}, the server's parts as an
C{IServerLeg}), so that a test can hand any of them a stand-in, and the
README's "nothing but the wiring imports the protocol" stays true. Read from
the source with C{ast}, type-checking imports included, as C{test_packaging}
reads setup.cfg.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "audiohangup"

#: The modules that build the legs' factories.
WIRING = {"audiohangup/service.py"}


def _imported(source: str, package: str) -> set[str]:
    """
    The modules a module of C{package} imports, absolute: C{from a import b}
    counts as C{a} and as C{a.b} (b may be a module).
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                module = ".".join([*parts[: len(parts) - node.level + 1], *([module] if module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _importers(target: str) -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "__pycache__" not in path.parts
        and target in _imported(path.read_text(encoding="utf-8"), ".".join(path.relative_to(ROOT).parent.parts))
    }


def test_only_the_wiring_imports_the_protocol() -> None:
    importers = _importers("audiohangup.protocol") - {"audiohangup/protocol.py"}
    assert importers <= WIRING, f"only {sorted(WIRING)} may import audiohangup.protocol, not {sorted(importers - WIRING)}"
    assert importers, "the wiring builds the legs' factories: it imports the protocol"


def test_every_spelling_counts() -> None:
    """Absolute, relative, a whole module or a name from it, under TYPE_CHECKING too."""
    for source, package in [
        ("from audiohangup.protocol import AudioSocketFactory", "audiohangup"),
        ("import audiohangup.protocol", "audiohangup"),
        ("from audiohangup import protocol", "audiohangup"),
        ("from . import protocol", "audiohangup"),
        ("from .protocol import LegState", "audiohangup"),
        ("from ..protocol import LegState", "audiohangup.streams"),
        ("if TYPE_CHECKING:\n    from audiohangup.protocol import AudioSocketProtocol", "audiohangup"),
    ]:
        assert "audiohangup.protocol" in _imported(source, package), source
    assert "audiohangup.protocol" not in _imported("from audiohangup.interfaces import ILeg", "audiohangup")
