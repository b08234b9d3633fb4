"""Shared fixtures: small synthetic data sets made once per session, in temporary folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# ultralytics reads these at import: no network, no downloads, a writable settings folder.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-cfg-"))
os.environ.setdefault("PNEUMO_DASHBOARD", ":0")  # tests never fight over port 8787

pytest_plugins = ["tests.slurm_fixture"]


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory: pytest.TempPathFactory):
    """24 RSNA-like 128x128 DICOMs with labels (about 5 positives)."""
    from ingest.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth") / "rsna", 24, seed=0, size=128, progress=False)


@pytest.fixture(scope="session")
def ingested_small(synth_small, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth_small`` ingested at 64 px into 4-sample shards (2 local workers)."""
    from ingest.config import IngestConfig
    from ingest.pipeline import run_ingest

    out = tmp_path_factory.mktemp("ingested") / "ds"
    cfg = IngestConfig(
        dicom_dir=synth_small.images_dir, out=out, labels=synth_small.labels_csv,
        class_info=synth_small.class_info_csv, size=64, shard_size=4, workers=2,
        val_fraction=0.25, progress=False,
    )
    run_ingest(cfg)
    return out
