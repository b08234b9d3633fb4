"""Pseudonymized ingests (``--pseudonymize KEYFILE``) and the PHI audit of a dataset folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from ingest.__main__ import main as ingest_main
from ingest.config import IngestConfig
from ingest.pipeline import IngestUsageError, run_ingest
from shards.__main__ import main as shards_main
from shards.manifest import read_manifest
from shards.privacy import DROPPED, RECORDED
from shards.pseudonym import HEX_CHARS, KeyFileError, Pseudonymizer, load_key
from shards.reader import iter_samples
from tests.dicom_factory import write_mono

KEY = b"a secret the hospital keeps, 41 bytes long"
N = 6


def _key(path: Path, data: bytes = KEY, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- key files


@pytest.mark.parametrize(
    ("data", "mode", "expect"),
    [
        (None, 0o600, "no such key file"),
        (b"", 0o600, "the key file is empty"),
        (b" \n", 0o600, "the key file is empty"),
        (b"short", 0o600, "the key is 5 bytes; use at least 16"),
        (KEY, 0o640, "open to group or others (mode 640); run chmod 600"),
        (KEY, 0o604, "open to group or others (mode 604)"),
    ],
    ids=["missing", "empty", "whitespace", "short", "group-readable", "world-readable"],
)
def test_unusable_key_file_is_a_usage_error(tmp_path: Path, capsys, data: bytes | None, mode: int, expect: str) -> None:
    key = tmp_path / "key"
    if data is not None:
        _key(key, data, mode)
    with pytest.raises(KeyFileError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        load_key(key)
    (tmp_path / "dicoms").mkdir()
    write_mono(tmp_path / "dicoms", "p1")
    code = ingest_main(["--dicom-dir", str(tmp_path / "dicoms"), "--out", str(tmp_path / "out"),
                        "--pseudonymize", str(key), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before any work


def test_pseudonyms_are_keyed_truncated_and_apart_per_domain() -> None:
    a, b = Pseudonymizer(KEY), Pseudonymizer(KEY + b"!")
    assert a.patient("p1") == Pseudonymizer(KEY).patient("p1")  # the same key, the same dataset
    assert a.patient("p1") != b.patient("p1") and a.fingerprint != b.fingerprint
    assert len(a.patient("p1")) == HEX_CHARS and int(a.patient("p1"), 16) >= 0
    assert a.path("p1") != a.patient("p1") + ".dcm"  # a path and an id of the same text differ
    assert a.path("x/p1.dcm").endswith(".dcm") and a.file("/data").startswith("hmac:")
    assert a.fingerprint_files([("p1.dcm", 10)]) != a.fingerprint_files([("p1.dcm", 11)])


# --------------------------------------------------------------------------- the PHI audit


def _markers(i: int) -> dict[str, str]:
    """A marker per identifying field of sample ``i``: no marker is a substring of another."""
    return {
        "patient_id_tag": f"ZQPID{i}Q",
        "file_name": f"ZQFILE{i}Q",
        "folder": f"ZQDIR{i}Q",
        "PatientName": f"ZQNAME{i}Q",
        "PatientBirthDate": f"19{30 + i:02d}0517",
        "InstitutionName": f"ZQINST{i}Q",
        "AccessionNumber": f"ZQACC{i}Q",
        "ReferringPhysicianName": f"ZQREF{i}Q",
        "StudyDate": f"20{10 + i:02d}0823",
    }


ROOT_MARKERS = {"dicom_dir": "ZQROOTQ", "labels_path": "ZQLABELSQ"}


def _hospital_export(root: Path, by: str) -> tuple[Path, Path]:
    """N DICOMs whose identifying fields (and folders) carry markers, and a labels CSV keyed by
    the id that ``--patient-id by`` finds."""
    dicoms = root / ROOT_MARKERS["dicom_dir"]
    rows = ["patientId,x,y,width,height,Target"]
    for i in range(N):
        m = _markers(i)
        attrs = {k: m[k] for k in DROPPED} | {"PatientID": m["patient_id_tag"]}
        path = write_mono(dicoms / m["folder"], m["file_name"], rows=64, cols=64, attributes=attrs)
        assert path.name == f"{m['file_name']}.dcm"
        pid = m["patient_id_tag"] if by == "tag" else m["file_name"]
        rows.append(f"{pid},8,8,20,20,1" if i == 0 else f"{pid},,,,,0")
    labels = root / f"{ROOT_MARKERS['labels_path']}.csv"
    labels.write_text("\n".join(rows) + "\n")
    return dicoms, labels


def _dataset_bytes(out: Path) -> dict[str, bytes]:
    """Every byte under ``out`` that leaves the ingest: zarr chunks decoded, ``rejects.jsonl``
    and ``.ingest/`` (operator-facing) left out."""
    found: dict[str, bytes] = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and rel != "rejects.jsonl" and not rel.startswith(".ingest/"):
            found[rel] = path.read_bytes()
    group = zarr.open_group(out / "labels.zarr", mode="r")
    for name, arr in group.arrays():
        values = np.asarray(arr[:])
        found[f"labels.zarr/{name} (decoded)"] = (
            "\n".join(map(str, values.tolist())).encode() if values.dtype.kind in "OUT" else values.tobytes()
        )
    return found


def _hits(out: Path, markers: dict[str, str]) -> dict[str, list[str]]:
    """Where each field's marker occurs under ``out``, by field."""
    data = _dataset_bytes(out)
    hits: dict[str, list[str]] = {}
    for field, marker in markers.items():
        where = [rel for rel, b in data.items() if marker.encode() in b]
        if where:
            hits[field] = where
    return hits


