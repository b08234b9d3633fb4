"""pytest plugin: a real single-node Slurm for tests marked ``slurm``.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.slurm_fixture"]``.
It provides the session-scoped fixture :func:`slurm_cluster`, which brings Slurm up with
``jobs/slurm-local.sh up`` (installing slurm-wlm and munge as root on a fresh machine) and
stops it at the end of the session only if this session started it.

Where Slurm cannot be brought up (not root, no apt-get, install or start failed) the
tests that need it are skipped with a loud reason, unless ``PNEUMO_REQUIRE_SLURM=1`` or
``CI=true`` (set by CI services), in which case they fail: in CI a broken bring-up can never
pass as a skip.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "jobs" / "slurm-local.sh"
# apt-get install on a fresh machine plus the wait for an idle node (60 s in the script).
UP_TIMEOUT_S = 600
DOWN_TIMEOUT_S = 60
# jobs/slurm-local.sh: 3 = cannot bring Slurm up here (not root / no apt-get / foreign conf).
EXIT_IMPOSSIBLE = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlurmInfo:
    """What a test needs to know about the running single-node Slurm."""

    partition: str
    """Default partition jobs go to (``debug``)."""
    node: str
    """The one node's name (``hostname -s``)."""
    cores: int
    """CPUs the node declares to Slurm (may exceed the cores present, by design)."""
    started_here: bool
    """True when this session brought Slurm up, and so will bring it down."""


def _require() -> bool:
    """True under ``PNEUMO_REQUIRE_SLURM=1`` or in CI (``CI=true``, as GitHub Actions, GitLab
    and most CI services set it): there the Slurm tests must really run.
    ``PNEUMO_REQUIRE_SLURM=0`` opts out, CI or not."""
    explicit = os.environ.get("PNEUMO_REQUIRE_SLURM", "")
    if explicit in {"0", "1"}:
        return explicit == "1"
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _unavailable(reason: str) -> None:
    """Skip (or fail, under PNEUMO_REQUIRE_SLURM=1) every test that needs Slurm."""
    message = f"SLURM UNAVAILABLE, SLURM TESTS NOT RUN: {reason}"
    if _require():
        pytest.fail(f"{message} (PNEUMO_REQUIRE_SLURM=1 or CI=true makes this a failure)", pytrace=False)
    # A skip reason hides unless -rs is given; a warning always reaches the summary.
    warnings.warn(pytest.PytestWarning(message), stacklevel=2)
    pytest.skip(message)


def _run_script(action: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), action],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _query_info(started_here: bool) -> SlurmInfo:
    """Read partition, node and CPUs of the default partition from ``sinfo``."""
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%P %n %c"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    default = [row for row in rows if row[0].endswith("*")] or rows
    if not default:
        raise ValueError(f"sinfo lists no partition: {out!r}")
    partition, node, cores = default[0]
    return SlurmInfo(
        partition=partition.rstrip("*"), node=node, cores=int(cores), started_here=started_here
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmInfo]:
    """A running single-node Slurm for the whole session; see the module docstring."""
    already_up = shutil.which("sinfo") is not None and _run_script("status", 60).returncode == 0
    if not already_up:
        try:
            up = _run_script("up", UP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _unavailable(f"'{SCRIPT} up' did not finish within {UP_TIMEOUT_S} s")
        if up.returncode != 0:
            kind = "impossible here" if up.returncode == EXIT_IMPOSSIBLE else "failed"
            if up.returncode != EXIT_IMPOSSIBLE:
                _run_script("down", DOWN_TIMEOUT_S)  # stop whatever half came up
            _unavailable(
                f"'{SCRIPT} up' {kind} (exit {up.returncode}):\n"
                f"{_tail(up.stderr) or _tail(up.stdout)}"
            )
    started_here = not already_up
    try:
        try:
            info = _query_info(started_here=started_here)
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            _unavailable(f"Slurm came up but sinfo could not be read: {exc!r}")
        yield info
    finally:
        if started_here:
            down = _run_script("down", DOWN_TIMEOUT_S)
            if down.returncode != 0:
                warnings.warn(
                    pytest.PytestWarning(f"'{SCRIPT} down' failed: {_tail(down.stderr)}"),
                    stacklevel=1,
                )
