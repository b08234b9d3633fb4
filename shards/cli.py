"""What every command-line entry point of the project shares: logging set-up, the usage exit code."""

from __future__ import annotations

import logging

EXIT_USAGE = 2
"""Exit status of every entry point for a usage error (bad flags, missing or unusable input)."""

NOISY = ("distributed", "dask_jobqueue", "bokeh", "tornado", "matplotlib", "PIL", "ultralytics", "torch.distributed",
         "s3fs", "fsspec", "aiohttp")
"""Third-party loggers held at WARNING unless ``--verbose``."""


def configure_logging(
    verbose: bool = False, *, level: int = logging.INFO, rank: int | None = None, dask: bool = True
) -> None:
    """Configure the root logger once, for an entry point (library code never calls this).

    Args:
        verbose: DEBUG for the project and the third-party loggers in :data:`NOISY`.
        level: The level without ``verbose``.
        rank: A training rank: every line is prefixed ``[rankN]``, ranks other than 0 log
            WARNING and above only, and any root handlers set up before are replaced.
        dask: The entry point may use Dask. ``distributed`` installs its own handlers and
            levels when first imported, so it is imported here first and its loggers are
            quietened after it; entry points without Dask skip that import (about 0.7 s).
    """
    if dask:
        import distributed  # noqa: F401

    if verbose:
        level = logging.DEBUG
    if rank is not None and rank != 0:
        level = max(level, logging.WARNING)
    prefix = f"[rank{rank}] " if rank is not None else ""
    logging.basicConfig(
        level=level,
        format=prefix + "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=rank is not None,
    )
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else max(level, logging.WARNING))
