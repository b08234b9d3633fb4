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
2. make TLS credentials for this run (``Security.temporary()``: one self-signed key and
   certificate, in memory), start the scheduler in this process on ``tls://`` and submit
   ``K`` jobs (``scale(jobs=K)``). dask-jobqueue writes the workers' copy of the credentials
   into a private folder on the shared filesystem (:func:`credentials_dir`) and the job script
   names those files (``--tls-ca-file``/``--tls-cert``/``--tls-key``), never their contents;
   a client without them is refused by the scheduler and by every worker. The dashboard
   listens on loopback only (:func:`~ingest.cluster_base.dashboard_address`);
3. wait, at most ``worker_timeout`` seconds, for the first worker; when none comes, raise
   :class:`~ingest.cluster_base.ClusterError` naming each job's state and reason (``PENDING
   (Priority)``, ``FAILED`` + the last line of its log) -- at once if every job has ended;
4. ``adapt(minimum_jobs=K, maximum_jobs=K)``: a worker job that is cancelled, fails or
   hits its walltime is replaced ``lost-worker-timeout`` after its worker vanished (dask's
   default is 15 s; :data:`LOST_WORKER_TIMEOUT` unless the config sets another value).
   Its in-flight shard goes back to the queue (the pipeline writes every shard under a
   temporary name, so a half-written shard never counts). Workers leave on their own
   shortly before the walltime (``--lifetime``, see :func:`lifetime_args`). A job that ends
   before its worker ever connected (cancelled while ``PENDING``, failed at start) is one
   dask never hears of; :class:`~ingest.slurm_jobs.UnstartedJobReplacer` finds it with ``squeue`` and has adapt
   replace it the same way.
5. On exit (also on SIGTERM, as ``scancel`` or the walltime sends to a driver job) the
   cluster is closed, which cancels the worker jobs, and the credentials folder is deleted.
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
from distributed.security import Security

from ingest.cluster_base import ClusterError, dashboard_address, env_name, log_dashboard, worker_config
from ingest.config import IngestConfig
from ingest.slurm_jobs import UnstartedJobReplacer, job_ids_of, wait_for_first_worker
from ingest.workdir import work_dir

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
PLACEHOLDER_SCHEDULER = "tls://SCHEDULER-ADDRESS:PORT"
"""Stands for the scheduler's address in a ``--dry-run`` script (known once the driver runs)."""
WORKER_HTTP_ADDRESS = "127.0.0.1:0"
"""Where each worker's HTTP server listens: loopback of its node, any free port."""
CREDENTIALS_PREFIX = "tls-"
PLACEHOLDER_CREDENTIALS = f"{CREDENTIALS_PREFIX}XXXXXXXX"
"""Stands for the run's credentials folder in a ``--dry-run`` script (made when the driver runs)."""
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


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
    if "--dashboard-address" not in map(str, extra):
        # Each worker serves HTTP (metrics, health), by default on every interface of its node.
        extra += ["--dashboard-address", WORKER_HTTP_ADDRESS]
    kw["worker_extra_args"] = extra
    if quiet := worker_config():  # the worker jobs read their config from their environment
        kw["job_script_prologue"] = [*(_conf("job-script-prologue") or []),
                                     *(f"export {env_name(k)}={v}" for k, v in quiet.items())]
    return kw


def job_script(cfg: IngestConfig, scheduler: str = PLACEHOLDER_SCHEDULER) -> str:
    """The worker job script this run submits (``--dry-run`` prints it); starts nothing.

    Args:
        cfg: The run's config (``jobs`` does not show: each job runs the same script).
        scheduler: Address the workers connect to; a placeholder before the driver runs.
    """
    log_dir = _conf("log-directory")
    created = _missing_parents(Path(log_dir)) if log_dir else []
    folder = credentials_base(cfg) / PLACEHOLDER_CREDENTIALS
    security = Security(  # the worker's part only: file names, as dask-jobqueue writes them
        require_encryption=True,
        tls_ca_file=str(folder / ".dask-jobqueue.worker.ca_file.XXXXXXXX"),
        tls_worker_cert=str(folder / ".dask-jobqueue.worker.cert.XXXXXXXX"),
        tls_worker_key=str(folder / ".dask-jobqueue.worker.key.XXXXXXXX"),
    )
    try:
        job = SLURMJob(scheduler=scheduler, name="dry-run", protocol="tls://", security=security, **cluster_kwargs(cfg))
        return redact(job.job_script())
    finally:
        for path in created:  # SLURMJob makes the log folder; a dry run leaves no trace
            with contextlib.suppress(OSError):
                path.rmdir()


