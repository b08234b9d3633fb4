"""``python -m ingest --cluster slurm``: the worker job script (no Slurm needed) and, marked
``slurm``, real runs on the single-node test Slurm: byte-identical to the LocalCluster run,
a worker job cancelled mid-run, and the one-line errors when no worker comes.

Runs go through the CLI in a subprocess with the cluster settings in a dask config file
(``DASK_CONFIG``), as a user's ``~/.config/dask/jobqueue.yaml`` would give them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import pytest

from ingest import slurm, slurm_jobs
from ingest.cluster_base import QUIET_WORKERS, ClusterError, env_name
from ingest.config import IngestConfig
from tests.fault_injection import fault_env
from tests.inputs import copy_into

if TYPE_CHECKING:
    from tests.slurm_fixture import SlurmInfo

RUN_TIMEOUT_S = 120
INGEST_ARGS = ["--size", "64", "--shard-size", "4", "--val-fraction", "0.25", "--no-progress"]


@pytest.fixture
def restore_log_levels() -> Any:
    """CLI entry points set logger levels for the process; put them back for later tests."""
    names = ("ingest", "distributed", "dask_jobqueue", "bokeh", "tornado")
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------- no Slurm needed


@pytest.mark.parametrize(
    ("walltime", "seconds"),
    [
        ("30", 1800),
        ("10:30", 630),
        ("01:00:00", 3600),
        ("1-0", 86400),
        ("2-03:04", 183840),
        ("1-00:00:30", 86430),
        ("soon", None),
        ("1:2:3:4", None),
    ],
)
def test_walltime_seconds(walltime: str, seconds: int | None) -> None:
    assert slurm.walltime_seconds(walltime) == seconds


@pytest.mark.parametrize(
    ("walltime", "args"),
    [
        (None, []),
        ("00:04:00", []),  # too short to retire early
        ("00:10:00", ["--lifetime", "540s", "--lifetime-stagger", "30s"]),
        ("01:00:00", ["--lifetime", "3240s", "--lifetime-stagger", "180s"]),
        ("2-00:00:00", ["--lifetime", "172200s", "--lifetime-stagger", "300s"]),
    ],
)
def test_lifetime_args_retire_workers_before_the_walltime(walltime: str | None, args: list[str]) -> None:
    assert slurm.lifetime_args(walltime) == args


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("/logs/dask-worker-%J.err", "/logs/dask-worker-42.err"),
        ("/home/u/slurm-%j.out", "/home/u/slurm-42.out"),
        ("%x-%6j.%u.err", "dask-worker-000042.alice.err"),
        ("100%%-%j", "100%-42"),
    ],
)
def test_expand_filename_pattern(pattern: str, expected: str) -> None:
    assert slurm_jobs.expand_filename_pattern(pattern, "42", "dask-worker", "alice(1000)") == expected


def _cfg(tmp_path: Path, **kw: Any) -> IngestConfig:
    return IngestConfig(dicom_dir=tmp_path, out=tmp_path / "out", cluster="slurm", **kw)


QUIET = [f"export {env_name(k)}={v}" for k, v in QUIET_WORKERS.items()]
"""The worker jobs' prologue lines that quiet Dask's dashboard sampling (``ingest.cluster_base``)."""


def _unset_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in QUIET_WORKERS:
        monkeypatch.delenv(env_name(key), raising=False)


def test_cluster_kwargs_fill_only_what_the_config_leaves_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _unset_quiet(monkeypatch)
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None,
                          "jobqueue.slurm.processes": None, "jobqueue.slurm.walltime": "00:30:00"}):
        kw = slurm.cluster_kwargs(_cfg(tmp_path))
    assert kw == {"cores": 1, "processes": 1, "memory": "2GB",
                  "worker_extra_args": ["--lifetime", "1620s", "--lifetime-stagger", "90s",
                                        "--dashboard-address", "127.0.0.1:0"],
                  "job_script_prologue": QUIET}

    config = {"jobqueue.slurm.cores": 8, "jobqueue.slurm.memory": "32GB", "jobqueue.slurm.processes": None,
              "jobqueue.slurm.queue": "cpu", "jobqueue.slurm.worker-extra-args": ["--lifetime", "50m"]}
    with dask.config.set(config):
        kw = slurm.cluster_kwargs(_cfg(tmp_path, queue="big", account="rad", walltime="02:00:00"))
    # cores and memory come from the config through dask-jobqueue itself; one process per core
    assert kw == {"processes": 8, "queue": "big", "account": "rad", "walltime": "02:00:00",
                  "worker_extra_args": ["--lifetime", "50m", "--dashboard-address", "127.0.0.1:0"],
                  "job_script_prologue": QUIET}


def test_worker_jobs_quiet_dasks_dashboard_sampling_unless_the_environment_asks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The profiler cost 7% of a worker's CPU, the event loop's ticks and monitors 2%: the jobs
    set them after the configured prologue, and leave a setting the environment gives to it."""
    config = {"jobqueue.slurm.job-script-prologue": ["module load python/3.11"]}
    _unset_quiet(monkeypatch)
    with dask.config.set(config):
        lines = slurm.job_script(_cfg(tmp_path)).splitlines()
    at = lines.index("module load python/3.11") + 1
    assert lines[at:at + len(QUIET)] == QUIET
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "True")
    with dask.config.set(config):
        lines = slurm.job_script(_cfg(tmp_path)).splitlines()
    assert QUIET[0] not in lines and QUIET[0].startswith("export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=")
    assert QUIET[1] in lines


