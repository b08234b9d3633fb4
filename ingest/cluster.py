"""The Dask cluster an ingest runs on: a LocalCluster here, or Slurm jobs via dask-jobqueue."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from ingest.cluster_base import ClusterError, dashboard_address, log_dashboard, worker_config
from ingest.config import IngestConfig

__all__ = ["ClusterError", "open_client"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while the local processes start, so that they inherit that: a Ctrl-C
    reaches the whole process group, and the driver alone answers it (it stops the cluster and
    says how to resume) instead of every worker printing its own KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def open_client(cfg: IngestConfig) -> Iterator[Client]:
    """Start the configured cluster, yield a connected client, and tear both down.

    Raises:
        ClusterError: ``--cluster slurm`` got no workers (see :func:`ingest.slurm.open_slurm_client`).
    """
    if cfg.cluster == "slurm":
        # Imported here: dask_jobqueue writes a config template into ~/.config/dask on first
        # import, which a local run has no business doing.
        from ingest.slurm import open_slurm_client

        with open_slurm_client(cfg) as client:
            yield client
        return
    workers = cfg.workers or os.cpu_count() or 1
    # The nannies hand this config to the worker processes they start.
    with dask.config.set(worker_config()), _sigint_ignored():
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard_address(),
            silence_logs=logging.WARNING,
        )
    try:
        with Client(cluster) as client:
            log.info("local Dask cluster: %d worker process(es)", workers)
            log_dashboard(client)
            yield client
    finally:
        cluster.close()
