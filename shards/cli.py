"""What every command-line entry point of the project shares: logging set-up."""

from __future__ import annotations

import logging

NOISY = ("distributed", "dask_jobqueue", "bokeh", "tornado", "matplotlib", "PIL")
"""Third-party loggers held at WARNING unless ``--verbose``."""


def configure_logging(verbose: bool = False, *, level: int = logging.INFO) -> None:
    """Configure the root logger once, for an entry point (library code never calls this).

    ``distributed`` installs its own handlers and levels when first imported, so it is
    imported here first and its loggers are quietened after it.
    """
    import distributed  # noqa: F401

    logging.basicConfig(
        level=logging.DEBUG if verbose else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
