"""Ingest workers as Slurm jobs through dask-jobqueue's ``SLURMCluster``.

Cluster settings follow dask's own convention: the ``jobqueue.slurm`` section of the dask
config (``~/.config/dask/jobqueue.yaml``, ``$DASK_CONFIG``, or ``DASK_JOBQUEUE__SLURM__*``
environment variables) gives queue, account, cores, memory, processes, walltime, interface,
job_extra_directives, job_script_prologue, local_directory and log_directory. The CLI flags
``--queue``, ``--account`` and ``--walltime`` override it; ``--jobs K`` is the number of
worker jobs kept running. Where the config leaves them unset, a worker job gets
:data:`DEFAULT_CORES` core(s), one single-threaded worker process per core (the ingest's
unit of parallelism, as on a LocalCluster) and :data:`DEFAULT_GB_PER_PROCESS` GB per process.

Life of a run (:func:`open_slurm_client`):

1. render the worker job script, log it, and ask Slurm whether it would accept it
   (``sbatch --test-only``): a wrong partition, account, memory or walltime fails here,
   in a second, with Slurm's own words;
2. start the scheduler in this process and submit ``K`` jobs (``scale(jobs=K)``);
3. wait, at most ``worker_timeout`` seconds, for the first worker; when none comes, raise
   :class:`~ingest.cluster.ClusterError` naming each job's state and reason (``PENDING
   (Priority)``, ``FAILED`` + the last line of its log) -- at once if every job has ended;
4. ``adapt(minimum_jobs=K, maximum_jobs=K)``: a worker job that is cancelled, fails or
   hits its walltime is replaced ``lost-worker-timeout`` after its worker vanished (dask's
   default is 15 s; :data:`LOST_WORKER_TIMEOUT` unless the config sets another value).
   Its in-flight shard goes back to the queue (the pipeline writes every shard under a
   temporary name, so a half-written shard never counts). Workers leave on their own
   shortly before the walltime (``--lifetime``, see :func:`lifetime_args`).
5. On exit (also on SIGTERM, as ``scancel`` or the walltime sends to a driver job) the
   cluster is closed, which cancels the worker jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask

# Importing dask_jobqueue registers the jobqueue.* config defaults that _conf() reads.
from dask_jobqueue import SLURMCluster
from dask_jobqueue.slurm import SLURMJob
from distributed import Client

from ingest.cluster import ClusterError
from ingest.config import IngestConfig

log = logging.getLogger(__name__)

SECTION = "jobqueue.slurm"
DEFAULT_CORES = 1
"""Cores per worker job when ``jobqueue.slurm.cores`` is unset."""
DEFAULT_GB_PER_PROCESS = 2
"""Memory per worker process when ``jobqueue.slurm.memory`` is unset (peak RSS is ~0.3 GB)."""
LOST_WORKER_KEY = "distributed.deploy.lost-worker-timeout"
LOST_WORKER_TIMEOUT = "5s"
"""Used instead of dask's default 15 s: how long a vanished worker's job is kept before adapt replaces it."""
_DASK_DEFAULT_LOST_WORKER_TIMEOUT = "15s"
PLACEHOLDER_SCHEDULER = "tcp://SCHEDULER-ADDRESS:PORT"
"""Stands for the scheduler's address in a ``--dry-run`` script (known once the driver runs)."""
POLL_S = 2.0
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"})


def _conf(key: str, default: Any = None) -> Any:
    return dask.config.get(f"{SECTION}.{key}", default)


