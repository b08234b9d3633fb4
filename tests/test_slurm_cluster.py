"""dask-jobqueue's SLURMCluster against a real single-node Slurm (jobs/slurm-local.sh).

The job-script test only renders text and needs no scheduler; the others are marked
``slurm`` and use the session fixture ``slurm_cluster`` from ``tests/slurm_fixture.py``.
The last one runs the ingest's own ``open_slurm_client`` (TLS with credentials made for the
run) and knocks on its scheduler and a worker without those credentials.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import dask
import pytest
from dask_jobqueue import SLURMCluster
from distributed import Client
from distributed.comm import connect
from distributed.security import Security

from ingest.config import IngestConfig
from ingest.slurm import open_slurm_client, redact
from ingest.slurm_jobs import UnstartedJobReplacer

if TYPE_CHECKING:  # a runtime import would load the plugin before pytest can rewrite it
    from tests.slurm_fixture import SlurmInfo

# Loads the fixture until tests/conftest.py names the plugin itself; pytest registers a
# plugin once, so keeping both lines is harmless.
pytest_plugins = ["tests.slurm_fixture"]

WORKER_TIMEOUT_S = 120
JOB_TIMEOUT_S = 60
FINISHED_OK = {"COMPLETED"}
FINISHED_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _cluster_kwargs(tmp_path: Path, queue: str = "debug") -> dict[str, Any]:
    """The SLURMCluster settings that work on the single-node test Slurm."""
    return dict(
        cores=1,
        processes=1,
        memory="1GB",
        queue=queue,
        walltime="00:10:00",
        # Scheduler and workers share the one host: loopback is always there.
        interface="lo",
        # None still binds the scheduler's HTTP server to 8787 (and warns when another
        # cluster on the machine holds it); ":0" takes a free port.
        scheduler_options={"dashboard_address": ":0"},
        local_directory=str(tmp_path),
        log_directory=str(tmp_path),
    )


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


def _job_state(job_id: str) -> str:
    """JobState from ``scontrol`` ("GONE" once Slurm forgot the job).

    The test Slurm keeps no accounting database, so ``sacct`` has nothing; ``scontrol``
    remembers a finished job for MinJobAge (300 s).
    """
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    match = re.search(r"\bJobState=(\S+)", proc.stdout)
    return match.group(1) if match else "GONE"


def _job_finished(job_id: str) -> bool:
    state = _job_state(job_id)
    if state in FINISHED_BAD:
        pytest.fail(f"Slurm job {job_id} ended {state}")
    return state in FINISHED_OK or state == "GONE"


def _job_ended(job_id: str) -> bool:
    return _job_state(job_id) not in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING"}


def test_job_script_renders_slurm_directives(tmp_path: Path) -> None:
    with SLURMCluster(**_cluster_kwargs(tmp_path)) as cluster:
        script = cluster.job_script()
    print(script)
    for directive in (
        "#SBATCH -J dask-worker",
        "#SBATCH -p debug",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=954M",
        "#SBATCH -t 00:10:00",
        f"#SBATCH -o {tmp_path}/dask-worker-%J.out",
        f"#SBATCH -e {tmp_path}/dask-worker-%J.err",
    ):
        assert directive in script.splitlines(), directive
    assert f"{sys.executable} -m distributed.cli.dask_worker tcp://127.0.0.1:" in script
    assert "--nthreads 1" in script
    assert "--interface lo" in script


@pytest.mark.slurm
def test_sbatch_wrap_job_completes(slurm_cluster: SlurmInfo, tmp_path: Path) -> None:
    out = tmp_path / "wrap.out"
    job_id = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            slurm_cluster.partition,
            "-o",
            str(out),
            "--wrap",
            'echo "job $SLURM_JOB_ID on $SLURMD_NODENAME"',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert job_id.isdigit(), job_id
    _wait_until(lambda: _job_finished(job_id), JOB_TIMEOUT_S, f"job {job_id} to complete")
    _wait_until(out.exists, 10, f"{out}")
    assert out.read_text().strip() == f"job {job_id} on {slurm_cluster.node}"


@pytest.mark.slurm
def test_slurm_cluster_workers_run_in_separate_jobs_and_are_replaced(
    slurm_cluster: SlurmInfo, tmp_path: Path
) -> None:
    def slurm_job_id() -> str | None:
        return os.environ.get("SLURM_JOB_ID")

    def square_in_job(x: int) -> tuple[str | None, int]:
        return os.environ.get("SLURM_JOB_ID"), x * x

    kwargs = _cluster_kwargs(tmp_path, queue=slurm_cluster.partition)
    # SpecCluster waits this long (default 15 s) before it treats a vanished worker's job as
    # lost and lets adapt() replace it.
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"}),
        SLURMCluster(**kwargs) as cluster,
        Client(cluster) as client,
    ):
        started = time.monotonic()
        cluster.scale(jobs=2)
        client.wait_for_workers(2, timeout=WORKER_TIMEOUT_S)
        print(f"\nscale(jobs=2) -> 2 workers connected: {time.monotonic() - started:.1f} s")

        submitted = {spec.job_id for spec in cluster.workers.values()}
        on_workers = client.run(slurm_job_id)
        assert set(on_workers.values()) == submitted and len(submitted) == 2, on_workers

        # Pin one task per worker so both jobs provably execute work.
        workers = sorted(on_workers)
        futures = [
            client.submit(square_in_job, x, workers=[workers[x % 2]], pure=False)
            for x in range(6)
        ]
        results = client.gather(futures)
        assert [value for _, value in results] == [x * x for x in range(6)]
        assert {job for job, _ in results} == submitted

        # Kill one job behind dask's back, as a walltime kill or preemption would. The
        # scheduler drops its worker at once; after lost-worker-timeout the cluster forgets
        # the job too, and adapt() (min = max = 2 jobs) submits a replacement on its own.
        cluster.adapt(minimum_jobs=2, maximum_jobs=2)
        victim = on_workers[workers[0]]
        subprocess.run(["scancel", victim], check=True, timeout=30)
        _wait_until(
            lambda: len(cluster.scheduler_info["workers"]) == 1,
            JOB_TIMEOUT_S,
            f"the scheduler to drop the worker of cancelled job {victim}",
        )
        _wait_until(lambda: _job_ended(victim), JOB_TIMEOUT_S, f"job {victim} to end")
        started = time.monotonic()
        _wait_until(
            lambda: victim not in {spec.job_id for spec in cluster.workers.values()},
            JOB_TIMEOUT_S,
            f"the cluster to forget cancelled job {victim}",
        )
        client.wait_for_workers(2, timeout=WORKER_TIMEOUT_S)
        print(f"cancelled job gone -> replacement connected: {time.monotonic() - started:.1f} s")
        replaced = set(client.run(slurm_job_id).values())
        assert victim not in replaced and len(replaced) == 2, replaced
        assert client.submit(lambda: 21 * 2, pure=False).result(timeout=30) == 42

        live = {spec.job_id for spec in cluster.workers.values()}
        assert live == replaced

    # Closing the cluster cancels its jobs.
    for job_id in live:
        _wait_until(lambda j=job_id: _job_ended(j), JOB_TIMEOUT_S, f"job {job_id} to end")


def _identity(address: str, **connection_args: Any) -> dict[str, Any]:
    """Open a comm to ``address`` and ask who is there: what any client does first."""

    async def ask() -> dict[str, Any]:
        comm = await connect(address, timeout=5, **connection_args)
        try:
            await comm.write({"op": "identity"})
            return await comm.read()
        finally:
            await comm.close()

    return asyncio.run(ask())


def _batch_script(job_id: str) -> str:
    """The script Slurm keeps for a job in its spool (what any admin or later ``scontrol`` reads)."""
    return subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True,
                          timeout=30, check=True).stdout


def _listening_on(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on ``port`` (from ``/proc/net/tcp``)."""
    hosts = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            hosts.add(".".join(str(b) for b in reversed(bytes.fromhex(host_hex))))
    return hosts


