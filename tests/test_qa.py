"""Image QA flags: each rule, the inverted-image heuristic on real radiographs, the format
(JSON list, zarr bitmask, datasets of earlier versions read as unflagged) and verify."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ingest import qa
from ingest.dicom import decode_dicom
from ingest.synth import synthetic_chest, write_dicom
from shards.format import FORMAT_VERSION, META_FIELDS_BY_VERSION
from shards.labels import LabelRow, LabelTable, read_labels, write_labels
from shards.manifest import read_manifest
from shards.qa import QA_FLAGS, QA_RULES, parse_qa_flags, qa_mask, qa_names
from shards.reader import iter_samples
from shards.scan import check_meta
from shards.verify import VerifyConfig, verify

# --------------------------------------------------------------------------- the names and bits


def test_every_flag_has_a_rule_and_a_bit() -> None:
    assert set(QA_RULES) == set(QA_FLAGS)
    assert len(QA_FLAGS) <= 16  # QA_DTYPE is uint16
    assert qa_mask(QA_FLAGS) == 2 ** len(QA_FLAGS) - 1
    for i, flag in enumerate(QA_FLAGS):
        assert qa_mask([flag]) == 1 << i and qa_names(1 << i) == [flag]


@pytest.mark.parametrize(("text", "flags"), [
    ("", ()),
    ("lateral", ("lateral",)),
    ("inverted_suspect, blank,lateral", ("blank", "lateral", "inverted_suspect")),
    ("blank,blank", ("blank",)),
])
def test_parse_qa_flags(text: str, flags: tuple[str, ...]) -> None:
    assert parse_qa_flags(text) == flags


def test_unknown_flag_names_itself_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown QA flag\(s\) 'sideways'; allowed: blank, lateral"):
        parse_qa_flags("lateral,sideways")


# --------------------------------------------------------------------------- the pixel rules

RNG = np.random.default_rng(0)
SPREAD = RNG.integers(0, 256, (64, 64), dtype=np.uint8)


MARKED = np.full((64, 64), 30, np.uint8)
MARKED[10:13, 10:13] = 255  # a marker of 9 pixels: under the 0.5% left out at each end


def _levels(values: list[int], shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Pixels drawn evenly from ``values``, in no pattern the histogram's subsampling could meet."""
    return RNG.choice(np.array(values, dtype=np.uint8), shape)


# (id, image, blank, low_dynamic_range)
PIXEL_CASES = [
    ("uniform-noise", SPREAD, False, False),
    ("constant", np.full((64, 64), 77, np.uint8), True, True),
    ("black", np.zeros((64, 64), np.uint8), True, True),
    ("constant-with-a-white-marker", MARKED, True, True),
    ("seven-levels", _levels([100, 101, 102, 103, 104, 105, 106]), True, True),
    ("eight-levels-spread", _levels([0, 30, 60, 90, 120, 150, 180, 210]), False, True),
    ("twenty-levels", _levels(list(range(20, 220, 10))), False, False),
    ("saturated-halves-and-a-ramp", np.hstack([np.zeros((64, 24), np.uint8), np.full((64, 24), 255, np.uint8),
                                               _levels(list(range(1, 255)), (64, 16))]), False, False),
    ("only-saturated", _levels([0, 255]), False, True),
]


@pytest.mark.parametrize(("image", "blank", "low"), [c[1:] for c in PIXEL_CASES], ids=[c[0] for c in PIXEL_CASES])
def test_pixel_rules(image: np.ndarray, blank: bool, low: bool) -> None:
    hist = qa.histogram(image)
    assert qa.is_blank(hist) == blank
    assert qa.is_low_dynamic_range(hist) == low


@pytest.mark.parametrize(("rows", "cols", "small"), [(512, 512, False), (511, 2048, True), (2048, 500, True), (64, 64, True)])
def test_small_source(rows: int, cols: int, small: bool) -> None:
    assert qa.is_small(rows, cols) == small


# --------------------------------------------------------------------------- the header rules

def _chest(tmp_path: Path, name: str = "chest", size: int = 640, **tags: str) -> bytes:
    """A synthetic RSNA-like JPEG Baseline chest (BodyPartExamined CHEST, PA) with ``tags`` set
    (an empty value deletes the tag)."""
    path = write_dicom(tmp_path / f"{name}.dcm", synthetic_chest(size, seed=1)[0], patient_id=name)
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value:
            setattr(ds, keyword, value)
        elif keyword in ds:
            delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# (id, tags, flags)
