"""Ingest workers as Slurm jobs through dask-jobqueue's SLURMCluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed import Client

from ingest.config import IngestConfig


def job_script(cfg: IngestConfig) -> str:
    raise NotImplementedError("--cluster slurm is not yet supported")


@contextlib.contextmanager
def open_slurm_client(cfg: IngestConfig) -> Iterator[Client]:
    raise NotImplementedError("--cluster slurm is not yet supported")
    yield  # pragma: no cover
