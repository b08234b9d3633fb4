"""The header-only fast path reads exactly what pydicom reads, and steps aside for anything else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ingest.config import DEFAULT_MAX_PIXELS
from ingest.dicom import _decode_parsed, _read_raw, decode_dicom
from tests import dicom_factory as df

FAST_CASES = {"jpeg_baseline", "uid_named", "rsna_like"}


@pytest.mark.parametrize("case", df.CASES, ids=lambda c: c.name)
def test_read_raw_agrees_with_pydicom_or_steps_aside(tmp_path: Path, case: df.FactoryCase) -> None:
    data = case.write(tmp_path).read_bytes()
    fast = _read_raw(data)
    assert (fast is not None) == (case.name in FAST_CASES)
    if fast is None:
        return
    ours, theirs = decode_dicom(data), _decode_parsed(data, DEFAULT_MAX_PIXELS, None)
    assert ours.fast_path and theirs.fast_path
    np.testing.assert_array_equal(ours.pixels, theirs.pixels)
    fields = ("rows", "cols", "patient_id", "view_position", "sex", "age", "transfer_syntax")
    assert [getattr(ours, f) for f in fields] == [getattr(theirs, f) for f in fields]


def _rewrite(path: Path, edit) -> bytes:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)
    return path.read_bytes()


def test_undefined_length_sequence_before_the_pixels_is_walked(tmp_path: Path) -> None:
    path = df.make_rsna_like(tmp_path / "seq.dcm", "seq", rows=64, cols=48)
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "123", "chest"
    data = _rewrite(path, lambda ds: setattr(ds, "AnatomicRegionSequence", Sequence([item])))
    ds = pydicom.dcmread(path)
    ds["AnatomicRegionSequence"].is_undefined_length = True
    ds.save_as(path)
    data = path.read_bytes()
    assert b"\xfe\xff\xdd\xe0" in data[: data.find(b"\xe0\x7f\x10\x00")]  # a sequence delimiter
    assert _read_raw(data) is not None
    got = decode_dicom(data)
    assert (got.rows, got.cols, got.patient_id) == (64, 48, "seq")


@pytest.mark.parametrize(
    "edit",
    [
        lambda ds: (setattr(ds, "SpecificCharacterSet", "ISO_IR 100"), setattr(ds, "PatientID", "Müller")),
        lambda ds: setattr(ds, "PatientSex", ["M", "F"]),  # multi-valued
        lambda ds: setattr(ds, "RescaleSlope", 1),  # any LUT element: pydicom decides
        lambda ds: setattr(ds, "NumberOfFrames", 2),  # multi_frame: pydicom path rejects it
    ],
    ids=["non_ascii", "multi_valued", "rescale", "frames"],
)
def test_anything_unusual_goes_through_pydicom(tmp_path: Path, edit) -> None:
    path = df.make_rsna_like(tmp_path / "odd.dcm", "odd")
    data = _rewrite(path, edit)
    assert _read_raw(data) is None


def test_non_ascii_patient_id_is_read_by_pydicom(tmp_path: Path) -> None:
    path = df.make_rsna_like(tmp_path / "m.dcm", "m")
    data = _rewrite(path, lambda ds: (setattr(ds, "SpecificCharacterSet", "ISO_IR 100"), setattr(ds, "PatientID", "Müller")))
    assert decode_dicom(data).patient_id == "Müller"
