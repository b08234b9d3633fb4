"""``python -m ingest --dicom-dir data.zip``: an archive ingested in place gives the unpacked
folder's samples, labels and splits, only the source paths differ."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ingest.__main__ import main as ingest_main
from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.synth_archive import TRAIN_MEMBERS, pack_archive
from shards.archive import read_index
from shards.labels import read_labels
from shards.manifest import read_manifest
from shards.reader import iter_samples
from tests import dicom_factory as df
from tests.fault_injection import fault_env
from tests.procs import kill_after_shards

REPO = Path(__file__).resolve().parents[1]
LABELS_FIELDS = ("key", "patient_id", "split", "target", "class_id", "shard", "view_position", "sex", "age", "boxes", "box_offsets")


def _args(synth, archive: Path, out: Path, *extra: str) -> list[str]:
    """The arguments of ``ingested_small`` (conftest), the images read from ``archive``."""
    return [
        "--dicom-dir", str(archive), "--members", TRAIN_MEMBERS, "--out", str(out),
        "--labels", str(synth.labels_csv), "--class-info", str(synth.class_info_csv), "--size", "64",
        "--shard-size", "4", "--val-fraction", "0.25", "--no-progress", *extra,
    ]


def _samples(out: Path) -> dict[str, list[tuple[bytes, dict]]]:
    """Each shard's samples in order: (image bytes, JSON)."""
    return {
        info.name: [(s.image.tobytes(), s.meta) for s in iter_samples(out / "shards" / info.name)]
        for info in read_manifest(out).shards
    }


