"""The Dask cluster an ingest runs on: a LocalCluster here, or Slurm jobs via dask-jobqueue."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from ingest.config import IngestConfig

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The cluster could not be started or got no workers in time."""


@contextlib.contextmanager
def open_client(cfg: IngestConfig) -> Iterator[Client]:
    """Start the configured cluster, yield a connected client, and tear both down."""
    if cfg.cluster == "slurm":
        from ingest.slurm import open_slurm_client

        with open_slurm_client(cfg) as client:
            yield client
        return
    workers = cfg.workers or os.cpu_count() or 1
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=os.environ.get("PNEUMO_DASHBOARD", ":8787"),
        silence_logs=logging.WARNING,
    )
    try:
        with Client(cluster) as client:
            log.info("local Dask cluster: %d worker process(es); dashboard %s", workers, client.dashboard_link)
            yield client
    finally:
        cluster.close()