def test_job_script_renders_config_and_cli_overrides(tmp_path: Path) -> None:
    logs = tmp_path / "not" / "yet" / "logs"
    config = {
        "jobqueue.slurm.cores": 4,
        "jobqueue.slurm.memory": "16GB",
        "jobqueue.slurm.processes": None,
        "jobqueue.slurm.queue": "cpu",
        "jobqueue.slurm.account": "radiology",
        "jobqueue.slurm.walltime": "04:00:00",
        "jobqueue.slurm.interface": "ib0",
        "jobqueue.slurm.job-extra-directives": ["--constraint=skylake", "--qos=normal"],
        "jobqueue.slurm.job-script-prologue": ["module load python/3.11", "export PNEUMO_X=1"],
        "jobqueue.slurm.local-directory": "/scratch/$USER",
        "jobqueue.slurm.log-directory": str(logs),
    }
    with dask.config.set(config):
        script = slurm.job_script(_cfg(tmp_path, queue="short", walltime="01:00:00"))
    lines = script.splitlines()
    for line in (
        "#SBATCH -p short",
        "#SBATCH -A radiology",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=15G",
        "#SBATCH -t 01:00:00",
        "#SBATCH --constraint=skylake",
        "#SBATCH --qos=normal",
        f"#SBATCH -e {logs}/dask-worker-%J.err",
        "module load python/3.11",
        "export PNEUMO_X=1",
    ):
        assert line in lines, line
    command = lines[-1]
    assert command.startswith(f"{sys.executable} -m distributed.cli.dask_worker {slurm.PLACEHOLDER_SCHEDULER} ")
    for part in ("--nworkers 4", "--nthreads 1", "--memory-limit 3.73GiB", "--interface ib0",
                 "--local-directory /scratch/$USER", "--lifetime 3240s --lifetime-stagger 180s"):
        assert part in command, part
    assert not (tmp_path / "not").exists(), "rendering a script must not create its log folder"


