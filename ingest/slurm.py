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
   dask never hears of; :class:`UnstartedJobReplacer` finds it with ``squeue`` and has adapt
   replace it the same way.
5. On exit (also on SIGTERM, as ``scancel`` or the walltime sends to a driver job) the
   cluster is closed, which cancels the worker jobs, and the credentials folder is deleted.
"""

from __future__ import annotations

import asyncio
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
from distributed import Client, Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.security import Security

from ingest.cluster_base import ClusterError, dashboard_address, env_name, log_dashboard, worker_config
from ingest.config import IngestConfig
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
POLL_S = 2.0
JOB_POLL_S = 5.0
"""Seconds between the ``squeue`` calls that look for worker jobs which ended before their worker connected."""
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
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


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from ``squeue --states=all``; jobs Slurm forgot are left out."""
    return _squeue(job_ids) or {}


def _squeue(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """As :func:`job_states`, but None when ``squeue`` could not answer (then no job counts as gone)."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(
            ["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}", "--format=%i|%T|%r"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("squeue failed: %s", exc)
        return None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # asked about one job only, and Slurm forgot it
            return {}
        log.debug("squeue failed: %s", proc.stderr.strip())
        return None
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


class UnstartedJobReplacer(SchedulerPlugin):
    """Has adapt replace worker jobs that ended before their worker connected.

    dask replaces a job when the scheduler sees its worker vanish; a job cancelled while still
    ``PENDING`` (or failing before its worker starts) never had a worker, stays in the
    cluster's plan, and would hold its place forever. This plugin records the name of every
    worker that connects (it runs inside the scheduler, in this process); a thread asks
    ``squeue`` every :data:`JOB_POLL_S` seconds about the cluster's jobs, and for a job that
    has ended without a worker drops it from ``cluster.workers``, as dask does for a lost
    worker, so adapt submits its replacement on its next tick.

    Jobs that fail at start are replaced at most ``jobs`` times in a row (until a worker
    connects), so a broken node or venv does not turn into a submission loop; jobs that were
    cancelled are always replaced.
    """

    name = "pneumo-unstarted-job-replacer"

    def __init__(self, cluster: Any, jobs: int, poll_s: float = JOB_POLL_S) -> None:
        self.cluster = cluster
        self.jobs = jobs
        self.poll_s = poll_s
        self.connected: set[str] = set()
        self.start_failures = 0
        self.replaced: list[str] = []
        """Job ids replaced so far, in order."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.connected.add(str(scheduler.workers[worker].name))
        self.start_failures = 0

    def _worker_names(self, name: str) -> set[str]:
        """The names the workers of job ``name`` register under (``name-0``... with processes > 1)."""
        spec = self.cluster.worker_spec.get(name, {})
        return {f"{name}{suffix}" for suffix in spec.get("group", [""])}

    def _ever_connected(self, name: str) -> bool:
        return bool(self._worker_names(name) & self.connected)

    def check(self) -> None:
        """One look at Slurm: schedule the replacement of every ended job that never had a worker."""
        jobs = {name: job for name, job in list(self.cluster.workers.items()) if getattr(job, "job_id", None)}
        states = _squeue(sorted({str(job.job_id) for job in jobs.values()}))
        if states is None:
            return
        for name, job in jobs.items():
            state, reason = states.get(str(job.job_id), ("GONE", "no longer known to Slurm"))
            if state in ACTIVE_STATES or self._ever_connected(name):
                continue  # still queued or running, or dask's lost-worker path replaces it
            tail = None if state == "CANCELLED" else _stderr_tail(str(job.job_id))
            detail = f"; {tail}" if tail else ""
            self.cluster.loop.add_callback(self._forget, name, job, f"{state} ({reason}){detail}")

    def _forget(self, name: str, job: Any, why: str) -> None:
        """On the cluster's event loop: drop ``job`` so that adapt submits a new one in its place."""
        if self.cluster.workers.get(name) is not job or self._ever_connected(name):
            return
        if not why.startswith("CANCELLED"):
            self.start_failures += 1
            if self.start_failures > self.jobs:
                if self.start_failures == self.jobs + 1:
                    log.error("worker job %s ended %s before its worker connected; %d jobs in a row did, "
                              "so no more are submitted until a worker connects: check the job log",
                              job.job_id, why, self.start_failures)
                return
        del self.cluster.workers[name]
        self.replaced.append(str(job.job_id))
        asyncio.ensure_future(job.close())  # scancel of an ended job; errors are suppressed there
        log.warning("worker job %s ended %s before its worker connected; submitting a replacement", job.job_id, why)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # never let a failed look end the watching; the next one may work
                log.debug("checking worker jobs failed", exc_info=True)

    @contextlib.contextmanager
    def watching(self) -> Iterator[UnstartedJobReplacer]:
        """Run :meth:`check` every ``poll_s`` seconds on a daemon thread until the block ends."""
        self._thread = threading.Thread(target=self._run, name="pneumo-job-watch", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=60)


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
        log.info("first worker connected after %.1f s; jobs %s", waited, " ".join(_job_ids(cluster)))
        # Keep K jobs: a cancelled, failed or timed-out job is resubmitted.
        cluster.adapt(minimum_jobs=cfg.jobs, maximum_jobs=cfg.jobs)
        with replacer.watching():
            try:
                yield client
            finally:
                log.info("SLURMCluster: done %.1f s after submitting; cancelling worker jobs %s",
                         time.monotonic() - t0, " ".join(_job_ids(cluster)))