@pytest.fixture(scope="module", params=["zip", "tar"])
def archive_of_synth(request, synth_small, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth_small`` packed as the competition ships it (the CSVs beside the images)."""
    return pack_archive(synth_small.out, tmp_path_factory.mktemp("archive") / f"rsna.{request.param}")


@pytest.fixture(scope="module")
def ingested_archive(archive_of_synth: Path, synth_small, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ingested-archive") / "ds"
    assert ingest_main(_args(synth_small, archive_of_synth, out, "--workers", "2")) == 0
    return out


@pytest.mark.slow
def test_archive_gives_the_folders_pixels_labels_and_splits(ingested_archive: Path, ingested_small: Path) -> None:
    got, want = _samples(ingested_archive), _samples(ingested_small)
    assert list(got) == list(want)
    for name in want:
        assert [m["key"] for _, m in got[name]] == [m["key"] for _, m in want[name]]
        for (img_a, meta_a), (img_w, meta_w) in zip(got[name], want[name]):
            assert img_a == img_w
            assert meta_a["source"] == {**meta_w["source"], "path": TRAIN_MEMBERS + meta_w["source"]["path"]}
            assert {**meta_a, "source": None} == {**meta_w, "source": None}
    a, w = read_labels(ingested_archive / "labels.zarr"), read_labels(ingested_small / "labels.zarr")
    for field in LABELS_FIELDS:
        np.testing.assert_array_equal(getattr(a, field), getattr(w, field), err_msg=field)
    ma, mw = read_manifest(ingested_archive), read_manifest(ingested_small)
    assert ma.counts == mw.counts and ma.params_hash == mw.params_hash
    assert [(s.name, s.samples, s.first_key, s.last_key) for s in ma.shards] == [
        (s.name, s.samples, s.first_key, s.last_key) for s in mw.shards
    ]
    assert ma.source["dicom_dir"].endswith(("rsna.zip", "rsna.tar"))
    assert (ingested_archive / "rejects.jsonl").read_text() == (ingested_small / "rejects.jsonl").read_text()


@pytest.mark.slow
def test_rerun_on_a_complete_archive_dataset_is_a_no_op(ingested_archive: Path, archive_of_synth: Path, synth_small, capsys) -> None:
    assert ingest_main(_args(synth_small, archive_of_synth, ingested_archive, "--workers", "1")) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical_from_an_archive(
    ingested_archive: Path, archive_of_synth: Path, synth_small, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    # The archive is opened once per shard: 0.5 s each, so the kill lands mid-run.
    env = fault_env(f"{archive_of_synth.name}=sleep:0.5")
    cmd = [sys.executable, "-m", "ingest", *_args(synth_small, archive_of_synth, out, "--workers", "1")]
    finished_before = kill_after_shards(cmd, out, 2, env=env, cwd=REPO)
    n_shards = len(read_manifest(ingested_archive).shards)
    assert 2 <= finished_before < n_shards and not (out / "manifest.json").exists()

    cmd = [sys.executable, "-m", "ingest", *_args(synth_small, archive_of_synth, out, "--workers", "2")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{n_shards - finished_before} built, {finished_before} reused" in res.stdout
    shards = lambda d: {p.name: p.read_bytes() for p in sorted((d / "shards").iterdir())}  # noqa: E731
    assert shards(out) == shards(ingested_archive)
    assert read_manifest(out).shards == read_manifest(ingested_archive).shards
    assert not (out / ".ingest").exists()


def _damage(archive: Path, name: str, how: str) -> None:
    """Damage member ``name`` of a stored zip after it was written: ``crc`` flips a byte of
    its data, ``header`` its local header's signature."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    raw = bytearray(archive.read_bytes())
    head = raw[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    if how == "crc":
        raw[start + info.compress_size // 2] ^= 0xFF
    else:
        raw[info.header_offset] = ord("X")
    archive.write_bytes(bytes(raw))


@pytest.mark.slow
@pytest.mark.parametrize("patient_id", ["name", "tag"])
def test_every_member_is_one_sample_or_one_reject(tmp_path: Path, patient_id: str) -> None:
    src = tmp_path / "src" / "images"
    for i in range(4):
        df.make_rsna_like(src / f"good{i}.dcm", f"good{i}", rows=48, cols=64, seed=i)
    df.make_rsna_like(src / "crc.dcm", "crc", rows=48, cols=64, seed=7)
    df.make_rsna_like(src / "header.dcm", "header", rows=48, cols=64, seed=8)
    truncated = df.write_truncated(src, "trunc")
    notdicom = df.write_not_dicom(src, "notdicom")
    uid = df.write_uid_named(src, "1.2.826.0.1.3680043.8.498.1")
    (src / "README.txt").write_text("not an input")
    archive = pack_archive(tmp_path / "src", tmp_path / "data.zip", stored=True)
    _damage(archive, f"{TRAIN_MEMBERS}crc.dcm", "crc")
    _damage(archive, f"{TRAIN_MEMBERS}header.dcm", "header")

    out = tmp_path / "out"
    cfg = IngestConfig(dicom_dir=archive, members=TRAIN_MEMBERS, out=out, size=64, shard_size=2, workers=2,
                       progress=False, patient_id=patient_id)
    summary = run_ingest(cfg)

    lines = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    rejects = {r["path"].removeprefix(TRAIN_MEMBERS): (r["reason"], r["detail"]) for r in lines if r["kind"] == "file"}
    samples = {
        s.meta["source"]["path"].removeprefix(TRAIN_MEMBERS)
        for info in read_manifest(out).shards
        for s in iter_samples(out / "shards" / info.name)
    }
    inputs = {p.relative_to(src).as_posix() for p in src.iterdir() if p.name != "README.txt"}
    assert samples.isdisjoint(rejects) and samples | set(rejects) == inputs
    assert samples == {f"good{i}.dcm" for i in range(4)} | {uid.name}
    assert rejects["crc.dcm"][0] == "corrupt_member" and "CRC-32" in rejects["crc.dcm"][1]
    assert rejects["header.dcm"][0] == "corrupt_member" and "local header" in rejects["header.dcm"][1]
    if patient_id == "name":  # by tag, a file with no readable header is rejected before decoding
        assert rejects[truncated.name][0] == "truncated"
        assert rejects[notdicom.name][0] == "not_dicom"
    assert summary.counts["inputs"] == len(inputs) and summary.counts["rejects"] == len(rejects)


@pytest.mark.parametrize(
    "name, content, members, expect",
    [
        ("rsna.zip", b"not a zip", None, "not a readable zip archive"),
        ("rsna.tar", b"\x1f\x8b\x08" + bytes(600), None, "a compressed tar cannot be read in place"),
        ("rsna.zip", None, "stage_2_test_images/",
         "no DICOM files found under 'stage_2_test_images/' (*.dcm or files with the DICOM preamble); "
         "its top-level folders: stage_2_train_images/"),
        ("images", None, TRAIN_MEMBERS, "--members selects a folder inside a .zip or .tar"),
        ("labels.csv", b"a,b\n", None, "neither a folder nor a .zip or .tar archive"),
    ],
    ids=["not-a-zip", "tar-gz", "members-matching-nothing", "members-on-a-folder", "a-csv"],
)
def test_unusable_archive_is_a_one_line_usage_error(
    tmp_path: Path, synth_small, capsys: pytest.CaptureFixture, name: str, content: bytes | None, members: str | None, expect: str
) -> None:
    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    elif name == "images":
        source = synth_small.images_dir
    else:
        pack_archive(synth_small.out, source)
    argv = ["--dicom-dir", str(source), "--out", str(tmp_path / "o"), *(["--members", members] if members else [])]
    assert ingest_main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_the_driver_reads_the_index_once_and_each_task_carries_its_own_members(
    synth_small, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shards.source
    from ingest import pipeline

    archive = pack_archive(synth_small.out, tmp_path / "rsna.zip")
    reads: list[str] = []
    real = shards.source.read_index
    monkeypatch.setattr(shards.source, "read_index", lambda p: reads.append(str(p)) or real(p))
    planned = []
    real_plan = pipeline._plan
    monkeypatch.setattr(pipeline, "_plan", lambda *a, **k: planned.append(real_plan(*a, **k)) or planned[-1])
    run_ingest(synth_small.ingest_config(tmp_path / "o", dicom_dir=archive, members=TRAIN_MEMBERS, size=64,
                                         shard_size=4, workers=1))
    assert reads == [str(archive)]
    for task in planned[0].tasks:
        assert task.archive is not None and task.archive.path == str(archive)
        assert list(task.archive.members) == [s.path for s in task.samples]


@pytest.mark.slow
def test_an_isolated_rebuild_from_an_archive_writes_the_same_bytes(synth_small, tmp_path: Path) -> None:
    from ingest.plan import make_plan
    from ingest.worker import build_shard, build_shard_isolated
    from shards.source import discover

    archive = pack_archive(synth_small.out, tmp_path / "rsna.zip")
    found = discover(archive, TRAIN_MEMBERS)
    out = tmp_path / "o"
    (out / "shards").mkdir(parents=True)
    cfg = IngestConfig(dicom_dir=archive, out=out, size=64)
    plan = make_plan(dicom_dir=archive, out=out, labels=None, label_problems=[], shard_size=3, val_fraction=0.0,
                     seed=0, processing=cfg.processing_params(), inputs=found.inputs, archive=found.archive)
    task = plan.tasks[0]
    first = build_shard(task)
    shard = out / "shards" / task.name
    plain = shard.read_bytes()
    shard.unlink()
    again = build_shard_isolated(task)
    assert shard.read_bytes() == plain and again.info.sha256 == first.info.sha256 and first.info.samples == 3


@pytest.mark.slow
def test_ingest_bench_archive_section_prints_every_ratio(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``python -m ingest.bench --archive`` at a toy size (a smoke test, not a timing)."""
    from ingest.bench import main as bench_main

    assert bench_main(["--archive", "--n", "8", "--shard-size", "4", "--repeat", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("| folder ", "| zip deflate ", "| tar ", "zip deflate / folder: images/s", "zip stored  / folder",
                 "tar         / folder"):
        assert line in out, line
    assert "nan" not in out and "inf" not in out


@pytest.mark.slow
def test_verify_accounts_for_every_member_of_the_source_archive(
    ingested_archive: Path, archive_of_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from shards.__main__ import main as shards_main

    argv = ["verify", str(ingested_archive), "--source", str(archive_of_synth), "--members", TRAIN_MEMBERS,
            "--workers", "1", "--no-progress"]
    assert shards_main(argv) == 0, capsys.readouterr().out
    # Without --members the CSVs are no inputs, but nothing else is either: the same inputs.
    assert shards_main(argv[:4] + argv[6:]) == 0
    capsys.readouterr()

    damaged = tmp_path / archive_of_synth.name
    damaged.write_bytes(archive_of_synth.read_bytes())
    index = read_index(damaged)
    name = min(n for n in index.members if n.startswith(TRAIN_MEMBERS))
    m = index.members[name]
    raw = bytearray(damaged.read_bytes())
    raw[m.offset + m.stored // 2 + (100 if index.kind == "zip" else 0)] ^= 0xFF  # a zip's data follows its local header
    damaged.write_bytes(bytes(raw))
    assert shards_main(["verify", str(ingested_archive), "--source", str(damaged), "--members", TRAIN_MEMBERS,
                        "--workers", "1", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert name in out and ("source_unreadable" in out or "source_sha256" in out), out


@pytest.mark.parametrize(
    "source, members, expect",
    [
        ("labels.csv", None, "neither a folder nor a .zip or .tar archive"),
        ("folder", TRAIN_MEMBERS, "--members selects a folder inside a .zip or .tar --source"),
        ("bad.zip", None, "not a readable zip archive"),
    ],
    ids=["a-csv", "members-on-a-folder", "not-a-zip"],
)
def test_verify_with_an_unusable_source_archive_is_a_usage_error(
    ingested_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture, source: str, members: str | None, expect: str
) -> None:
    from shards.__main__ import main as shards_main

    path = tmp_path / source
    if source == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"a,b\n")
    argv = ["verify", str(ingested_small), "--source", str(path), "--workers", "1", "--no-progress"]
    assert shards_main(argv + (["--members", members] if members else [])) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_tar_cut_inside_its_last_member_rejects_that_member_only(tmp_path: Path) -> None:
    src = tmp_path / "src" / "images"
    for i in range(3):
        df.make_rsna_like(src / f"p{i}.dcm", f"p{i}", rows=48, cols=64, seed=i)
    archive = pack_archive(tmp_path / "src", tmp_path / "data.tar")
    last = read_index(archive).members[f"{TRAIN_MEMBERS}p2.dcm"]
    archive.write_bytes(archive.read_bytes()[: last.offset + last.size // 2])

    out = tmp_path / "out"
    run_ingest(IngestConfig(dicom_dir=archive, out=out, size=64, shard_size=2, workers=1, progress=False))
    [reject] = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["path"] == f"{TRAIN_MEMBERS}p2.dcm" and reject["reason"] == "corrupt_member"
    assert reject["detail"].startswith("truncated")
    assert read_manifest(out).counts["samples"] == 2


@pytest.mark.slow
def test_show_draws_the_source_member_beside_the_sample(
    ingested_archive: Path, archive_of_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    import shards.show
    from shards.__main__ import main as shards_main

    read: list[bytes] = []
    real = shards.show.read_member
    monkeypatch.setattr(shards.show, "read_member", lambda a, n: read.append(real(a, n)) or read[-1])
    key = str(read_labels(ingested_archive / "labels.zarr").key[0])
    argv = ["show", str(ingested_archive), key, "-o", str(tmp_path / "s.png"), "--source", str(archive_of_synth)]
    assert shards_main(argv) == 0
    [sample] = [s for info in read_manifest(ingested_archive).shards
                for s in iter_samples(ingested_archive / "shards" / info.name) if s.key == key]
    assert [hashlib.sha256(b).hexdigest() for b in read] == [sample.meta["source"]["sha256"]]


def test_archive_feed_hands_members_over_in_plan_order(tmp_path: Path) -> None:
    from ingest.inputs import ArchiveFeed
    from shards.source import discover

    src = tmp_path / "src" / "images"
    src.mkdir(parents=True)
    for i in range(5):
        (src / f"p{i}.dcm").write_bytes(f"member {i}".encode() * 50)
    found = discover(pack_archive(tmp_path / "src", tmp_path / "a.zip"), TRAIN_MEMBERS)
    names = [rel for rel, _ in found.inputs][::-1]  # plan order is not name order
    with ArchiveFeed(found.archive, names, depth=2) as feed:
        assert [feed.next(n) for n in names[:2]] == [(src / Path(n).name).read_bytes() for n in names[:2]]
        with pytest.raises(LookupError, match="asked out of order"):
            feed.next(names[3])
    gone = tmp_path / "gone.zip"
    (tmp_path / "a.zip").rename(gone)
    with ArchiveFeed(found.archive, names) as feed:  # every member meets the open's error at its turn
        for n in names:
            with pytest.raises(FileNotFoundError):
                feed.next(n)


@pytest.mark.slow
def test_a_pseudonymized_archive_ingest_leaves_no_member_name_or_id_behind(
    archive_of_synth: Path, synth_small, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from shards.__main__ import main as shards_main
    from tests.test_privacy import _key

    key = _key(tmp_path / "key")
    out = tmp_path / "ds"
    assert ingest_main(_args(synth_small, archive_of_synth, out, "--workers", "1", "--pseudonymize", str(key))) == 0
    secrets = [archive_of_synth.name.encode(), TRAIN_MEMBERS.encode()]
    secrets += [r.patient_id.encode() for r in synth_small.records]
    for path in (p for p in out.rglob("*") if p.is_file() and p.name != "rejects.jsonl"):
        data = path.read_bytes()
        assert not [s for s in secrets if s in data], path
    argv = ["verify", str(out), "--source", str(archive_of_synth), "--members", TRAIN_MEMBERS,
            "--labels", str(synth_small.labels_csv), "--pseudonymize", str(key), "--workers", "1", "--no-progress"]
    assert shards_main(argv) == 0, capsys.readouterr().out