def test_redact_hides_pem_blocks() -> None:
    key = Security.temporary().tls_worker_key.strip()
    text = f"dask_worker --tls-key {key} --name w"
    assert redact(text) == "dask_worker --tls-key <private key redacted> --name w"


class _EndedJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def test_unstarted_jobs_are_replaced_but_start_failures_only_jobs_times_in_a_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The replacer's decisions, given what squeue said (the real-Slurm test covers the squeue side)."""
    cluster = SimpleNamespace(workers={}, worker_spec={})
    replacer = UnstartedJobReplacer(cluster, jobs=2)
    replacer.connected.add("w-7")  # job 7's worker did connect: dask's lost-worker path owns it
    ended = [("1", "CANCELLED (None)"), ("2", "FAILED (NonZeroExitCode)"), ("3", "FAILED (NonZeroExitCode)"),
             ("4", "FAILED (NonZeroExitCode)"), ("5", "CANCELLED (None)"), ("6", "FAILED (NonZeroExitCode)"),
             ("7", "CANCELLED (None)")]
    jobs = {job_id: _EndedJob(job_id) for job_id, _ in ended}

    async def forget_all() -> None:
        for job_id, why in ended:
            cluster.workers[f"w-{job_id}"] = jobs[job_id]
            cluster.worker_spec[f"w-{job_id}"] = {}
            replacer._forget(f"w-{job_id}", jobs[job_id], why)
        await asyncio.sleep(0)  # let the scheduled close() calls run

    with caplog.at_level(logging.WARNING, logger="ingest"):
        asyncio.run(forget_all())
    # Two start failures in a row are replaced (jobs=2), the third and later are not; a
    # cancelled job always is.
    assert replacer.replaced == ["1", "2", "3", "5"]
    assert sorted(cluster.workers) == ["w-4", "w-6", "w-7"]
    assert [jobs[j].closed for j in ("1", "2", "3", "4", "5")] == [True, True, True, False, True]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "worker job 4 ended FAILED" in errors[0], errors

    # A worker that connects starts the count again.
    replacer.add_worker(SimpleNamespace(workers={"tls://n:1": SimpleNamespace(name="w-8")}), "tls://n:1")
    ended[:] = [("9", "FAILED (NonZeroExitCode)")]
    jobs["9"] = _EndedJob("9")
    asyncio.run(forget_all())
    assert replacer.replaced[-1] == "9"