def walltime_seconds(walltime: str) -> int | None:
    """Seconds in a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``); None if unparsable."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", walltime.strip())
    if not m:
        return None
    days, a, b, c = m.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if c is not None:  # HH:MM:SS
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60  # MM


def lifetime_args(walltime: str | None) -> list[str]:
    """``dask-worker`` flags that retire a worker before Slurm kills its job at the walltime.

    The worker leaves ``margin`` (a tenth of the walltime, clamped to 1..10 minutes) early,
    +- half a margin so that jobs started together do not all leave at once; adapt then
    submits its replacement. Empty when the walltime is unknown or under 5 minutes.
    """
    seconds = walltime_seconds(walltime) if walltime else None
    if seconds is None or seconds < 300:
        return []
    margin = min(600, max(60, seconds // 10))
    return ["--lifetime", f"{seconds - margin}s", "--lifetime-stagger", f"{margin // 2}s"]


def cluster_kwargs(cfg: IngestConfig) -> dict[str, Any]:
    """Keyword arguments of ``SLURMCluster`` / ``SLURMJob`` for this run.

    Only what the dask config leaves unset or the CLI overrides is passed; everything else
    (interface, job_extra_directives, job_script_prologue, local/log directory, ...) comes
    from ``jobqueue.slurm`` through dask-jobqueue itself.
    """
    kw: dict[str, Any] = {}
    cores = _conf("cores")
    if cores is None:
        cores = kw["cores"] = DEFAULT_CORES
    processes = _conf("processes")
    if processes is None:
        processes = kw["processes"] = int(cores)  # one single-threaded worker per core
    if _conf("memory") is None:
        kw["memory"] = f"{DEFAULT_GB_PER_PROCESS * int(processes)}GB"
    for name in ("queue", "account", "walltime"):
        value = getattr(cfg, name)
        if value:
            kw[name] = value
    walltime = kw.get("walltime") or _conf("walltime")
    extra = list(_conf("worker-extra-args") or [])
    if not any(a.startswith("--lifetime") for a in map(str, extra)):
        extra += lifetime_args(walltime)
    kw["worker_extra_args"] = extra
    return kw


def job_script(cfg: IngestConfig, scheduler: str = PLACEHOLDER_SCHEDULER) -> str:
    """The worker job script this run submits (``--dry-run`` prints it); starts nothing.

    Args:
        cfg: The run's config (``jobs`` does not show: each job runs the same script).
        scheduler: Address the workers connect to; a placeholder before the driver runs.
    """
    log_dir = _conf("log-directory")
    created = _missing_parents(Path(log_dir)) if log_dir else []
    try:
        return SLURMJob(scheduler=scheduler, name="dry-run", **cluster_kwargs(cfg)).job_script()
    finally:
        for path in created:  # SLURMJob makes the log folder; a dry run leaves no trace
            with contextlib.suppress(OSError):
                path.rmdir()


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    out = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        out.append(p)
    return out


def preflight(script: str) -> None:
    """Ask Slurm whether it would accept ``script`` (``sbatch --test-only``); submits nothing.

    Raises:
        ClusterError: ``sbatch`` missing or the job rejected (bad partition, account,
            memory, cores, walltime, directive), with Slurm's message.
    """
    if shutil.which("sbatch") is None:
        raise ClusterError("--cluster slurm: sbatch is not on PATH; run the driver on a Slurm login or compute node")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="pneumo-worker-") as f:
        f.write(script)
        f.flush()
        proc = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = "; ".join(lines[-2:]) or f"exit {proc.returncode}"
        raise ClusterError(
            f"Slurm rejects the worker job ({detail}); check queue, account, cores, memory and walltime in "
            f"the dask config's jobqueue.slurm section or --queue/--account/--walltime (see --dry-run)"
        )
    log.debug("sbatch --test-only: %s", proc.stderr.strip())


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from ``squeue --states=all``; jobs Slurm forgot are left out."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(
            ["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}", "--format=%i|%T|%r"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("squeue failed: %s", exc)
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def _stderr_tail(job_id: str) -> str | None:
    """Last non-empty line of a job's stderr file (from ``scontrol show job``), if readable."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30, check=False)
        fields = dict(re.findall(r"\b(StdErr|JobName|UserId)=(\S+)", proc.stdout))
        if "StdErr" not in fields:
            return None
        path = expand_filename_pattern(fields["StdErr"], job_id, fields.get("JobName", ""), fields.get("UserId", ""))
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"{path}: {lines[-1][:300]}" if lines else f"{path} is empty"


def expand_filename_pattern(pattern: str, job_id: str, job_name: str = "", user_id: str = "") -> str:
    """Fill in the ``%j``/``%J``/``%x``/``%u``/``%%`` of an sbatch ``-o``/``-e`` pattern (scontrol shows them raw)."""
    user = user_id.split("(")[0]
    table = {"j": job_id, "J": job_id, "x": job_name, "u": user, "%": "%"}

    def fill(m: re.Match[str]) -> str:
        value = table[m.group(2)]
        return value.zfill(int(m.group(1))) if m.group(1) and m.group(2) in "jJ" else value

    return re.sub(r"%(\d*)([jJxu%])", fill, pattern)


