"""
What C{pip install .} ships: setup.cfg lists the packages by hand (see the
comment there), so a new subpackage left off the list would install a server
that cannot import itself while the tests, run from the tree, pass. What the
code imports is declared, and the version is written in one place.
"""

from __future__ import annotations

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
