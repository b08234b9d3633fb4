"""Watching the worker jobs of a ``--cluster slurm`` run: their states (``squeue``), why none
gave a worker (:func:`describe_jobs`), waiting for the first one, and the replacement of jobs
that ended before their worker connected (:class:`UnstartedJobReplacer`).

The jobs themselves (their script, credentials and life cycle) are :mod:`ingest.slurm`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import Client, Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin

from ingest.cluster_base import ClusterError

log = logging.getLogger(__name__)

POLL_S = 2.0
"""Seconds between the checks while waiting for the first worker."""
JOB_POLL_S = 5.0
"""Seconds between the ``squeue`` calls that look for worker jobs which ended before their worker connected."""
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"})


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


def job_ids_of(cluster: Any) -> list[str]:
    """The Slurm job ids of the cluster's worker jobs that have one."""
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
        ids = job_ids_of(cluster)
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