def describe_jobs(job_ids: list[str], submitted: int, scheduler: str) -> str:
    """One line on why the jobs gave no worker: each job's state, reason and last log line."""
    states = job_states(job_ids)
    parts = []
    for job_id in job_ids:
        state, reason = states.get(job_id, ("GONE", "no longer known to Slurm"))
        text = f"job {job_id} {state} ({reason})"
        if state == "RUNNING":
            text += f": running but its worker has not reached the scheduler at {scheduler}; check jobqueue.slurm.interface"
        elif state not in ACTIVE_STATES:
            tail = _stderr_tail(job_id)
            text += f"; {tail}" if tail else ""
        parts.append(text)
    if len(job_ids) < submitted:
        parts.append(f"{submitted - len(job_ids)} job(s) got no job id from sbatch (see its error above)")
    return "; ".join(parts)


def _job_ids(cluster: Any) -> list[str]:
    return sorted({str(job.job_id) for job in list(cluster.workers.values()) if getattr(job, "job_id", None)})


def wait_for_first_worker(client: Client, cluster: Any, jobs: int, timeout_s: float) -> float:
    """Block until one worker is connected; return the seconds it took.

    Raises:
        ClusterError: ``timeout_s`` passed, or every submitted job ended, without a worker.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        try:
            client.wait_for_workers(1, timeout=max(0.1, min(POLL_S, deadline - time.monotonic())))
            return time.monotonic() - t0
        except TimeoutError:
            pass
        ids = _job_ids(cluster)
        states = job_states(ids)
        ended = len(ids) == jobs and states and all(states.get(j, ("GONE", ""))[0] not in ACTIVE_STATES for j in ids)
        if ended or time.monotonic() >= deadline:
            why = "every worker job ended" if ended else f"none within {timeout_s:g} s (--worker-timeout)"
            raise ClusterError(f"no Dask worker connected: {why}: {describe_jobs(ids, jobs, cluster.scheduler_address)}")


@contextlib.contextmanager
def _cancel_jobs_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (scancel, walltime of a driver job) into SystemExit so the cluster closes
    and cancels its worker jobs instead of leaving them to time out on their own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def open_slurm_client(cfg: IngestConfig) -> Iterator[Client]:
    """Start a SLURMCluster with ``cfg.jobs`` worker jobs kept running; yield a client.

    Raises:
        ClusterError: Slurm rejects the job, the scheduler cannot start (bad interface), or
            no worker arrives within ``cfg.worker_timeout`` seconds.
    """
    kwargs = cluster_kwargs(cfg)
    preflight(job_script(cfg))
    options = dict(_conf("scheduler-options") or {})
    options.setdefault("dashboard_address", os.environ.get("PNEUMO_DASHBOARD", ":8787"))
    overrides = {}
    if str(dask.config.get(LOST_WORKER_KEY)) == _DASK_DEFAULT_LOST_WORKER_TIMEOUT:
        overrides[LOST_WORKER_KEY] = LOST_WORKER_TIMEOUT
    with dask.config.set(overrides), _cancel_jobs_on_sigterm():
        try:
            cluster = SLURMCluster(scheduler_options=options, **kwargs)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ClusterError(f"the Dask scheduler for --cluster slurm did not start: {exc}") from exc
        try:
            log.info("Slurm worker job script (one per job):\n%s", cluster.job_script())
            with Client(cluster) as client:
                t0 = time.monotonic()
                cluster.scale(jobs=cfg.jobs)
                log.info("SLURMCluster: %d worker job(s) submitted; scheduler %s; dashboard %s",
                         cfg.jobs, cluster.scheduler_address, client.dashboard_link)
                waited = wait_for_first_worker(client, cluster, cfg.jobs, cfg.worker_timeout)
                log.info("first worker connected after %.1f s; jobs %s", waited, " ".join(_job_ids(cluster)))
                # Keep K jobs: a cancelled, failed or timed-out job is resubmitted.
                cluster.adapt(minimum_jobs=cfg.jobs, maximum_jobs=cfg.jobs)
                try:
                    yield client
                finally:
                    log.info("SLURMCluster: done %.1f s after submitting; cancelling worker jobs %s",
                             time.monotonic() - t0, " ".join(_job_ids(cluster)))
        finally:
            cluster.close()
