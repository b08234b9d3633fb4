"""End to end: synth DICOMs -> python -m ingest -> shards, labels.zarr, rejects, manifest."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ingest.__main__ import main as ingest_main
from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.plan import assign_splits
from shards.format import META_FIELDS
from shards.geometry import boxes_from_letterbox
from shards.labels import read_labels
from shards.manifest import read_manifest
from shards.reader import iter_samples
from shards.records import ShardRecord
from tests.fault_injection import fault_env
from tests.procs import kill_after_shards


REPO = Path(__file__).resolve().parents[1]


def _args(synth, out: Path, *extra: str) -> list[str]:
    return [
        "--dicom-dir", str(synth.images_dir), "--out", str(out), "--labels", str(synth.labels_csv),
        "--class-info", str(synth.class_info_csv), "--size", "64", "--shard-size", "4",
        "--val-fraction", "0.25", "--no-progress", *extra,
    ]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def test_layout_and_sample_format(ingested_small: Path, synth_small) -> None:
    out = ingested_small
    assert sorted(p.name for p in out.iterdir()) == ["labels.zarr", "manifest.json", "rejects.jsonl", "shards", "sources.json"]
    m = read_manifest(out)
    assert m.counts["samples"] == synth_small.n_images
    assert m.counts["positives"] == synth_small.n_positive
    assert m.counts["boxes"] == synth_small.n_boxes
    assert {s.split for s in m.shards} == {"train", "val"}
    keys = []
    for info in m.shards:
        path = out / "shards" / info.name
        names = subprocess.run(["tar", "tf", str(path)], check=True, capture_output=True, text=True).stdout.split()
        assert len(names) == 2 * info.samples
        samples = list(iter_samples(path, expected_sha256=info.sha256, size=64))
        assert [s.key for s in samples][:1] == [info.first_key]
        for s in samples:
            assert "." not in s.key and s.image.dtype == np.uint8 and s.image.shape == (64, 64)
            assert set(s.meta) == set(META_FIELDS)
            assert s.meta["split"] == info.split
            keys.append(s.key)
    assert len(keys) == len(set(keys)) == synth_small.n_images


def test_webdataset_reads_shards_unchanged(ingested_small: Path) -> None:
    import webdataset as wds

    urls = sorted(str(p) for p in (ingested_small / "shards").glob("*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False).decode()
    n = 0
    for sample in ds:
        assert sample["npy"].shape == (64, 64) and sample["npy"].dtype == np.uint8
        assert sample["json"]["key"] == sample["__key__"]
        n += 1
    assert n == read_manifest(ingested_small).counts["samples"]


def test_labels_zarr_matches_json(ingested_small: Path) -> None:
    table = read_labels(ingested_small / "labels.zarr")
    idx = table.index()
    m = read_manifest(ingested_small)
    for shard_i, info in enumerate(m.shards):
        for s in iter_samples(ingested_small / "shards" / info.name):
            i = idx[s.key]
            assert table.shard[i] == shard_i and table.split[i] == s.meta["split"]
            assert table.target[i] == s.meta["target"]
            np.testing.assert_array_equal(table.boxes_of(i), np.asarray(s.meta["boxes"], np.float32).reshape(-1, 4))


def test_boxes_map_back_to_source_pixels(ingested_small: Path, synth_small) -> None:
    truth = {r.patient_id: r.boxes for r in synth_small.records}
    for info in read_manifest(ingested_small).shards:
        for s in iter_samples(ingested_small / "shards" / info.name):
            src = np.array([[x, y, x + w, y + h] for x, y, w, h in truth[s.meta["patient_id"]]]).reshape(-1, 4)
            src = src.clip(0, 128)
            back = boxes_from_letterbox(np.asarray(s.meta["boxes"]).reshape(-1, 4), s.meta["transform"])
            np.testing.assert_allclose(back, src, atol=1e-3)


def test_split_is_patient_level_stratified_and_stable() -> None:
    patients = {f"p{i}": int(i % 5 == 0) for i in range(1000)}
    a = assign_splits(patients, 0.1, seed=3)
    assert a == assign_splits(dict(reversed(list(patients.items()))), 0.1, seed=3)
    assert a != assign_splits(patients, 0.1, seed=4)
    pos_val = sum(1 for p, t in patients.items() if t == 1 and a[p] == "val")
    neg_val = sum(1 for p, t in patients.items() if t == 0 and a[p] == "val")
    assert pos_val == 20 and neg_val == 80


@pytest.mark.slow
def test_deterministic_across_runs_and_worker_counts(ingested_small: Path, synth_small, tmp_path: Path) -> None:
    out = tmp_path / "w1"
    assert ingest_main(_args(synth_small, out, "--workers", "1")) == 0
    assert _shard_bytes(out) == _shard_bytes(ingested_small)
    a, b = read_manifest(out), read_manifest(ingested_small)
    assert a.shards == b.shards and a.params_hash == b.params_hash
    assert (out / "manifest.json").read_text() == (ingested_small / "manifest.json").read_text()


def test_rerun_on_complete_output_is_a_no_op(ingested_small: Path, synth_small, capsys) -> None:
    before = (ingested_small / "manifest.json").stat().st_mtime_ns
    assert ingest_main(_args(synth_small, ingested_small, "--workers", "2")) == 0
    assert "already complete" in capsys.readouterr().out
    assert (ingested_small / "manifest.json").stat().st_mtime_ns == before


def test_other_parameters_stop_before_work(ingested_small: Path, synth_small, capsys) -> None:
    assert ingest_main(_args(synth_small, ingested_small, "--clahe-clip", "3.5")) == 2
    err = capsys.readouterr().err
    assert "other parameters" in err and "clahe_clip" in err and err.count("\n") == 1


def _fewer_sources(synth, tmp_path: Path) -> list[str]:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(synth.images_dir.iterdir())[1:]:
        (images / path.name).symlink_to(path)
    return ["--dicom-dir", str(images)]


def _other_labels(synth, tmp_path: Path) -> list[str]:
    labels = tmp_path / "labels.csv"
    labels.write_text(synth.labels_csv.read_text() + "not-in-the-images,,,,,0\n")
    return ["--labels", str(labels)]


@pytest.mark.parametrize(
    "change, expect",
    [(_fewer_sources, "made from a different set of source files"), (_other_labels, "made with a different labels file")],
    ids=["one-source-file-fewer", "another-labels-file"],
)
def test_other_inputs_stop_before_work(ingested_small: Path, synth_small, tmp_path: Path, capsys, change, expect) -> None:
    """An OUT holds one dataset: the same parameters over other inputs are refused (exit 2,
    one line naming what differs), and the dataset is left as it was."""
    before = _shard_bytes(ingested_small)
    assert ingest_main([*_args(synth_small, ingested_small), *change(synth_small, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {ingested_small} holds a dataset {expect}; use a new --out or delete it\n"
    assert _shard_bytes(ingested_small) == before and not (ingested_small / ".ingest").exists()


@pytest.mark.parametrize(
    "content, expect",
    [
        ("not,a,labels,file\n1,2,3,4\n", "lacks column"),
        (None, "no such file"),
    ],
)
def test_unusable_labels_file_exits_2(synth_small, tmp_path: Path, capsys, content, expect) -> None:
    labels = tmp_path / "labels.csv"
    if content is not None:
        labels.write_text(content)
    argv = ["--dicom-dir", str(synth_small.images_dir), "--out", str(tmp_path / "o"), "--labels", str(labels)]
    assert ingest_main(argv) == 2
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_every_input_is_one_sample_or_one_reject(tmp_path: Path) -> None:
    from tests import dicom_factory as df

    src = tmp_path / "src"
    src.mkdir()
    good = [df.make_rsna_like(src / f"good{i}.dcm", f"good{i}", rows=48, cols=64, seed=i) for i in range(3)]
    df.write_jpeg_baseline(src, "jpeg")
    truncated = df.write_truncated(src, "trunc")
    notdicom = df.write_not_dicom(src, "notdicom")
    nopix = df.write_no_pixel_data(src, "nopix")
    multi = df.write_multiframe(src, "multi")
    uid = df.write_uid_named(src, "1.2.826.0.1.3680043.8.498.1")
    (src / "sub").mkdir()
    dup = df.make_rsna_like(src / "sub" / "good0.dcm", "good0", rows=48, cols=64, seed=9)
    (src / "README.txt").write_text("not an input")
    labels = tmp_path / "labels.csv"
    rows = ["patientId,x,y,width,height,Target"]
    rows += ["good0,10,10,20,20,1", "good0,,,,,1", "good1,,,,,0", "good2,5,5,-3,10,1", "ghost,,,,,0"]
    rows += ["jpeg,60,40,30,30,1", "trunc,,,,,0", "notdicom,,,,,0", "nopix,,,,,0", "multi,,,,,0"]
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    summary = run_ingest(IngestConfig(dicom_dir=src, out=out, labels=labels, size=64, shard_size=2, workers=2, progress=False))

    lines = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    file_rejects = {r["path"]: r["reason"] for r in lines if r["kind"] == "file"}
    problems = {(p["reason"], p["patient_id"]) for p in lines if p["kind"] == "label"}
    table = read_labels(out / "labels.zarr")
    ingested = {str(k) for k in table.key}
    inputs = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and p.name != "README.txt"}
    samples_paths = set()
    for info in read_manifest(out).shards:
        samples_paths |= {s.meta["source"]["path"] for s in iter_samples(out / "shards" / info.name)}
    assert samples_paths.isdisjoint(file_rejects)
    assert samples_paths | set(file_rejects) == inputs
    assert ingested == {"good0", "good1", "good2", "jpeg"}
    assert file_rejects[truncated.name] == "truncated"
    assert file_rejects[notdicom.name] == "not_dicom"
    assert file_rejects[nopix.name] == "no_pixel_data"
    assert file_rejects[multi.name] == "multi_frame"
    assert file_rejects[f"sub/{dup.name}"] == "duplicate_patient"
    assert file_rejects[uid.name] == "no_label"
    assert {("positive_without_box", "good0"), ("bad_box", "good2"), ("label_without_image", "ghost"),
            ("box_clipped", "jpeg")} <= problems
    assert summary.counts["rejects"] == len(file_rejects)
    assert len(good) == 3


def _ingest_cmd(synth, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "ingest", *_args(synth, out, "--workers", str(workers))]


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(ingested_small: Path, synth_small, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # 0.5 s per 4-sample shard, so the kill lands mid-run (the decoder opens each file itself)
    finished_before = kill_after_shards(_ingest_cmd(synth_small, out, 1), out, 2,
                                        env=fault_env("*.dcm=sleep:0.125"), cwd=REPO)
    done = out / ".ingest" / "done"
    n_shards = len(read_manifest(ingested_small).shards)
    assert 2 <= finished_before < n_shards and not (out / "manifest.json").exists()
    # Workers do not sync their shards, so a crash can leave a finished shard with its size
    # but not its bytes: resuming must rebuild it, not reuse it.
    torn = out / "shards" / ShardRecord.from_json(json.loads(next(done.glob("*.json")).read_text())).name
    data = bytearray(torn.read_bytes())
    data[len(data) // 2] ^= 0xFF
    torn.write_bytes(data)

    res = subprocess.run(_ingest_cmd(synth_small, out, 2), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{torn.name}: its bytes differ from those recorded when it was built" in res.stderr
    assert f"{n_shards - finished_before + 1} built, {finished_before - 1} reused" in res.stdout
    assert _shard_bytes(out) == _shard_bytes(ingested_small)
    assert read_manifest(out).shards == read_manifest(ingested_small).shards
    assert not (out / ".ingest").exists()


def test_local_workers_run_with_dasks_dashboard_sampling_quieted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No profiler (7% of a worker's CPU), rarer event-loop ticks and monitors (an idle worker
    burnt 21-24 ms of CPU a second); a setting the environment gives is left to it."""
    from ingest.cluster import open_client
    from ingest.cluster_base import QUIET_WORKERS, env_name

    def periodic(dask_worker) -> dict[str, float]:  # noqa: ANN001 (client.run passes the worker by this name)
        return {k: v.callback_time for k, v in dask_worker.periodic_callbacks.items()}

    for key in QUIET_WORKERS:
        monkeypatch.delenv(env_name(key), raising=False)
    cfg = IngestConfig(dicom_dir=tmp_path, out=tmp_path / "out", workers=1)
    with open_client(cfg) as client:
        [got] = client.run(periodic).values()
    assert "profile" not in got
    assert (got["tick"], got["memory_monitor"], got["monitor"]) == (1000, 1000, 2000)
    monkeypatch.setenv("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "20ms")
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "True")
    with open_client(cfg) as client:
        [got] = client.run(periodic).values()
    assert "profile" in got and got["tick"] == 20 and got["memory_monitor"] == 1000