HEADER_CASES = [
    ("rsna-like", {}, []),
    ("lateral-LL", {"ViewPosition": "LL"}, ["lateral"]),
    ("lateral-RL", {"ViewPosition": "RL"}, ["lateral"]),
    ("lateral-word", {"ViewPosition": "LATERAL"}, ["lateral"]),
    ("ap", {"ViewPosition": "AP"}, []),
    ("no-view", {"ViewPosition": ""}, []),
    ("abdomen", {"BodyPartExamined": "ABDOMEN"}, ["not_chest"]),
    ("no-body-part", {"BodyPartExamined": ""}, []),
    ("burned-in", {"BurnedInAnnotation": "YES"}, ["burned_in_annotation"]),
    ("not-burned-in", {"BurnedInAnnotation": "NO"}, []),
    ("all-three", {"ViewPosition": "LL", "BodyPartExamined": "SKULL", "BurnedInAnnotation": "YES"},
     ["lateral", "not_chest", "burned_in_annotation"]),
]


@pytest.mark.parametrize(("tags", "flags"), [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_header_flags_on_the_fast_path(tmp_path: Path, tags: dict[str, str], flags: list[str]) -> None:
    decoded = decode_dicom(_chest(tmp_path, **tags), fit=640)
    assert decoded.fast_path
    assert qa.qa_flags(decoded) == flags


def test_header_flags_on_the_general_path(tmp_path: Path) -> None:
    data = _chest(tmp_path, ViewPosition="RL", BodyPartExamined="HAND", BurnedInAnnotation="YES",
                  WindowCenter="128", WindowWidth="256")
    decoded = decode_dicom(data)
    assert not decoded.fast_path
    assert qa.qa_flags(decoded) == ["lateral", "not_chest", "burned_in_annotation"]


def test_small_synthetic_chest_is_small_source(tmp_path: Path) -> None:
    assert qa.qa_flags(decode_dicom(_chest(tmp_path, size=256))) == ["small_source"]


# --------------------------------------------------------------------------- inverted, on real radiographs

data_store = pytest.importorskip("data_store", reason="pydicom-data (a dev dependency) holds the real radiographs")
REAL = Path(data_store.__file__).parent / "data"
MONOCHROME1_RADIOGRAPHS = ("RG1_UNCI", "RG1_UNCR", "RG1_J2KI", "RG1_J2KR", "RG3_UNCI", "RG3_UNCR", "RG3_J2KI", "RG3_J2KR")
"""pydicom-data's CR files (RG1: a chest PA; RG3: a leg AP), all MONOCHROME1, correctly labelled."""


def _relabelled(name: str) -> bytes:
    ds = pydicom.dcmread(REAL / f"{name}.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_inverted_suspect_on_real_radiographs() -> None:
    """The counts the heuristic reaches: every relabelled file flagged, no correct one."""
    def flagged(data: bytes) -> bool:
        return "inverted_suspect" in qa.qa_flags(decode_dicom(data))

    correct = [flagged((REAL / f"{n}.dcm").read_bytes()) for n in MONOCHROME1_RADIOGRAPHS]
    relabelled = [flagged(_relabelled(n)) for n in MONOCHROME1_RADIOGRAPHS]
    assert (sum(relabelled), sum(correct)) == (len(MONOCHROME1_RADIOGRAPHS), 0)


def test_the_real_chest_has_no_other_flag() -> None:
    assert qa.qa_flags(decode_dicom((REAL / "RG1_UNCI.dcm").read_bytes())) == []
    assert qa.qa_flags(decode_dicom(_relabelled("RG1_UNCI"))) == ["inverted_suspect"]


# --------------------------------------------------------------------------- the format


def test_flags_in_json_and_zarr_agree(ingested_small: Path) -> None:
    m = read_manifest(ingested_small)
    assert m.format_version == FORMAT_VERSION >= 3
    labels = read_labels(ingested_small / "labels.zarr")
    index = labels.index()
    seen = 0
    for info in m.shards:
        for s in iter_samples(ingested_small / "shards" / info.name, decode=False):
            assert s.meta["qa"] == ["small_source"]  # the fixture's images are 128 px
            assert qa_names(labels.qa[index[s.key]]) == s.meta["qa"]
            seen += 1
    assert seen == len(labels) and labels.qa.dtype == np.uint16


def _as_version(src: Path, dst: Path, version: int) -> Path:
    """``src`` rewritten as a dataset of format ``version`` (1 or 2): no qa in any JSON or in
    labels.zarr, and the per-sample checksums (version 2) of the rewritten shards."""
    from shards.manifest import MANIFEST_NAME, sha256_file
    from shards.writer import ShardWriter

    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    for info in manifest["shards"]:
        path = dst / "shards" / info["name"]
        samples = list(iter_samples(src / "shards" / info["name"]))
        path.unlink()
        with ShardWriter(path) as writer:
            for s in samples:
                writer.write(s.key, s.image, {k: v for k, v in s.meta.items() if k != "qa"})
        info["bytes"], info["sha256"] = path.stat().st_size, sha256_file(path)
        info.pop("xxh3", None)
        if version == 2:
            info["xxh3"] = [list(pair) for pair in writer.result.xxh3]
    manifest["format_version"] = version
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dst / "labels.zarr" / "qa")
    return dst


@pytest.mark.parametrize("version", [1, 2])
def test_an_earlier_version_reads_as_unflagged_and_verifies(ingested_small: Path, tmp_path: Path, version: int) -> None:
    old = _as_version(ingested_small, tmp_path / f"v{version}", version)
    labels = read_labels(old / "labels.zarr")
    assert not labels.qa.any() and len(labels.qa) == len(labels)
    assert read_manifest(old).format_version == version
    report = verify(VerifyConfig(out=old, deep=True, workers=1))
    assert report.ok, [p.to_json() for p in report.problems]
    from train.data import read_split

    info = read_split(old, "train", exclude_qa=qa_mask(QA_FLAGS))
    assert info.excluded == 0 and info.samples == read_split(old, "train").samples


def test_a_newer_format_version_is_refused_in_one_line(ingested_small: Path, tmp_path: Path) -> None:
    from shards.format import FormatError

    data = json.loads((ingested_small / "manifest.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=rf"format_version {FORMAT_VERSION + 1}: this reader reads versions 1 to {FORMAT_VERSION}"):
        read_manifest(tmp_path)


META = {"key": "k", "patient_id": "k", "source": {"path": "k.dcm", "sha256": "0" * 64}, "split": "train",
        "target": 0, "class": "Normal", "boxes": [], "view_position": "PA", "sex": "M", "age": 40,
        "transform": {"scale": 0.5, "pad_x": 0, "pad_y": 0, "rows": 128, "cols": 128, "size": 64}}

# (id, qa field (None: absent), format version, problem found)
META_CASES = [
    ("v3-flags", ["lateral", "small_source"], 3, None),
    ("v3-none", [], 3, None),
    ("v3-missing", None, 3, "meta_fields"),
    ("v3-unknown", ["sideways"], 3, "meta_value"),
    ("v3-out-of-order", ["small_source", "lateral"], 3, "meta_value"),
    ("v3-repeated", ["blank", "blank"], 3, "meta_value"),
    ("v3-not-a-list", "blank", 3, "meta_value"),
    ("v2-absent", None, 2, None),
    ("v1-absent", None, 1, None),
    ("v2-extra", [], 2, "meta_fields"),
]


@pytest.mark.parametrize(("flags", "version", "problem"), [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES])
def test_verify_checks_the_qa_field(flags, version: int, problem: str | None) -> None:
    meta = dict(META) if flags is None else {**META, "qa": flags}
    found = [check for check, _, _ in check_meta(meta, "k", 64, version)]
    assert found == ([problem] if problem else [])
    assert set(META_FIELDS_BY_VERSION[version]) == set(META) | ({"qa"} if version == 3 else set())


def test_verify_finds_zarr_and_json_flags_that_disagree(ingested_small: Path, tmp_path: Path) -> None:
    data = tmp_path / "ds"
    shutil.copytree(ingested_small, data)
    table = read_labels(data / "labels.zarr")
    table.qa[3] |= qa_mask(["lateral"])
    write_labels(data / "labels.zarr", table)
    report = verify(VerifyConfig(out=data, deep=True, workers=1))
    assert [p.check for p in report.problems] == ["labels_mismatch"]
    assert "qa" in report.problems[0].what


def test_label_table_without_qa_is_unflagged() -> None:
    rows = [LabelRow.from_meta({"key": "a", "patient_id": "a", "split": "train", "target": 0, "class": "Normal",
                                "view_position": "PA", "sex": "M", "age": 3, "boxes": []}, 0)]
    assert LabelTable.from_rows(rows).qa.tolist() == [0]
