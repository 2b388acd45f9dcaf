"""
What C{pip install .} ships: setup.cfg lists the packages by hand (see the
comment there), so a new subpackage left off the list would install a server
that cannot import itself while the tests, run from the tree, pass. What the
code imports is declared, and the version is written in one place.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest

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


def _declared() -> set[str]:
    """The distributions setup.cfg's install_requires names, normalized."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = (line.strip() for line in config["options"]["install_requires"].splitlines())
    return {canonicalize_name(Requirement(line).name) for line in lines if line and not line.startswith("#")}


def test_every_import_is_declared() -> None:
    """
    What our code imports is in install_requires, not merely brought by a
    library that may stop bringing it (werkzeug, hyperlink, zope.interface).
    """
    import sys
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    owners = packages_distributions()
    code = [*(ROOT / "audiohangup").rglob("*.py"), *(ROOT / "twisted" / "plugins").glob("*.py")]
    needed: dict[str, str] = {}
    for module in {module for path in code for module in _imported(path)}:
        parts = module.split(".")
        if parts[0] in sys.stdlib_module_names or parts[0] == "audiohangup":
            continue
        if canonicalize_name(parts[0]) in _declared():
            # Declared under its own name, as a backport for older Pythons may be (tomli): not installed here.
            needed[canonicalize_name(parts[0])] = module
            continue
        # A top-level name several distributions share (twisted: Twisted and
        # the plugins others drop in; zope: a namespace) is the one it names.
        candidates = [canonicalize_name(name) for name in owners.get(parts[0], [])]
        named = [name for name in candidates if name in {canonicalize_name(parts[0]), canonicalize_name(".".join(parts[:2]))}]
        assert named or len(candidates) == 1, f"which distribution ships {module}? {candidates}"
        needed[(named or candidates)[0]] = module
    missing = {name: module for name, module in needed.items() if name not in _declared()}
    assert missing == {}, "add these to install_requires in setup.cfg"
    assert {"werkzeug", "hyperlink", "zope-interface", "twisted"} <= set(needed)


def test_the_version_is_written_once() -> None:
    """
    C{audiohangup.__version__} is the version: setup.cfg reads it from there,
    no other file spells one, and towncrier titles NEWS.rst from it too.
    """
    import re

    from packaging.version import Version

    import audiohangup

    version = Version(audiohangup.__version__)
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["version"] == "attr: audiohangup.__version__"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["towncrier"]["package"] == "audiohangup"
    assert "version" not in pyproject["tool"]["towncrier"] and "version" not in pyproject.get("project", {})
    # NEWS.rst: each release a title "audiohangup X.Y.Z (date)", newest first,
    # none ahead of the version (a development version comes after its last release).
    news = (ROOT / "NEWS.rst").read_text(encoding="utf-8")
    released = [Version(found) for found in re.findall(r"^audiohangup (\S+) \(", news, re.MULTILINE)]
    assert released, "NEWS.rst has no release title"
    assert released == sorted(released, reverse=True)
    assert released[0] <= version


def test_every_newsfragment_has_a_known_type() -> None:
    """
    A fragment is C{<name>.<type>} of a type pyproject.toml names: towncrier
    would leave a misspelt one (C{x.features}) out of NEWS.rst without a word.
    """
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    towncrier = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["towncrier"]
    types = {entry["directory"] for entry in towncrier["type"]}
    assert types == {"feature", "bugfix", "removal", "deprecation", "doc", "misc"}
    directory = ROOT / towncrier["directory"]
    ours = {"README.rst", Path(towncrier["template"]).name}
    for path in directory.iterdir():
        if path.name in ours:
            continue
        parts = path.name.split(".")
        if parts[-1].isdigit():  # x.feature.2: towncrier's counter
            parts.pop()
        assert len(parts) > 1 and parts[-1] in types, f"{path.name}: name it <short-name>.<type>, a type of {sorted(types)}"
        assert path.read_text(encoding="utf-8").strip(), f"{path.name} says nothing"


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


#: The wiring builds the API and its site (service.py), checks their options (tap.py) and gives the
#: API the tokens SIGHUP reads again (reload.py, the wiring's part that runs after start-up).
_WIRING = {"audiohangup/service.py", "audiohangup/tap.py", "audiohangup/reload.py"}


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


def test_every_module_names_tests_that_exist() -> None:
    """
    Each module's C{test-case-name} header names test modules that exist, so
    C{trial audiohangup.protocol} (and an editor's "run its tests") finds them.
    """
    missing: dict[str, list[str]] = {}
    for path in sorted((ROOT / "audiohangup").rglob("*.py")):
        if path.name == "__init__.py" and path.stat().st_size == 0:
            continue
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        name = path.relative_to(ROOT).as_posix()
        if not first.startswith("# -*- test-case-name:"):
            missing[name] = ["(no header)"]
            continue
        named = first.removeprefix("# -*- test-case-name:").removesuffix("-*-").strip().split(",")
        absent = [test for test in named if not (ROOT / (test.strip().replace(".", "/") + ".py")).is_file()]
        if absent:
            missing[name] = absent
    assert missing == {}
