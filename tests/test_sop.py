"""Files judged by their SOP Class UID: non-image objects, images that are not radiographs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom.data
import pytest

from ingest import sop
from ingest.config import IngestConfig
from ingest.dicom import DicomRejected, decode_dicom
from ingest.pipeline import run_ingest
from shards.manifest import read_manifest
from tests import dicom_factory as df

CORPUS = Path(pydicom.data.__file__).parent / "test_files"
CT_UID = "1.2.840.10008.5.1.4.1.1.2"
MG_UID = "1.2.840.10008.5.1.4.1.1.1.2"
SC_UID = "1.2.840.10008.5.1.4.1.1.7"
DX_UID = "1.2.840.10008.5.1.4.1.1.1.1"


def _corpus(name: str) -> Callable[[Path], Path]:
    return lambda d: Path(shutil.copy(CORPUS / name, d / name))


def _as_class(write: Callable[[Path], Path], uid: str | None) -> Callable[[Path], Path]:
    return lambda d: df.with_sop_class(write(d), uid)


# (id, file, policy, the reject reason or None, a word its detail names)
CASES = [
    ("seg-corpus", _corpus("liver_1frame.dcm"), "radiograph", "not_an_image", "Segmentation Storage"),
    ("seg-corpus-any", _corpus("liver_1frame.dcm"), "any-image", "not_an_image", "Segmentation Storage"),
    ("sr", lambda d: df.write_non_image(d, "sr", df.SR_SOP_CLASS_UID, "SR"), "radiograph", "not_an_image", "Basic Text SR"),
    ("pr", lambda d: df.write_non_image(d, "pr", df.PR_SOP_CLASS_UID, "PR"), "any-image", "not_an_image", "Presentation State"),
    ("ko", lambda d: df.write_non_image(d, "ko", df.KO_SOP_CLASS_UID, "KO"), "radiograph", "not_an_image", "Key Object Selection"),
    ("rtdose-corpus", _corpus("rtdose_1frame.dcm"), "any-image", "not_an_image", "RT Dose"),
    ("ecg-corpus", _corpus("waveform_ecg.dcm"), "any-image", "not_an_image", "ECG Waveform"),
    ("ct-corpus", _corpus("CT_small.dcm"), "radiograph", "not_a_radiograph", "CT Image Storage"),
    ("ct-corpus-any", _corpus("CT_small.dcm"), "any-image", None, None),
    ("mr-jpegls-corpus-any", _corpus("MR_small_jpeg_ls_lossless.dcm"), "any-image", None, None),
    ("mr-jpegls-corpus", _corpus("MR_small_jpeg_ls_lossless.dcm"), "radiograph", "not_a_radiograph", "MR Image"),
    ("us-corpus", _corpus("examples_rgb_color.dcm"), "radiograph", "not_a_radiograph", "Ultrasound"),
    ("cr", lambda d: df.write_mono(d, "cr"), "radiograph", None, None),
    ("sc-rsna-class", _as_class(df.write_explicit_le_8bit, SC_UID), "radiograph", None, None),
    ("dx", _as_class(df.write_explicit_le_8bit, DX_UID), "radiograph", None, None),
    ("mammography", _as_class(df.write_explicit_le_8bit, MG_UID), "radiograph", "not_a_radiograph", "Mammography"),
    ("mammography-any", _as_class(df.write_explicit_le_8bit, MG_UID), "any-image", None, None),
    ("ct-fast-path", _as_class(df.write_jpeg_baseline, CT_UID), "radiograph", "not_a_radiograph", "CT Image Storage"),
    ("no-class-judged-by-pixels", _as_class(df.write_explicit_le_8bit, None), "radiograph", None, None),
    ("no-class-no-pixels", _as_class(df.write_no_pixel_data, None), "radiograph", "no_pixel_data", "PixelData"),
    ("private-class-judged-by-pixels", _as_class(df.write_explicit_le_8bit, "1.3.6.1.4.1.9590.100.1.2.1"), "radiograph", None, None),
    ("no-judgement", _corpus("liver_1frame.dcm"), None, None, None),
]


@pytest.mark.parametrize(("write", "policy", "reason", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sop_class_judgement(tmp_path: Path, write, policy: str | None, reason: str | None, named: str | None) -> None:
    data = write(tmp_path).read_bytes()
    if reason is None:
        assert decode_dicom(data, sop_classes=policy).pixels.size
        return
    with pytest.raises(DicomRejected) as info:
        decode_dicom(data, sop_classes=policy)
    assert info.value.reason == reason
    assert named in info.value.detail


def test_sop_class_is_judged_before_the_fast_path_decodes(tmp_path: Path, monkeypatch) -> None:
    path = df.with_sop_class(df.write_jpeg_baseline(tmp_path), CT_UID)
    from ingest import codestream

    monkeypatch.setattr(codestream, "decode_jpeg", lambda *a, **k: pytest.fail("decoded a refused file"))
    with pytest.raises(DicomRejected, match="not_a_radiograph"):
        decode_dicom(path.read_bytes())


@pytest.mark.parametrize(("uid", "table"), [
    ("1.2.840.10008.5.1.4.1.1.66.4", "NON_IMAGE_CLASSES"),  # SEG
    ("1.2.840.10008.5.1.4.1.1.104.1", "NON_IMAGE_CLASSES"),  # encapsulated PDF
    ("1.2.840.10008.5.1.4.1.1.481.3", "NON_IMAGE_CLASSES"),  # RT Structure Set
    ("1.2.840.10008.5.1.4.1.1.9.1.1", "NON_IMAGE_CLASSES"),  # 12-lead ECG
    ("1.2.840.10008.5.1.4.1.1.20", "IMAGE_CLASSES"),  # NM
    ("1.2.840.10008.5.1.4.1.1.6.1", "IMAGE_CLASSES"),  # US
    ("1.2.840.10008.5.1.4.1.1.481.1", "IMAGE_CLASSES"),  # RT Image
])
def test_registry_tables(uid: str, table: str) -> None:
    assert uid in getattr(sop, table)
    assert uid not in sop.RADIOGRAPH_CLASSES


def test_unknown_policy_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="allowed: radiograph, any-image"):
        sop.judge(CT_UID, "images")
    with pytest.raises(ValueError, match="sop_classes='images'"):
        IngestConfig(dicom_dir=".", out="o", sop_classes="images")


def test_ingest_rejects_non_images_and_records_the_choice(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    df.make_rsna_like(src / "chest.dcm", "chest")
    shutil.copy(CORPUS / "liver_1frame.dcm", src / "seg.dcm")
    shutil.copy(CORPUS / "CT_small.dcm", src / "ct.dcm")
    df.write_non_image(src, "sr", df.SR_SOP_CLASS_UID, "SR")
    results = {}
    for policy in ("radiograph", "any-image"):
        out = tmp_path / policy
        run_ingest(IngestConfig(dicom_dir=src, out=out, size=32, workers=1, progress=False, sop_classes=policy))
        lines = map(json.loads, (out / "rejects.jsonl").read_text().splitlines())
        rejects = {r["path"]: r["reason"] for r in lines if r["kind"] == "file"}
        m = read_manifest(out)
        assert m.params["sop_classes"] == policy
        results[policy] = (m.counts["samples"], rejects)
    assert results["radiograph"] == (1, {"seg.dcm": "not_an_image", "sr.dcm": "not_an_image", "ct.dcm": "not_a_radiograph"})
    assert results["any-image"] == (2, {"seg.dcm": "not_an_image", "sr.dcm": "not_an_image"})
