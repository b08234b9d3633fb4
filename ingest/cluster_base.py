"""What both kinds of ingest cluster share: the error a driver exits 1 on, the dashboard, and
the workers' profiler setting.

``ingest.cluster`` (which cluster to start) and ``ingest.slurm`` (the Slurm one) both import
this module and not each other's, so the two stand in one direction: cluster -> slurm -> here.
"""

from __future__ import annotations

import logging
import os
import socket

from distributed import Client

log = logging.getLogger(__name__)

DASHBOARD_ENV = "PNEUMO_DASHBOARD"
DEFAULT_DASHBOARD = "127.0.0.1:8787"
"""Loopback only: on a shared node the dashboard is reached through an ssh tunnel, never from the network."""


PROFILE_ENV = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"
"""Dask's own switch for its statistical profiler in each worker (see :func:`worker_profiling_off`)."""


def worker_profiling_off() -> bool:
    """Whether the ingest turns off Dask's statistical profiler in its workers.

    It samples every worker's stacks every 10 ms for the dashboard's Profile page, and cost 7%
    of an ingest worker's CPU (images per CPU second of one worker, 4 paired runs: median 132
    with it, 142 without). Off unless the environment sets :data:`PROFILE_ENV` itself, for
    whoever wants that page back.
    """
    return PROFILE_ENV not in os.environ


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
