"""What both kinds of ingest cluster share: the error a driver exits 1 on, the dashboard, and
the workers' Dask settings.

``ingest.cluster`` (which cluster to start) and ``ingest.slurm`` (the Slurm one) both import
this module and not each other's, so the two stand in one direction: cluster -> slurm -> here.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from distributed import Client

log = logging.getLogger(__name__)

DASHBOARD_ENV = "PNEUMO_DASHBOARD"
DEFAULT_DASHBOARD = "127.0.0.1:8787"
"""Loopback only: on a shared node the dashboard is reached through an ssh tunnel, never from the network."""


QUIET_WORKERS: dict[str, Any] = {
    # Dask's statistical profiler samples every worker's stacks every 10 ms for the dashboard's
    # Profile page: 7% of an ingest worker's CPU (images per CPU second of one worker, 4 paired
    # runs: median 132 with it, 142 without).
    "distributed.worker.profile.enabled": False,
    # The worker's event loop wakes every 20 ms to check that it is not blocked, every 100 ms
    # to measure its own memory, and every 500 ms for the dashboard's system plots: together
    # 21-24 ms of CPU per second in an idle worker, 3.5-3.8 ms with these.
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}
"""Dask settings of the ingest's workers: what a worker does beside its tasks, for the
dashboard, made rarer or turned off. Each applies unless the environment sets it (see
:func:`worker_config`)."""


def env_name(key: str) -> str:
    """The environment variable through which Dask reads config ``key``."""
    return "DASK_" + key.upper().replace(".", "__").replace("-", "_")


def worker_config() -> dict[str, Any]:
    """The :data:`QUIET_WORKERS` settings to give the workers: all but those the environment
    sets itself (``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=True`` brings the Profile page
    back)."""
    return {k: v for k, v in QUIET_WORKERS.items() if env_name(k) not in os.environ}


class ClusterError(RuntimeError):
    """The cluster could not be started or got no workers in time."""


def dashboard_address() -> str:
    """Where the scheduler's dashboard listens: ``$PNEUMO_DASHBOARD`` or :data:`DEFAULT_DASHBOARD`.

    A value without a host (``:8787``, ``:0`` for any free port) binds to loopback as well;
    only an explicit host (``0.0.0.0:8787``) opens it to the network.
    """
    value = os.environ.get(DASHBOARD_ENV, "").strip() or DEFAULT_DASHBOARD
    return f"127.0.0.1{value}" if value.startswith(":") else value


def log_dashboard(client: Client) -> None:
    """Log the dashboard's URL and, when it listens on loopback only, the ssh tunnel that reaches it."""
    port = client.scheduler_info().get("services", {}).get("dashboard")
    if port is None:
        log.info("dashboard: off")
        return
    host = dashboard_address().rsplit(":", 1)[0]
    if host in {"127.0.0.1", "localhost", "::1", "[::1]"}:
        node = socket.gethostname()
        log.info("dashboard: http://localhost:%s/status on %s only (loopback); from your machine: "
                 "ssh -L %s:127.0.0.1:%s %s (add -J <login node> if %s is not directly reachable), "
                 "then open http://localhost:%s/status", port, node, port, port, node, node, port)
    else:
        log.info("dashboard: http://%s:%s/status (listening on %s, not loopback only)", host, port, host)
