"""Promises of the project's own metadata (pyproject.toml)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _floor(spec: str | None) -> tuple[int, ...]:
    """The lowest Python a ``Requires-Python`` spec allows (only ``>=X.Y`` bounds are read)."""
    found = re.search(r">=\s*(\d+(?:\.\d+)*)", spec or "")
    return tuple(int(p) for p in found.group(1).split(".")) if found else (0,)


def test_requires_python_is_no_lower_than_any_dependency_needs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = _floor(project["requires-python"])
    deps = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    assert deps, "no dependencies read from pyproject.toml"
    higher = {}
    for dep in deps:
        name = re.split(r"[\s<>=!~\[;]", dep, maxsplit=1)[0]
        try:
            theirs = _floor(metadata.metadata(name).get("Requires-Python"))  # a wheel may not declare it
        except metadata.PackageNotFoundError:
            continue  # an extra that is not installed here
        if theirs > ours:
            higher[name] = ".".join(map(str, theirs))
    assert not higher, f"requires-python {project['requires-python']!r}, but these need more: {higher}"


BLOCK_WEBDATASET = '''
import importlib, pkgutil, sys

class _NoWebdataset:
    def find_spec(self, name, path=None, target=None):
        if name == "webdataset" or name.startswith("webdataset."):
            raise ImportError("webdataset is a dev dependency: the project's code never imports it")
        return None

sys.meta_path.insert(0, _NoWebdataset())
for pkg in ("ingest", "shards", "train", "tools"):
    for mod in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
'''


def test_webdataset_is_a_dev_dependency_the_code_never_imports() -> None:
    import subprocess
    import sys

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    named = lambda deps: {re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0] for d in deps}  # noqa: E731
    assert "webdataset" not in named(project["dependencies"])
    assert "webdataset" in named(project["optional-dependencies"]["dev"])
    proc = subprocess.run([sys.executable, "-c", BLOCK_WEBDATASET], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