@pytest.mark.slow
def test_ingest_bench_runs_every_contender_and_prints_every_ratio(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``python -m ingest.bench`` at a toy size: every contender runs (the floors, ours on one
    worker and all cores, the floor split over the cores) and every ratio line is printed. A
    benchmark asserts nothing about speed; this keeps it from rotting."""
    from ingest.bench import main as bench_main

    assert bench_main(["--n", "24", "--floor-n", "8", "--shard-size", "6", "--repeat", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("probe before / after", "(b2) new floor", "(f) new floor split over", "ours dct per process / new floor (b2)",
                 "ours dct  all cores / (cores x 1 worker)", "(f) new floor, the same ratio",
                 "ours dct all cores ratio / (f)'s", "QA flags + SOP-class check", "peak RSS per worker"):
        assert line in out, line
    assert not re.search(r"\b(nan|inf)\b", out), out


def test_ingest_bench_probe_alone_prints_one_time_and_runs_nothing_else(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--probe`` is what a full-set timing is taken between: one line, milliseconds, and no
    ingest, no data beyond its one file."""
    from ingest.bench import main as bench_main

    assert bench_main(["--probe", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"probe: \d+\.\d\d ms \(.*\)\n", out), out
    assert len(list(tmp_path.rglob("*.dcm"))) == 1 and not list(tmp_path.rglob("*.tar"))