@pytest.mark.slurm
def test_ingest_cluster_speaks_tls_and_refuses_clients_without_the_run_credentials(
    slurm_cluster: SlurmInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cfg = IngestConfig(dicom_dir=tmp_path, out=out, cluster="slurm", jobs=1, worker_timeout=WORKER_TIMEOUT_S)
    config = {f"jobqueue.slurm.{key}": value for key, value in {
        "name": f"pneumo-t-{uuid.uuid4().hex[:8]}", "queue": slurm_cluster.partition, "cores": 1, "memory": "1GB",
        "walltime": "00:10:00", "interface": "lo", "local-directory": str(tmp_path / "local"),
        "log-directory": str(tmp_path / "logs")}.items()}
    other_run = Security.temporary()
    with (dask.config.set(config), caplog.at_level(logging.INFO, logger="ingest"),
          open_slurm_client(cfg) as client):
        scheduler = client.scheduler.address
        workers = client.scheduler_info()["workers"]
        assert scheduler.startswith("tls://") and workers and all(w.startswith("tls://") for w in workers), workers
        assert client.submit(lambda: 6 * 7, pure=False).result(timeout=30) == 42
        # Dashboard and the workers' HTTP servers: loopback only (README: reached through ssh).
        info = client.scheduler_info()
        http_ports = [info["services"]["dashboard"], *(w["services"]["dashboard"] for w in info["workers"].values())]
        assert [_listening_on(port) for port in http_ports] == [{"127.0.0.1"}] * len(http_ports)

        # The workers' copy of the credentials: one private folder on the shared filesystem.
        (folder,) = (out / ".ingest").glob("tls-*")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        files = sorted(folder.iterdir())
        assert len(files) == 3 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), files
        # What Slurm keeps of the job names those files and holds no key.
        (job_id,) = {str(spec.job_id) for spec in client.cluster.workers.values()}
        script = _batch_script(job_id)
        assert f"--tls-key {folder}/" in script and "PRIVATE KEY" not in script, script

        ca_only = ssl.create_default_context(cadata=client.security.tls_ca_file)
        ca_only.check_hostname = False
        outsiders = {
            "plain TCP": (scheduler.replace("tls://", "tcp://", 1), {}),
            "TLS trusting the run's CA, no client certificate": (scheduler, {"ssl_context": ca_only}),
            "TLS with another run's credentials": (scheduler, other_run.get_connection_args("client")),
            "a worker, with another run's credentials": (next(iter(workers)), other_run.get_connection_args("client")),
        }
        for who, (address, args) in outsiders.items():
            with pytest.raises(OSError):  # CommClosedError and its Fatal kind are OSErrors
                _identity(address, **args)
                pytest.fail(f"{who} got in")
        # The run's own credentials do get in: the refusals above are about credentials.
        assert _identity(scheduler, **client.security.get_connection_args("client"))["type"] == "Scheduler"

    logged = caplog.text
    assert f"scheduler {scheduler} (TLS" in logged and "--protocol tls://" in logged
    assert "PRIVATE KEY" not in logged
    assert "dashboard: http://localhost:" in logged and "ssh -L" in logged
    assert not folder.exists(), "the credentials folder is deleted when the run ends"
