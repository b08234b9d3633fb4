"""Hostile and damaged DICOMs: every one is one reject with a clear reason, found before the
decoder (or zlib) allocates what the file pretends to hold, and the run goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from ingest.dicom import DicomRejected, decode_dicom
from tests import dicom_factory as df

REPO = Path(__file__).resolve().parents[1]
SMALL_PEAK = 64 << 20  # a rejected file may cost its own bytes and a header, not its pixels


def _reject(data: bytes, **kwargs) -> DicomRejected:
    with pytest.raises(DicomRejected) as info:
        decode_dicom(data, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def _peak_while_rejecting(path: Path, **kwargs) -> tuple[DicomRejected, int]:
    data = path.read_bytes()
    tracemalloc.start()
    try:
        exc = _reject(data, **kwargs)
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _jpeg_chest(tmp_path: Path, name: str = "chest", size: int = 512) -> Path:
    return df.make_rsna_like(tmp_path / f"{name}.dcm", name, rows=size, cols=size)


def _general_path_jpeg(tmp_path: Path, name: str = "windowed") -> Path:
    """The same JPEG Baseline chest with a VOI window: pydicom decodes it (general path)."""
    path = _jpeg_chest(tmp_path, name)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.save_as(path)
    return path


# ------------------------------------------------------------------ damage is never silent


@pytest.mark.parametrize("fit", [None, 64], ids=["full_size", "dct_scaled"])
def test_damaged_jpeg_frame_is_corrupt_pixel_data_on_the_fast_path(tmp_path: Path, fit) -> None:
    path = _jpeg_chest(tmp_path)
    assert decode_dicom(path.read_bytes()).fast_path
    df.damage_frame(path, 4000)
    exc = _reject(path.read_bytes(), fit=fit)
    assert exc.reason == "corrupt_pixel_data"
    assert "Corrupt JPEG data" in exc.detail  # libjpeg's own words


def test_damaged_jpeg_frame_is_corrupt_pixel_data_on_the_general_path(tmp_path: Path) -> None:
    path = _general_path_jpeg(tmp_path)
    assert not decode_dicom(path.read_bytes()).fast_path
    df.damage_frame(path, 4000)
    pydicom.dcmread(path).pixel_array  # pydicom's plugins decode it without a word
    exc = _reject(path.read_bytes())
    assert exc.reason == "corrupt_pixel_data" and "Corrupt JPEG data" in exc.detail


def test_garbage_instead_of_a_codestream_is_corrupt_pixel_data(tmp_path: Path) -> None:
    path = _jpeg_chest(tmp_path, size=128)
    at, length = df.frame_span(path)
    data = bytearray(path.read_bytes())
    data[at : at + 16] = b"\x00" * 16  # no SOI any more
    assert _reject(bytes(data)).reason == "corrupt_pixel_data"


# ------------------------------------------------------------------ geometry before pixels


@pytest.mark.parametrize("general", [False, True], ids=["fast_path", "general_path"])
def test_jpeg_header_larger_than_rows_columns_is_rejected_before_decoding(tmp_path: Path, general: bool) -> None:
    path = _general_path_jpeg(tmp_path) if general else _jpeg_chest(tmp_path)
    df.patch_frame_size(path, 20000, 20000)  # 400 MB if a decoder believed it
    exc, peak = _peak_while_rejecting(path)
    assert exc.reason == "bad_geometry" and "20000x20000" in exc.detail and "Rows=512" in exc.detail
    assert peak < SMALL_PEAK


def test_jpeg2000_header_disagreeing_with_rows_columns_is_bad_geometry(tmp_path: Path) -> None:
    path = df.write_jpeg2000_lossless(tmp_path)
    df.patch_frame_size(path, 4800, 6400)
    exc = _reject(path.read_bytes())
    assert exc.reason == "bad_geometry" and "6400x4800" in exc.detail


@pytest.mark.parametrize(
    "write",
    [df.write_jpeg_baseline, df.write_explicit_le_8bit, df.write_jpeg2000_lossless, df.write_deflated],
    ids=["jpeg_fast", "native", "jpeg2000", "deflated"],
)
def test_max_pixels_rejects_too_large_on_every_path(tmp_path: Path, write) -> None:
    data = write(tmp_path).read_bytes()  # 48 x 64 = 3,072 pixels
    assert decode_dicom(data, max_pixels=3072).pixels.shape == (48, 64)
    exc = _reject(data, max_pixels=3071)
    assert exc.reason == "too_large" and "3,072 pixels" in exc.detail


@pytest.mark.parametrize("header_rows", [None, 64], ids=["honest_header", "lying_header"])
def test_deflate_bomb_is_too_large_without_being_inflated(tmp_path: Path, header_rows) -> None:
    path = df.write_deflate_bomb(tmp_path, header_rows=header_rows)  # 24000 x 24000 x 16 bit
    assert path.stat().st_size < 2 << 20
    exc, peak = _peak_while_rejecting(path)
    assert exc.reason == "too_large"
    assert peak < SMALL_PEAK  # 1.15 GB inflated


# ------------------------------------------------------------------ no file stops the run


def _candidates(root: Path) -> set[str]:
    out = set()
    for path in root.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            with open(path, "rb") as f:
                head = f.read(132)
            if path.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
                out.add(path.relative_to(root).as_posix())
    return out


def _corpus_folders() -> list[tuple[str, Path]]:
    folders = [("pydicom", Path(pydicom.data.__file__).parent / "test_files")]
    try:  # the pydicom-data package (a dev dependency): pydicom's larger test files
        import data_store

        folders.append(("pydicom-data", Path(data_store.__file__).parent / "data"))
    except ImportError:
        pass
    return folders


@pytest.mark.slow
def test_pydicom_test_corpus_every_file_one_sample_or_one_reject(tmp_path: Path) -> None:
    src = tmp_path / "corpus"
    for name, folder in _corpus_folders():
        shutil.copytree(folder, src / name)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "--dicom-dir", str(src), "--out", str(out), "--size", "32",
         "--shard-size", "16", "--workers", "2", "--no-progress", "--sop-classes", "any-image"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    rejected = [r["path"] for r in rejects if r["kind"] == "file"]
    from shards.manifest import read_manifest
    from shards.reader import iter_samples

    m = read_manifest(out)
    sampled = [s.meta["source"]["path"] for info in m.shards for s in iter_samples(out / "shards" / info.name, decode=False)]
    assert len(set(rejected)) == len(rejected) and not set(rejected) & set(sampled)
    assert sorted(rejected + sampled) == sorted(_candidates(src))
    by_path = {r["path"]: r for r in rejects if r["kind"] == "file"}
    # any-image keeps the corpus's CT, MR and US files (its only real JPEG-LS, JPEG 2000, RLE
    # and big-endian images) in the decoder's way; objects that are not images stay out.
    assert {"pydicom/CT_small.dcm", "pydicom/MR_small_jpeg_ls_lossless.dcm", "pydicom/MR_small_RLE.dcm",
            "pydicom/MR_small_bigendian.dcm", "pydicom/MR_small_jp2klossless.dcm"} <= set(sampled)
    for name in ("liver_1frame.dcm", "badVR.dcm", "rtdose.dcm", "reportsi.dcm", "waveform_ecg.dcm"):
        assert by_path[f"pydicom/{name}"]["reason"] == "not_an_image", by_path[f"pydicom/{name}"]
    assert len(sampled) > 50


_POISON_SITECUSTOMIZE = '''
import ingest.worker

_process_sample = ingest.worker.process_sample


def process_sample(data, sample, processing):
    if sample.path == "poison.dcm":
        raise RuntimeError("injected by the test's sitecustomize")
    return _process_sample(data, sample, processing)


ingest.worker.process_sample = process_sample
'''


@pytest.mark.slow
def test_an_exception_outside_the_decoder_costs_one_reject(tmp_path: Path) -> None:
    """Injected from outside (a sitecustomize.py on PYTHONPATH, in the driver and every Dask
    worker): whatever raises while one file becomes a sample, the run goes on."""
    images = tmp_path / "images"
    for name in ("a", "b", "poison"):
        df.make_rsna_like(images / f"{name}.dcm", name)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_POISON_SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "--dicom-dir", str(images), "--out", str(out), "--size", "32",
         "--workers", "1", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"kind": "file", "path": "poison.dcm", "reason": "decode_error",
                        "detail": "RuntimeError: injected by the test's sitecustomize"}]
    assert "samples: 2" in proc.stdout


def _verdict(run) -> tuple[str, object]:
    try:
        got = run()
    except DicomRejected as exc:
        return exc.reason, None
    return "ok", (got.pixels.tobytes(), got.patient_id, got.view_position, got.sex, got.age)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_files_are_a_sample_or_a_reject_and_both_header_readers_agree(tmp_path: Path) -> None:
    """Random byte changes, mostly in the header: decode_dicom returns or raises DicomRejected,
    and wherever the fast header reader takes a file, pydicom's reading gives the same verdict."""
    from ingest.config import DEFAULT_MAX_PIXELS
    from ingest.dicom import _decode_parsed, _read_raw

    rng = np.random.default_rng(0)
    original = df.make_rsna_like(tmp_path / "r.dcm", "r", rows=64, cols=48).read_bytes()
    header_end = original.find(b"\xe0\x7f\x10\x00") + 12
    taken = 0
    for _ in range(400):
        data = bytearray(original)
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(132, header_end)] = rng.integers(256)
        if rng.random() < 0.3:
            data = data[: rng.integers(132, len(data))]
        data = bytes(data)
        fast = _verdict(lambda: decode_dicom(data, fit=32))
        if _read_raw(data) is not None:
            taken += 1
            assert fast == _verdict(lambda: _decode_parsed(data, DEFAULT_MAX_PIXELS, 32))
    assert taken > 50
