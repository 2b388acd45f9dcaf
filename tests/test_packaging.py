"""
What C{pip install .} ships: setup.cfg lists the packages by hand (see the
comment there), so a new subpackage left off the list would install a server
that cannot import itself while the tests, run from the tree, pass.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_setup_cfg() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "audiohangup").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - listed == set(), "add these to [options] packages in setup.cfg"
    assert "twisted.plugins" in listed


def test_the_live_page_is_shipped() -> None:
    """Every file the API serves for the live page is in the package data of audiohangup.http."""
    from audiohangup.http.answers import _STATIC_TYPES

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    package = ROOT / "audiohangup" / "http"
    shipped = {
        path.relative_to(package).as_posix()
        for pattern in config["options.package_data"]["audiohangup.http"].split()
        for path in package.glob(pattern)
    }
    assert {f"web/{name}" for name in _STATIC_TYPES} <= shipped


#: The wiring builds the API and its site (service.py) and checks their options (tap.py).
_WIRING = {"audiohangup/service.py", "audiohangup/tap.py"}


def _imported(path: Path) -> set[str]:
    """Every module C{path} imports, anywhere in it (under TYPE_CHECKING and inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of path
                base = path.relative_to(ROOT).parent.parts[: len(path.relative_to(ROOT).parent.parts) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _http(module: str) -> bool:
    return module == "audiohangup.http" or module.startswith("audiohangup.http.")


def test_only_http_knows_status_codes() -> None:
    """
    Nothing outside audiohangup/http/ imports it: the domain raises its own
    exceptions, which http/errors.py answers. The wiring alone builds the API
    (and checks its options), and even it never imports the errors.
    """
    wrong = {}
    for path in sorted((ROOT / "audiohangup").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name.startswith("audiohangup/http/"):
            continue
        imported = {module for module in _imported(path) if _http(module)}
        if name in _WIRING:
            imported = {module for module in imported if module.startswith("audiohangup.http.errors")}
        if imported:
            wrong[name] = sorted(imported)
    assert wrong == {}, "only audiohangup/http/ knows status codes: raise a domain exception instead"
