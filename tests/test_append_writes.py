"""What an append reads and writes: nothing old but the manifest, the label store and the
source index is read; the files it writes keep the format's text byte for byte."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from shards.manifest import LABELS_NAME, MANIFEST_NAME, SHARDS_DIR, read_manifest
from shards.source_index import label_digest
from shards.versions import labels_rel, read_record, record_rel
from tests.inputs import copy_into

OPTIONS = {"size": 64, "shard_size": 4, "workers": 1, "val_fraction": 0.25}


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def appends(synth_small, tmp_path_factory):
    """16 files ingested, then 8 more appended to two copies: one intact, one whose shards
    were overwritten with zeros before the append."""
    from ingest.append import run_append
    from ingest.pipeline import run_ingest

    work = tmp_path_factory.mktemp("append-writes")
    files = sorted(synth_small.images_dir.glob("*.dcm"))
    parts = [copy_into(work / "old", files[:16]), copy_into(work / "new", files[16:])]
    base = work / "base"
    run_ingest(synth_small.ingest_config(base, dicom_dir=parts[0], **OPTIONS))
    intact, blind = work / "intact", work / "blind"
    for out in (intact, blind):
        shutil.copytree(base, out)
    for shard in (blind / SHARDS_DIR).iterdir():
        shard.write_bytes(bytes(shard.stat().st_size))
    for out in (intact, blind):
        summary = run_append(synth_small.ingest_config(out, dicom_dir=parts[1], append=True, **OPTIONS))
        assert summary.version == 2 and summary.shards_built > 0
    return base, intact, blind


def _without_created(path: Path) -> dict:
    data = json.loads(path.read_text())
    del data["created"]
    return data


def test_an_append_reads_no_old_shard(appends):
    base, intact, blind = appends
    old = {p.name for p in (base / SHARDS_DIR).iterdir()}
    new = {p.name for p in (intact / SHARDS_DIR).iterdir()} - old
    assert new
    for name in new:
        assert (blind / SHARDS_DIR / name).read_bytes() == (intact / SHARDS_DIR / name).read_bytes()
    for rel in (MANIFEST_NAME, "rejects.jsonl", "sources.json", "versions/v0002.sources.json"):
        assert (blind / rel).read_bytes() == (intact / rel).read_bytes(), rel
    assert _files(blind / LABELS_NAME) == _files(intact / LABELS_NAME)
    for version in (1, 2):
        assert _without_created(blind / record_rel(version)) == _without_created(intact / record_rel(version))


def test_the_old_label_store_keeps_its_bytes_and_the_latest_is_the_version_store(appends):
    base, intact, _ = appends
    assert _files(intact / labels_rel(1)) == _files(base / LABELS_NAME)
    assert _files(intact / LABELS_NAME) == _files(intact / labels_rel(2))


def test_the_manifest_records_and_index_keep_the_format_text(appends):
    _, intact, _ = appends
    manifest = read_manifest(intact)
    text = (intact / MANIFEST_NAME).read_text()
    assert text == json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True) + "\n"
    assert read_record(intact, 2).manifest_sha256 == hashlib.sha256(text.encode()).hexdigest()
    for version in (1, 2):
        path = intact / record_rel(version)
        data = json.loads(path.read_text())
        assert path.read_text() == json.dumps(data, indent=2, sort_keys=True) + "\n"
        record = read_record(intact, version)
        assert data["manifest_sha256"] == hashlib.sha256(record.manifest.to_json().encode()).hexdigest()
    for rel in ("sources.json", "versions/v0002.sources.json"):
        data = json.loads((intact / rel).read_text())
        assert (intact / rel).read_text() == json.dumps(data, indent=1, sort_keys=True) + "\n"


@pytest.mark.parametrize("target, class_name, boxes", [
    (0, "Normal", []),
    (0, "No Lung Opacity / Not Normal", ()),
    (0, None, []),
    (1, "Lung Opacity", [(264.0, 128.0, 132.0, 90.0)]),
    (1, "Lung Opacity", [[1, 2, 3, 4], [5.5, 6, 7, 8]]),
    (True, "Lung Opacity", [(1, 2, 3, 4)]),
])
def test_label_digest_is_the_sha256_of_the_label_as_json(target, class_name, boxes):
    text = json.dumps([int(target), class_name, [[float(v) for v in b] for b in boxes]])
    for _ in range(2):  # the second from the cache of labels without boxes
        assert label_digest(target, class_name, boxes) == hashlib.sha256(text.encode()).hexdigest()