def redact(text: str) -> str:
    """``text`` with every PEM block (private key, certificate) replaced by ``<... redacted>``.

    The job scripts name credential *files*; this keeps a key that reached a script by another
    route (a config that passes key material inline) out of logs and ``--dry-run`` output.
    """
    return _PEM_BLOCK.sub(lambda m: f"<{m.group(1).lower()} redacted>", text)


def credentials_base(cfg: IngestConfig) -> Path:
    """The shared folder in which each run makes its private credentials folder.

    ``jobqueue.slurm.shared-temp-directory`` when the config sets one, else ``OUT/.ingest``:
    the worker jobs already read and write ``OUT``, so it is on a filesystem they share.
    """
    configured = _conf("shared-temp-directory")
    if configured:
        return Path(os.path.expandvars(os.path.expanduser(str(configured))))
    return work_dir(cfg.out)


def credentials_dir(cfg: IngestConfig) -> Path:
    """Make this run's credentials folder (mode 0700, under :func:`credentials_base`)."""
    base = credentials_base(cfg)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=CREDENTIALS_PREFIX, dir=base))


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
    """Start a SLURMCluster with ``cfg.jobs`` worker jobs kept running, over TLS; yield a client.

    Raises:
        ClusterError: Slurm rejects the job, the scheduler cannot start (bad interface), or
            no worker arrives within ``cfg.worker_timeout`` seconds.
    """
    kwargs = cluster_kwargs(cfg)
    preflight(job_script(cfg))
    options = dict(_conf("scheduler-options") or {})
    options.setdefault("dashboard_address", dashboard_address())
    overrides = {}
    if str(dask.config.get(LOST_WORKER_KEY)) == _DASK_DEFAULT_LOST_WORKER_TIMEOUT:
        overrides[LOST_WORKER_KEY] = LOST_WORKER_TIMEOUT
    credentials = credentials_dir(cfg)
    try:
        with dask.config.set(overrides), _cancel_jobs_on_sigterm():
            try:
                cluster = SLURMCluster(scheduler_options=options, security=Security.temporary(),
                                       shared_temp_directory=str(credentials), **kwargs)
            except (RuntimeError, ValueError, OSError) as exc:
                raise ClusterError(f"the Dask scheduler for --cluster slurm did not start: {exc}") from exc
            try:
                yield from _run_cluster(cluster, cfg, credentials)
            finally:
                cluster.close()
    finally:
        shutil.rmtree(credentials, ignore_errors=True)


def _run_cluster(cluster: Any, cfg: IngestConfig, credentials: Path) -> Iterator[Client]:
    """Submit the jobs, wait for the first worker, keep ``cfg.jobs`` jobs, and yield a client."""
    replacer = UnstartedJobReplacer(cluster, cfg.jobs)
    # A plain dict insert, safe from this thread; done before any job exists, so no worker goes unseen.
    cluster.scheduler.add_plugin(replacer)
    log.info("Slurm worker job script (one per job):\n%s", redact(cluster.job_script()))
    with Client(cluster) as client:
        t0 = time.monotonic()
        cluster.scale(jobs=cfg.jobs)
        log.info("SLURMCluster: %d worker job(s) submitted; scheduler %s (TLS with credentials made for this "
                 "run, in %s until it ends)", cfg.jobs, cluster.scheduler_address, credentials)
        log_dashboard(client)
        waited = wait_for_first_worker(client, cluster, cfg.jobs, cfg.worker_timeout)
        log.info("first worker connected after %.1f s; jobs %s", waited, " ".join(job_ids_of(cluster)))
        # Keep K jobs: a cancelled, failed or timed-out job is resubmitted.
        cluster.adapt(minimum_jobs=cfg.jobs, maximum_jobs=cfg.jobs)
        with replacer.watching():
            try:
                yield client
            finally:
                log.info("SLURMCluster: done %.1f s after submitting; cancelling worker jobs %s",
                         time.monotonic() - t0, " ".join(job_ids_of(cluster)))