def test_dry_run_prints_the_job_script_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, restore_log_levels: None
) -> None:
    from ingest.__main__ import main

    out = tmp_path / "out"
    with dask.config.set({"jobqueue.slurm.queue": "cpu", "jobqueue.slurm.cores": None,
                          "jobqueue.slurm.memory": None}):
        rc = main(["--dicom-dir", str(tmp_path), "--out", str(out), "--cluster", "slurm", "--dry-run",
                   "--account", "rad", "--walltime", "00:20:00"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.startswith("#!/usr/bin/env bash")
    for line in ("#SBATCH -p cpu", "#SBATCH -A rad", "#SBATCH -t 00:20:00", "#SBATCH --cpus-per-task=1"):
        assert line in printed.splitlines()
    # TLS: the workers get credential file names (made when the driver runs), never a key.
    credentials = out / ".ingest" / slurm.PLACEHOLDER_CREDENTIALS
    for part in ("tls://SCHEDULER-ADDRESS:PORT", "--protocol tls://", f"--tls-key {credentials}/"):
        assert part in printed, part
    assert "PRIVATE KEY" not in printed
    assert not out.exists()


def test_preflight_without_sbatch_is_a_cluster_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ClusterError, match="sbatch is not on PATH"):
        slurm.preflight("#!/bin/bash\n")


# ---------------------------------------------------------------- real Slurm


def _dask_config(folder: Path, partition: str, name: str, **slurm_extra: Any) -> Path:
    """A dask config folder (for ``DASK_CONFIG``) with the settings the test Slurm needs."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    section = {
        "name": name,
        "cores": 1,
        "memory": "1GB",
        "queue": partition,
        "walltime": "00:10:00",
        "interface": "lo",  # scheduler and workers share the one host
        "local-directory": str(folder / "local"),
        "log-directory": str(folder / "logs"),
        **slurm_extra,
    }
    config = {"jobqueue": {"slurm": section}, "distributed": {"deploy": {"lost-worker-timeout": "1s"}}}
    (folder / "jobqueue.yaml").write_text(yaml.safe_dump(config))
    return folder


def _env(config_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DASK_CONFIG": str(config_dir), "PNEUMO_DASHBOARD": ":0", **extra}


def _ingest_cmd(synth: Any, out: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "ingest", "--dicom-dir", str(synth.images_dir), "--labels", str(synth.labels_csv),
        "--class-info", str(synth.class_info_csv), "--out", str(out), "--cluster", "slurm", *INGEST_ARGS, *args,
    ]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_identical(out: Path, reference: Path) -> None:
    got, want = _tree(out), _tree(reference)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files differ from the LocalCluster run: {differ}"


def _states_named(name: str) -> dict[str, str]:
    """``{job id: state}`` of the jobs called ``name`` that Slurm still lists."""
    proc = subprocess.run(["squeue", "--noheader", f"--name={name}", "--format=%i %T"],
                          capture_output=True, text=True, timeout=30, check=True)
    return dict(line.split() for line in proc.stdout.splitlines() if line.strip())


def _jobs_named(name: str) -> set[str]:
    return set(_states_named(name))


def _no_jobs_left(name: str, timeout_s: float = 30) -> bool:
    """True once no job of this name is pending, running or completing (cancelling takes a moment)."""
    deadline = time.monotonic() + timeout_s
    while _jobs_named(name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _run_watched(cmd: list[str], env: dict[str, str], watch: Callable[[], None]) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``, calling ``watch()`` every 0.3 s while it runs; kill it if the test fails or it overruns."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not finish in time"
            watch()
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _unique_name() -> str:
    return f"pneumo-t-{uuid.uuid4().hex[:8]}"


@pytest.mark.slurm
def test_slurm_ingest_with_two_jobs_matches_local_cluster(
    slurm_cluster: SlurmInfo, synth_small: Any, ingested_small: Path, tmp_path: Path
) -> None:
    config = _dask_config(tmp_path / "dask", slurm_cluster.partition, _unique_name())
    out = tmp_path / "ds"
    proc = subprocess.run(_ingest_cmd(synth_small, out, "--jobs", "2"), env=_env(config),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"#SBATCH -p {slurm_cluster.partition}" in proc.stderr, "the job script is logged"
    connected = [ln for ln in proc.stderr.splitlines() if "first worker connected" in ln]
    assert connected and len(connected[0].split("jobs ")[1].split()) == 2, proc.stderr[-2000:]
    assert "shards: 7 built, 0 reused" in proc.stdout
    _assert_identical(out, ingested_small)


@pytest.mark.slurm
def test_cancelled_worker_job_is_replaced_and_output_is_identical(
    slurm_cluster: SlurmInfo, synth_small: Any, ingested_small: Path, tmp_path: Path
) -> None:
    name = _unique_name()
    config = _dask_config(tmp_path / "dask", slurm_cluster.partition, name)
    out = tmp_path / "ds"
    # Each file's open sleeps 0.4 s, so a 4-sample shard takes about 1.6 s: with 7 shards on
    # 2 workers, both are mid-shard when the first shard is done.
    env = fault_env("*.dcm=sleep:0.4", _env(config))
    seen: set[str] = set()
    victim = None

    def cancel_one_mid_shard() -> None:
        nonlocal victim
        seen.update(_jobs_named(name))
        done = list((out / ".ingest" / "done").glob("*.json")) if (out / ".ingest" / "done").is_dir() else []
        if victim is None and done:
            victim = min(seen, key=int)
            subprocess.run(["scancel", victim], check=True, timeout=30)
            assert len(done) < 7, "cancelled too late to hit a shard in flight"

    proc = _run_watched(_ingest_cmd(synth_small, out, "--jobs", "2"), env, cancel_one_mid_shard)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert victim is not None, "no shard finished while the run was watched"
    assert len(seen) >= 3, f"expected a replacement job besides the two first ones, saw {sorted(seen)}"
    assert "shards: 7 built" in proc.stdout
    _assert_identical(out, ingested_small)
    assert _no_jobs_left(name), "worker jobs are cancelled when the run ends"


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("case", "slurm_extra", "args", "expected"),
    [
        ("job fails at start", {"job-script-prologue": ["echo pneumo-test-cannot-start >&2", "exit 3"]}, [],
         ["every worker job ended", "FAILED (NonZeroExitCode)", "pneumo-test-cannot-start"]),
        ("jobs stay pending", {"job-extra-directives": ["--begin=now+3600"]}, ["--worker-timeout", "3"],
         ["none within 3 s (--worker-timeout)", "PENDING (BeginTime)"]),
        ("no such partition", {}, ["--queue", "no-such-partition"],
         ["Slurm rejects the worker job", "invalid partition"]),
    ],
)
def test_no_worker_is_a_one_line_error_naming_the_cause(
    slurm_cluster: SlurmInfo, synth_small: Any, tmp_path: Path, case: str,
    slurm_extra: dict[str, Any], args: list[str], expected: list[str],
) -> None:
    name = _unique_name()
    config = _dask_config(tmp_path / "dask", slurm_cluster.partition, name, **slurm_extra)
    proc = subprocess.run(_ingest_cmd(synth_small, tmp_path / "ds", "--jobs", "2", *args), env=_env(config),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in last, f"{case}: {text!r} not in {last!r}"
    assert "Traceback" not in proc.stderr
    assert _no_jobs_left(name), "pending or failed worker jobs are cancelled"


@pytest.mark.slurm
def test_slurm_bench_runs_and_finds_identical_bytes(
    slurm_cluster: SlurmInfo, tmp_path: Path, capsys: pytest.CaptureFixture, restore_log_levels: None
) -> None:
    from ingest.slurm_bench import main

    config = {"jobqueue.slurm.interface": "lo", "jobqueue.slurm.queue": slurm_cluster.partition,
              "jobqueue.slurm.name": _unique_name(), "jobqueue.slurm.log-directory": str(tmp_path / "logs")}
    with dask.config.set(config):
        rc = main(["--n", "8", "--size", "128", "--shard-size", "4", "--workers", "1", "--repeat", "1",
                   "--workdir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "| SLURMCluster (K jobs) | 1 |" in printed and "| LocalCluster (K processes) | 1 |" in printed
    assert "same shard bytes on every cluster: yes" in printed


def _sbatch_filler(partition: str, name: str, cpus: int) -> str:
    """A sleeping job that holds ``cpus`` CPUs of the test node; returns its id."""
    return subprocess.run(["sbatch", "--parsable", "-p", partition, "-J", name, "-c", str(cpus), "--mem=100M",
                           "-o", "/dev/null", "--wrap", "sleep 600"],
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()


@pytest.mark.slurm
def test_worker_job_cancelled_while_pending_is_replaced_and_output_is_identical(
    slurm_cluster: SlurmInfo, synth_small: Any, ingested_small: Path, tmp_path: Path
) -> None:
    name = _unique_name()
    config = _dask_config(tmp_path / "dask", slurm_cluster.partition, name)
    out = tmp_path / "ds"
    # Fill the node but one core: the first worker job runs, the second waits (PENDING, Resources).
    filler = _sbatch_filler(slurm_cluster.partition, f"{name}-filler", slurm_cluster.cores - 1)
    # 7 shards on the one worker: >= 14 s (the decoder opens each file itself)
    env = fault_env("*.dcm=sleep:0.5", _env(config))
    seen: dict[str, set[str]] = {}
    victim = None

    def cancel_the_pending_job_then_free_the_node() -> None:
        nonlocal victim, filler
        now = _states_named(name)
        for job, state in now.items():
            seen.setdefault(job, set()).add(state)
        if victim is None and sorted(now.values()) == ["PENDING", "RUNNING"]:
            victim = next(job for job, state in now.items() if state == "PENDING")
            subprocess.run(["scancel", victim], check=True, timeout=30)
        if victim and filler and len(seen) > 2:  # the replacement is queued: let it run
            subprocess.run(["scancel", filler], check=True, timeout=30)
            filler = None

    try:
        proc = _run_watched(_ingest_cmd(synth_small, out, "--jobs", "2"), env,
                            cancel_the_pending_job_then_free_the_node)
    finally:
        if filler:
            subprocess.run(["scancel", filler], check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert victim is not None, f"no worker job was seen pending beside a running one: {seen}"
    replacements = sorted(set(seen) - set(sorted(seen, key=int)[:2]), key=int)
    assert replacements and "RUNNING" in seen[replacements[0]], f"no replacement job ran: {seen}"
    assert f"worker job {victim} ended CANCELLED" in proc.stderr and "submitting a replacement" in proc.stderr
    assert "shards: 7 built" in proc.stdout
    _assert_identical(out, ingested_small)
    assert _no_jobs_left(name), "worker jobs are cancelled when the run ends"


@pytest.mark.slurm
def test_slurm_append_matches_a_local_cluster_append(slurm_cluster: SlurmInfo, synth_small: Any, tmp_path: Path) -> None:
    """``--append`` on SLURMCluster workers: the bytes of the same append on a LocalCluster (the
    new version's record aside, whose ``created`` is the time it was made)."""
    import shutil

    files = sorted(synth_small.images_dir.glob("*.dcm"))
    halves = [copy_into(tmp_path / "first", files[:12]), copy_into(tmp_path / "month", files[12:])]
    local, on_slurm = tmp_path / "local", tmp_path / "slurm"
    base = _ingest_cmd(synth_small, local, "--workers", "1")
    base[base.index("--dicom-dir") + 1] = str(halves[0])
    base = [a for a in base if a not in ("--cluster", "slurm")]
    subprocess.run(base, env=_env(tmp_path), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=True)
    shutil.copytree(local, on_slurm)
    append = [*base, "--append"]
    append[append.index("--dicom-dir") + 1] = str(halves[1])
    subprocess.run(append, env=_env(tmp_path), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=True)

    name = _unique_name()
    config = _dask_config(tmp_path / "dask", slurm_cluster.partition, name)
    cmd = [*append, "--cluster", "slurm", "--jobs", "1"]
    cmd[cmd.index("--out") + 1] = str(on_slurm)
    proc = subprocess.run(cmd, env=_env(config), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"#SBATCH -p {slurm_cluster.partition}" in proc.stderr, "the workers are Slurm jobs"
    assert "version: 2; skipped 0 already ingested" in proc.stdout
    got, want = _tree(on_slurm), _tree(local)
    assert sorted(got) == sorted(want)
    record = "versions/v0002.json"
    differ = [n for n in want if n != record and got[n] != want[n]]
    assert not differ, f"files differ from the LocalCluster append: {differ}"
    undated = [{k: v for k, v in json.loads(tree[record]).items() if k != "created"} for tree in (got, want)]
    assert undated[0] == undated[1]
    assert _no_jobs_left(name), "worker jobs are cancelled when the append ends"
