"""Tests of ingest.synth: the synthetic RSNA-like data set and its DICOM writer."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid as dicom_uid

from ingest.synth import (
    CR_SOP_CLASS_UID,
    TRANSFER_SYNTAXES,
    SynthConfig,
    SynthSummary,
    main,
    make_dataset,
    make_ingested,
    synthetic_chest,
    write_dicom,
)
from shards.format import CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]
PID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NUM = r"(\d+\.\d)"
POSITIVE_ROW = re.compile(rf"({PID.pattern}),{NUM},{NUM},{NUM},{NUM},1")
NEGATIVE_ROW = re.compile(rf"({PID.pattern}),,,,,0")


@pytest.fixture(scope="module")
def ds200(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    """200 images at 64 px: the class-balance and per-file checks share it."""
    return make_dataset(tmp_path_factory.mktemp("synth200"), 200, seed=3, size=64)


def _all_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", 12, seed=7, size=64)
    b = make_dataset(tmp_path / "b", 12, seed=7, size=64)
    c = make_dataset(tmp_path / "c", 12, seed=8, size=64)
    files_a, files_b = _all_bytes(a.out), _all_bytes(b.out)
    assert len(files_a) == 12 + 2
    assert files_a == files_b
    assert {r.patient_id for r in a.records}.isdisjoint(r.patient_id for r in c.records)


def test_labels_csv_is_rsna_format(ds200: SynthSummary) -> None:
    lines = ds200.labels_csv.read_text().splitlines()
    assert lines[0] == "patientId,x,y,width,height,Target"
    rows_per_patient: dict[str, list[tuple[float, ...]]] = {}
    for line in lines[1:]:
        if m := POSITIVE_ROW.fullmatch(line):
            x, y, w, h = (float(v) for v in m.groups()[1:])
            assert x >= 0 and y >= 0 and w >= 2 and h >= 2
            assert x + w <= ds200.size and y + h <= ds200.size
            rows_per_patient.setdefault(m.group(1), []).append((x, y, w, h))
        else:
            m = NEGATIVE_ROW.fullmatch(line)
            assert m, f"not an RSNA labels row: {line!r}"
            assert m.group(1) not in rows_per_patient, "a negative has exactly one row"
            rows_per_patient[m.group(1)] = []
    assert len(rows_per_patient) == 200
    stems = {p.stem for p in ds200.images_dir.glob("*.dcm")}
    assert stems == set(rows_per_patient)
    for rec in ds200.records:
        assert tuple(rows_per_patient[rec.patient_id]) == rec.boxes
        assert 1 <= len(rec.boxes) <= 4 if rec.target else not rec.boxes


def test_class_info_csv_matches_labels(ds200: SynthSummary) -> None:
    with ds200.labels_csv.open(newline="") as f:
        labels = list(csv.DictReader(f))
    with ds200.class_info_csv.open(newline="") as f:
        classes = list(csv.DictReader(f))
    assert ds200.class_info_csv.read_text().splitlines()[0] == "patientId,class"
    assert [r["patientId"] for r in classes] == [r["patientId"] for r in labels]
    for lab, cls in zip(labels, classes):
        assert cls["class"] in CLASS_NAMES
        assert (cls["class"] == "Lung Opacity") == (lab["Target"] == "1")


def test_class_balance_is_rsna_like(ds200: SynthSummary) -> None:
    counts = ds200.class_counts
    assert sum(counts.values()) == ds200.n_images == 200
    assert 0.18 <= ds200.n_positive / 200 <= 0.26
    negatives = 200 - ds200.n_positive
    assert 0.45 <= counts["No Lung Opacity / Not Normal"] / negatives <= 0.65
    assert ds200.n_boxes > ds200.n_positive  # many positives have two boxes
    views = [r.view_position for r in ds200.records]
    assert {"PA", "AP"} == set(views)
    assert {"M", "F"} == {r.sex for r in ds200.records}


def test_every_file_is_an_rsna_like_dicom(ds200: SynthSummary) -> None:
    for rec in ds200.records:
        raw = rec.path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(rec.path)
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == dicom_uid.JPEGBaseline8Bit
        assert meta.MediaStorageSOPClassUID == CR_SOP_CLASS_UID == ds.SOPClassUID
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CR"
        assert ds.PatientID == rec.patient_id == rec.path.stem
        assert ds.ViewPosition == rec.view_position in ("PA", "AP")
        assert ds.PatientSex == rec.sex in ("M", "F")
        assert ds["PatientAge"].value == rec.age and rec.age.isdigit()  # RSNA's '43', not '043Y'
        assert 1 <= int(rec.age) <= 92
        assert (ds.Rows, ds.Columns) == (64, 64)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (1, 8, 8, 7)
        assert ds.PixelRepresentation == 0
        pixels = ds.pixel_array
        assert pixels.shape == (64, 64) and pixels.dtype == np.uint8


def _lung_mask(size: int, lungs: tuple, shrink: float = 0.85) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    mask = np.zeros((size, size), dtype=bool)
    for cx, cy, a, b in lungs:
        mask |= ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 < shrink**2
    return mask


def _dataset_for_size(tmp_path: Path, size: int) -> SynthSummary:
    return make_dataset(tmp_path / f"s{size}", 30, seed=11, size=size, positive_fraction=0.5)


@pytest.mark.parametrize("size", [64, 256])
def test_opacities_are_brighter_than_the_lung(tmp_path: Path, size: int) -> None:
    summary = _dataset_for_size(tmp_path, size)
    positives = [r for r in summary.records if r.target]
    assert positives
    for rec in positives:
        img = pydicom.dcmread(rec.path).pixel_array.astype(np.float64)
        lung = _lung_mask(size, rec.lungs)
        for x, y, w, h in rec.boxes:
            lung[int(y) : int(y + h), int(x) : int(x + w)] = False
        lung_mean = img[lung].mean()
        for x, y, w, h in rec.boxes:
            # The central half of the box, where the blob is within one sigma of its peak.
            core = img[int(y + h / 4) : int(y + 3 * h / 4), int(x + w / 4) : int(x + 3 * w / 4)]
            assert core.mean() > lung_mean + 20, (rec.patient_id, (x, y, w, h))


def test_lungs_are_darker_than_the_body(tmp_path: Path) -> None:
    image, boxes = synthetic_chest(128, seed=2)
    assert boxes == []
    # Mid-height band: lungs sit either side of the spine, body outside them.
    band = image[50:70].astype(np.float64)
    assert band[:, 30:40].mean() + 40 < band[:, 60:68].mean()  # lung vs spine
    assert image[:8, :8].mean() < 40  # dark background corner


def test_full_size_matches_rsna_scale(tmp_path: Path) -> None:
    summary = make_dataset(tmp_path, 6, seed=0, size=1024, positive_fraction=0.5)
    for rec in summary.records:
        assert 60_000 < rec.path.stat().st_size < 400_000  # RSNA: about 140 KB
        for _, _, w, h in rec.boxes:
            assert 100 <= w <= 420 and 100 <= h <= 420


@pytest.mark.parametrize("transfer_syntax", sorted(TRANSFER_SYNTAXES))
def test_write_dicom_round_trips(tmp_path: Path, transfer_syntax: str) -> None:
    if transfer_syntax == "jpegls_lossless":
        from pydicom.pixels.encoders import JPEGLSLosslessEncoder

        if not JPEGLSLosslessEncoder.is_available:
            pytest.skip("no JPEG-LS encoder (pyjpegls)")
    pixels, _ = synthetic_chest(64, seed=5)
    pixels = np.ascontiguousarray(pixels[:48])  # non-square
    path = write_dicom(
        tmp_path / "x.dcm", pixels, patient_id="p1", view_position="AP", sex="F", age="7",
        transfer_syntax=transfer_syntax,
    )
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[transfer_syntax]
    assert (ds.Rows, ds.Columns, ds.ViewPosition, ds.PatientSex) == (48, 64, "AP", "F")
    decoded = ds.pixel_array.astype(np.int16)
    if transfer_syntax == "jpeg_baseline":
        assert np.abs(decoded - pixels).mean() < 3.0
    else:
        np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"pixels": np.zeros((4, 4), np.uint16)}, "pixels"),
        ({"pixels": np.zeros((4, 4, 3), np.uint8)}, "pixels"),
        ({"view_position": "LL"}, "view_position='LL'"),
        ({"sex": "X"}, "sex='X'"),
        ({"transfer_syntax": "jpeg_xl"}, "transfer_syntax='jpeg_xl'"),
        ({"quality": 0}, "quality=0"),
    ],
)
def test_write_dicom_rejects_bad_values(tmp_path: Path, kwargs: dict, bad: str) -> None:
    args = {"pixels": np.zeros((4, 4), np.uint8), "patient_id": "p"} | kwargs
    pixels = args.pop("pixels")
    with pytest.raises(ValueError, match=re.escape(bad)):
        write_dicom(tmp_path / "x.dcm", pixels, **args)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"n": 0}, "n=0"),
        ({"n": 1, "size": 16}, "size=16"),
        ({"n": 1, "positive_fraction": 1.5}, "positive_fraction=1.5"),
        ({"n": 1, "quality": 101}, "quality=101"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(bad)):
        SynthConfig(**kwargs)


def test_cli_writes_a_dataset(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "ingest.synth", "--out", str(out), "--n", "5", "--size", "64",
         "--seed", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "wrote 5 images" in proc.stderr
    assert len(list((out / "images").glob("*.dcm"))) == 5
    assert len((out / "stage_2_detailed_class_info.csv").read_text().splitlines()) >= 6


def test_main_returns_2_on_bad_value(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--n", "0", "--quiet"]) == 2


@pytest.mark.parametrize(("options", "expected"), [
    ({}, {"labels": "csv", "class_info": "csv", "progress": False, "size": 640}),
    ({"size": 32, "shard_size": 3}, {"size": 32, "shard_size": 3, "labels": "csv"}),
    ({"labels": None, "class_info": None, "progress": True}, {"labels": None, "class_info": None, "progress": True}),
], ids=["defaults", "ingest-fields", "overrides"])
def test_ingest_config_names_the_sets_files(ds200: SynthSummary, tmp_path: Path, options: dict, expected: dict) -> None:
    cfg = ds200.ingest_config(tmp_path / "ds", **options)
    files = {"labels": ds200.labels_csv, "class_info": ds200.class_info_csv}
    assert cfg.dicom_dir == ds200.images_dir and cfg.out == tmp_path / "ds"
    for name, value in expected.items():
        assert getattr(cfg, name) == (files[name] if value == "csv" else value), name


def test_make_ingested_ingests_every_image_with_its_labels(tmp_path: Path) -> None:
    from shards.labels import read_labels
    from shards.manifest import read_manifest

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "left-over").write_text("from an earlier run")  # a fresh folder each time
    made = make_ingested(tmp_path, 6, seed=2, src_size=64, positive_fraction=0.5, size=32, shard_size=4, workers=1)
    assert made.out == tmp_path / "ds" and made.synth.images_dir == tmp_path / "rsna" / "images"
    assert not (made.out / "left-over").exists()
    manifest = read_manifest(made.out)
    assert manifest.counts["samples"] == 6 and manifest.params["size"] == 32
    assert [s.samples for s in manifest.shards if s.split == "train"][0] <= 4
    labels = read_labels(made.out / "labels.zarr")
    by_pid = {r.patient_id: r for r in made.synth.records}
    assert sorted(labels.patient_id) == sorted(by_pid)
    for pid, target, class_id in zip(labels.patient_id, labels.target, labels.class_id):
        assert target == by_pid[pid].target
        assert CLASS_NAMES[class_id] == by_pid[pid].class_name  # the class info was read too