@pytest.mark.parametrize("by", ["name", "tag"])
@pytest.mark.parametrize("pseudonymize", [False, True], ids=["plain", "pseudonymized"])
def test_phi_audit(tmp_path: Path, by: str, pseudonymize: bool) -> None:
    dicoms, labels = _hospital_export(tmp_path, by)
    out = tmp_path / "out"
    cfg = IngestConfig(dicom_dir=dicoms, out=out, labels=labels, size=64, shard_size=2, workers=1, val_fraction=0.34,
                       progress=False, patient_id=by, pseudonymize=_key(tmp_path / "key") if pseudonymize else None)
    summary = run_ingest(cfg)
    assert summary.counts["samples"] == N and summary.counts["positives"] == 1

    markers = {f"{field} #{i}": m for i in range(N) for field, m in _markers(i).items()}
    markers |= ROOT_MARKERS
    hits = {field.split(" #")[0] for field in _hits(out, markers)}
    if pseudonymize:
        assert hits == set()
    else:
        recorded = {"file_name", "folder", "dicom_dir", "labels_path"} | ({"patient_id_tag"} if by == "tag" else set())
        assert hits == recorded and hits <= set(RECORDED)
    # the operator's file still names every path
    rejects = (out / "rejects.jsonl").read_text()
    assert by == "tag" or "ZQPID0Q" in rejects  # patient_id_mismatch: the tag differs from the file name


def test_pseudonymized_dataset_keeps_its_labels_split_and_keys(tmp_path: Path) -> None:
    dicoms, labels = _hospital_export(tmp_path, "name")
    key = _key(tmp_path / "key")
    out = tmp_path / "out"
    run_ingest(IngestConfig(dicom_dir=dicoms, out=out, labels=labels, size=64, shard_size=2, workers=1,
                            val_fraction=0.34, progress=False, pseudonymize=key))
    p = Pseudonymizer(KEY)
    expected = {p.patient(_markers(i)["file_name"]): (1 if i == 0 else 0) for i in range(N)}
    metas = [s.meta for shard in sorted((out / "shards").glob("*.tar")) for s in iter_samples(shard, decode=False)]
    assert {m["patient_id"]: m["target"] for m in metas} == expected  # labels matched before hashing
    assert all(m["key"] == m["patient_id"] for m in metas)
    paths = {p.path(f"{_markers(i)['folder']}/{_markers(i)['file_name']}.dcm") for i in range(N)}
    assert {m["source"]["path"] for m in metas} == paths
    source = read_manifest(out).source
    assert source["pseudonym"] == {"scheme": f"hmac-sha256/{HEX_CHARS}", "key_fingerprint": p.fingerprint}
    assert source["dicom_dir"] == p.file(dicoms) and source["labels"] == p.file(labels)

    # verify reconciles through the key, and says in one line what it leaves out without it
    common = [str(out), "--deep", "--source", str(dicoms), "--labels", str(labels), "--workers", "1", "--no-progress"]
    assert shards_main(["verify", *common, "--pseudonymize", str(key)]) == 0
    assert shards_main(["verify", *common]) == 0
    other = _key(tmp_path / "other", KEY + b"2")
    assert shards_main(["verify", *common, "--pseudonymize", str(other)]) == 2


def test_verify_without_the_key_notes_what_it_left_out(tmp_path: Path, capsys) -> None:
    dicoms, labels = _hospital_export(tmp_path, "name")
    out = tmp_path / "out"
    run_ingest(IngestConfig(dicom_dir=dicoms, out=out, labels=labels, size=64, shard_size=2, workers=1,
                            progress=False, pseudonymize=_key(tmp_path / "key")))
    os.remove(next((dicoms / _markers(1)["folder"]).iterdir()))  # found only by the source check
    capsys.readouterr()
    args = ["verify", str(out), "--source", str(dicoms), "--labels", str(labels), "--workers", "1", "--no-progress"]
    assert shards_main(args) == 0
    printed = capsys.readouterr().out
    assert "note: the dataset is pseudonymized: --source and --labels need its --pseudonymize KEYFILE" in printed
    assert shards_main([*args, "--pseudonymize", str(tmp_path / "key")]) == 1
    assert "source_missing" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("first", "second", "expect"),
    [
        ("key", "other", "pseudonymized with another key"),
        ("key", None, "give the same --pseudonymize KEYFILE"),
        (None, "key", "made without --pseudonymize"),
    ],
    ids=["another-key", "key-dropped", "key-added"],
)
def test_a_run_with_another_key_is_refused(tmp_path: Path, first: str | None, second: str | None, expect: str) -> None:
    dicoms, labels = _hospital_export(tmp_path, "name")
    keys = {"key": _key(tmp_path / "key"), "other": _key(tmp_path / "other", KEY + b"2"), None: None}
    cfg = dict(dicom_dir=dicoms, out=tmp_path / "out", labels=labels, size=64, shard_size=2, workers=1, progress=False)
    run_ingest(IngestConfig(**cfg, pseudonymize=keys[first]))
    with pytest.raises(IngestUsageError, match=expect):
        run_ingest(IngestConfig(**cfg, pseudonymize=keys[second]))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())  # untouched
