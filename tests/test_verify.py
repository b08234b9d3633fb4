"""``python -m shards verify``: a clean dataset passes, and a matrix of damage is each caught,
with the right shard and key named."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shards.__main__ import main as shards_main
from shards.labels import LabelTable, read_labels, write_labels
from shards.manifest import read_manifest
from shards.reader import ShardChecksumError, iter_samples
from shards.report import CHECKS, Problem
from shards.scan import scan_shard
from shards.verify import VerifyConfig, VerifyUsageError, verify
from shards.writer import ShardWriter

ANY = "*"
"""In an expected problem: any shard / key (including none)."""


@dataclasses.dataclass(frozen=True)
class Built:
    """The module's dataset: an ingest with rejects, its source folder and labels CSV."""

    ds: Path
    src: Path
    labels: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """14 synthetic DICOMs at 128 px (one truncated) + a junk .dcm + a label without image,
    ingested at 64 px into 4-sample shards: 13 samples, 2 file rejects, 1 label problem."""
    from ingest.pipeline import run_ingest
    from ingest.synth import make_dataset

    root = tmp_path_factory.mktemp("verify")
    synth = make_dataset(root / "synth", 14, seed=1, size=128, progress=False)
    src = synth.images_dir
    victim = sorted(src.glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:-3000])  # ends inside the pixel data
    (src / "junk.dcm").write_bytes(b"not a DICOM file, just text\n" * 10)
    labels = root / "labels.csv"
    labels.write_text(synth.labels_csv.read_text() + "ghost-patient,,,,,0\n")
    ds = root / "ds"
    run_ingest(synth.ingest_config(ds, labels=labels, size=64, shard_size=4, workers=1, val_fraction=0.25))
    return Built(ds, src, labels)


@pytest.fixture
def work(built: Built, tmp_path: Path) -> Built:
    """A private copy of the dataset and its source, free to damage."""
    shutil.copytree(built.ds, tmp_path / "ds")
    shutil.copytree(built.src, tmp_path / "src")
    shutil.copy(built.labels, tmp_path / "labels.csv")
    return Built(tmp_path / "ds", tmp_path / "src", tmp_path / "labels.csv")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = shards_main(["verify", *args, "--workers", "1", "--no-progress"])
    return code, capsys.readouterr().out


def _mode_args(mode: str, b: Built) -> list[str]:
    return {
        "quick": [str(b.ds)],
        "deep": [str(b.ds), "--deep"],
        "source": [str(b.ds), "--source", str(b.src), "--labels", str(b.labels)],
        "all": [str(b.ds), "--deep", "--source", str(b.src), "--labels", str(b.labels)],
    }[mode]


# --------------------------------------------------------------------------- damage helpers


def _shard(b: Built, index: int = 1, split: str = "train") -> Path:
    return b.ds / "shards" / f"{split}-{index:06d}.tar"


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(b: Built, edit: Callable[[dict[str, Any]], None]) -> None:
    path = b.ds / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m, indent=2, sort_keys=True))


def _table_without_row(t: LabelTable, r: int) -> LabelTable:
    keep = np.arange(len(t)) != r
    boxes = [t.boxes_of(i) for i in range(len(t)) if i != r]
    offsets = np.zeros(len(boxes) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in boxes], out=offsets[1:])
    cols = {f.name: getattr(t, f.name)[keep] for f in dataclasses.fields(t) if f.name not in ("boxes", "box_offsets")}
    return LabelTable(**cols, boxes=np.concatenate(boxes).astype(np.float32).reshape(-1, 4), box_offsets=offsets)


def flip_image_pixel(b: Built) -> dict[str, str]:
    m = _members(_shard(b))[2]  # the second sample's .npy
    _flip(_shard(b), m.offset_data + 128 + 1000)  # past the 128-byte .npy header: a pixel
    return {"shard": _shard(b).name, "key": m.name.split(".")[0]}


def flip_image_header(b: Built) -> dict[str, str]:
    m = _members(_shard(b))[2]
    _flip(_shard(b), m.offset_data + 1)  # inside the .npy magic string
    return {"shard": _shard(b).name, "key": m.name.split(".")[0]}


def flip_json(b: Built) -> dict[str, str]:
    m = _members(_shard(b))[3]  # the second sample's .json
    _flip(_shard(b), m.offset_data)  # '{' -> 'z'
    return {"shard": _shard(b).name, "key": m.name.split(".")[0]}


def flip_tar_header(b: Built) -> dict[str, str]:
    m = _members(_shard(b))[3]
    _flip(_shard(b), m.offset + 140)  # inside the mtime field: the header checksum no longer holds
    return {"shard": _shard(b).name, "key": m.name.split(".")[0]}


def truncate_shard(b: Built) -> dict[str, str]:
    m = _members(_shard(b))[4]  # the third sample's .npy
    path = _shard(b)
    path.write_bytes(path.read_bytes()[: m.offset_data + 2000])  # inside its pixels
    return {"shard": path.name, "key": m.name.split(".")[0]}


def delete_shard(b: Built) -> dict[str, str]:
    _shard(b).unlink()
    return {"shard": _shard(b).name}


def extra_shard(b: Built) -> dict[str, str]:
    extra = _shard(b, 9)
    shutil.copy(_shard(b), extra)
    return {"shard": extra.name}


def rename_shard(b: Built) -> dict[str, str]:
    _shard(b).rename(_shard(b, 7))
    return {"shard": _shard(b).name, "new": _shard(b, 7).name}


def duplicate_key(b: Built) -> dict[str, str]:
    """Rewrite train-000001 with its last sample swapped for the first sample of
    train-000000; fix the manifest's sha256, size, last key and split counts to match."""
    first = next(iter_samples(_shard(b, 0)))
    samples = list(iter_samples(_shard(b, 1)))
    dropped = samples[-1]
    samples[-1] = first
    with ShardWriter(_shard(b, 1)) as w:
        for s in samples:
            w.write(s.key, s.image, s.meta)
    res = w.result
    assert res is not None

    def edit(m: dict[str, Any]) -> None:
        info = next(s for s in m["shards"] if s["name"] == res.name)
        info.update(sha256=res.sha256, bytes=res.bytes, last_key=res.last_key, xxh3=res.xxh3)
        for c in (m["counts"]["train"], m["counts"]):
            c["positives"] += (first.meta["target"] == 1) - (dropped.meta["target"] == 1)
            c["boxes"] += len(first.meta["boxes"]) - len(dropped.meta["boxes"])

    _edit_manifest(b, edit)
    return {"shard": _shard(b, 1).name, "key": first.key}


def _edit_digest(b: Built, member: int) -> dict[str, str]:
    """Change the manifest's digest of one member (0: .npy, 1: .json) of train-000001's second sample."""
    name = _shard(b).name

    def edit(m: dict[str, Any]) -> None:
        pair = next(s for s in m["shards"] if s["name"] == name)["xxh3"][1]
        pair[member] = "0" * len(pair[member])

    _edit_manifest(b, edit)
    return {"shard": name, "key": _members(_shard(b))[2].name.split(".")[0]}


def edit_manifest_npy_digest(b: Built) -> dict[str, str]:
    return _edit_digest(b, 0)


def edit_manifest_json_digest(b: Built) -> dict[str, str]:
    return _edit_digest(b, 1)


def replace_shard_keep_digests(b: Built) -> dict[str, str]:
    """Rewrite train-000001 with one pixel of its second sample changed, and record the new
    file's sha256 and size in the manifest but not its per-sample digests."""
    samples = list(iter_samples(_shard(b)))
    image = samples[1].image.copy()
    image[10, 10] ^= 0x01
    with ShardWriter(_shard(b)) as w:
        for i, s in enumerate(samples):
            w.write(s.key, image if i == 1 else s.image, s.meta)
    res = w.result
    assert res is not None

    def edit(m: dict[str, Any]) -> None:
        next(s for s in m["shards"] if s["name"] == res.name).update(sha256=res.sha256, bytes=res.bytes)

    _edit_manifest(b, edit)
    return {"shard": res.name, "key": samples[1].key}


def change_label_box(b: Built) -> dict[str, str]:
    t = read_labels(b.ds / "labels.zarr")
    r = int(np.flatnonzero(np.diff(t.box_offsets) > 0)[0])
    t.boxes[t.box_offsets[r]] += np.float32(3.0)
    write_labels(b.ds / "labels.zarr", t)
    return {"shard": read_manifest(b.ds).shards[int(t.shard[r])].name, "key": str(t.key[r])}


def drop_label_row(b: Built) -> dict[str, str]:
    t = read_labels(b.ds / "labels.zarr")
    r = 5
    write_labels(b.ds / "labels.zarr", _table_without_row(t, r))
    return {"shard": read_manifest(b.ds).shards[int(t.shard[r])].name, "key": str(t.key[r])}


def edit_manifest_params(b: Built) -> dict[str, str]:
    _edit_manifest(b, lambda m: m["params"].update(clahe_clip=3.0))
    return {}


def edit_manifest_sha(b: Built) -> dict[str, str]:
    def edit(m: dict[str, Any]) -> None:
        m["shards"][1]["sha256"] = "0" * 64

    _edit_manifest(b, edit)
    return {"shard": _shard(b).name}


def edit_manifest_counts(b: Built) -> dict[str, str]:
    _edit_manifest(b, lambda m: m["counts"]["train"].update(samples=m["counts"]["train"]["samples"] + 1))
    return {}


def manifest_bad_types(b: Built) -> dict[str, str]:
    def edit(m: dict[str, Any]) -> None:
        m["shards"][1]["samples"] = "four"
        m["shards"][2]["name"] = ["train-000002.tar"]

    _edit_manifest(b, edit)
    return {"shard": _shard(b).name}


def manifest_not_json(b: Built) -> dict[str, str]:
    (b.ds / "manifest.json").write_text('{"format_version": 1, "shards": [')
    return {}


def _sample_source(b: Built) -> tuple[str, str, str]:
    """(shard, key, source path) of the first sample of train-000001."""
    s = next(iter_samples(_shard(b)))
    return _shard(b).name, s.key, s.meta["source"]["path"]


def delete_source(b: Built) -> dict[str, str]:
    shard, key, rel = _sample_source(b)
    (b.src / rel).unlink()
    return {"shard": shard, "key": key}


def alter_source(b: Built) -> dict[str, str]:
    shard, key, rel = _sample_source(b)
    _flip(b.src / rel, (b.src / rel).stat().st_size - 100)  # same size, other bytes
    return {"shard": shard, "key": key}


def add_source(b: Built) -> dict[str, str]:
    shutil.copy(b.src / "junk.dcm", b.src / "late.dcm")
    return {}


def no_damage(b: Built) -> dict[str, str]:
    return {}


# --------------------------------------------------------------------------- the matrix


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    damage: Callable[[Built], dict[str, str]]
    mode: str
    """quick, deep, source (quick + --source + --labels) or all (deep + source)."""
    exit: int
    expect: tuple[tuple[str, str | None, str | None], ...]
    """(check, shard, key) that must each match a problem; ``{shard}``/``{key}`` are filled from
    what the damage returned; the set of checks reported must be exactly these."""


CASES = [
    Case("clean-quick", no_damage, "quick", 0, ()),
    Case("clean-deep", no_damage, "deep", 0, ()),
    Case("clean-source", no_damage, "all", 0, ()),
    Case("image-pixel-quick", flip_image_pixel, "quick", 1,
         (("shard_sha256", "{shard}", None), ("sample_xxh3", "{shard}", "{key}"))),
    Case("image-pixel-deep", flip_image_pixel, "deep", 1,
         (("shard_sha256", "{shard}", None), ("sample_xxh3", "{shard}", "{key}"))),
    Case("image-npy-header-deep", flip_image_header, "deep", 1,
         (("shard_sha256", "{shard}", None), ("image", "{shard}", "{key}"), ("sample_xxh3", "{shard}", "{key}"))),
    Case("json-byte-quick", flip_json, "quick", 1,
         (("shard_sha256", "{shard}", None), ("meta", "{shard}", "{key}"), ("sample_xxh3", "{shard}", "{key}"))),
    Case("json-byte-deep", flip_json, "deep", 1,
         (("shard_sha256", "{shard}", None), ("meta", "{shard}", "{key}"), ("sample_xxh3", "{shard}", "{key}"))),
    Case("tar-header-quick", flip_tar_header, "quick", 1,
         (("shard_sha256", "{shard}", None), ("tar_header", "{shard}", "{key}"))),
    Case("truncated-quick", truncate_shard, "quick", 1,
         (("shard_size", "{shard}", None), ("tar_truncated", "{shard}", "{key}"))),
    Case("deleted-quick", delete_shard, "quick", 1, (("shard_missing", "{shard}", None),)),
    Case("deleted-deep", delete_shard, "deep", 1, (("shard_missing", "{shard}", None),)),
    Case("extra-quick", extra_shard, "quick", 1, (("shard_unlisted", "{shard}", None),)),
    Case("renamed-quick", rename_shard, "quick", 1,
         (("shard_missing", "{shard}", None), ("shard_unlisted", "{new}", None))),
    Case("duplicate-key-quick", duplicate_key, "quick", 1, (("duplicate_key", "{shard}", "{key}"),)),
    Case("label-box-deep", change_label_box, "deep", 1, (("labels_mismatch", "{shard}", "{key}"),)),
    Case("label-box-quick", change_label_box, "quick", 0, ()),  # labels.zarr is a deep check
    Case("label-row-missing-deep", drop_label_row, "deep", 1,
         (("labels_row_missing", "{shard}", "{key}"), ("labels_count", None, None))),
    Case("manifest-params-quick", edit_manifest_params, "quick", 1, (("params_hash", None, None),)),
    Case("manifest-sha-quick", edit_manifest_sha, "quick", 1, (("shard_sha256", "{shard}", None),)),
    Case("manifest-npy-digest-quick", edit_manifest_npy_digest, "quick", 1, (("sample_xxh3", "{shard}", "{key}"),)),
    Case("manifest-json-digest-quick", edit_manifest_json_digest, "quick", 1, (("sample_xxh3", "{shard}", "{key}"),)),
    Case("manifest-json-digest-deep", edit_manifest_json_digest, "deep", 1, (("sample_xxh3", "{shard}", "{key}"),)),
    Case("shard-replaced-sha-recomputed-quick", replace_shard_keep_digests, "quick", 1,
         (("sample_xxh3", "{shard}", "{key}"),)),
    Case("manifest-counts-quick", edit_manifest_counts, "quick", 1, (("manifest_counts", None, None),)),
    Case("manifest-not-json-quick", manifest_not_json, "quick", 1, (("manifest_unreadable", None, None),)),
    Case("manifest-bad-types-quick", manifest_bad_types, "quick", 1,
         (("manifest_field", "{shard}", None), ("manifest_field", None, None))),
    Case("source-deleted", delete_source, "source", 1,
         (("source_missing", "{shard}", "{key}"), ("source_fingerprint", None, None))),
    Case("source-altered", alter_source, "source", 1, (("source_sha256", "{shard}", "{key}"),)),
    Case("source-added", add_source, "source", 1,
         (("source_unaccounted", None, None), ("source_fingerprint", None, None))),
]


def _matches(problem: dict[str, Any], check: str, shard: str | None, key: str | None) -> bool:
    return (problem["check"] == check and (shard == ANY or problem["shard"] == shard)
            and (key == ANY or problem["key"] == key))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corruption_matrix(case: Case, work: Built, capsys: pytest.CaptureFixture[str]) -> None:
    names = case.damage(work)
    report_path = work.ds.parent / "report.json"
    code, out = _run([*_mode_args(case.mode, work), "--json", str(report_path)], capsys)
    report = json.loads(report_path.read_text())
    assert code == case.exit, out
    assert report["ok"] == (case.exit == 0)
    problems = report["problems"]
    assert len(out.splitlines()) == len(problems) + 2  # one line per problem, then the summary
    assert out.splitlines()[-1].startswith("OK" if case.exit == 0 else "FAILED")
    for check, shard, key in case.expect:
        shard = shard.format(**names) if shard else None
        key = key.format(**names) if key else None
        found = next((p for p in problems if _matches(p, check, shard, key)), None)
        assert found is not None, (check, shard, key, out)
        assert Problem(**found).line() in out.splitlines()  # printed as one line naming its shard and key
    assert {p["check"] for p in problems} == {c for c, _, _ in case.expect}, out
    assert all(p["check"] in CHECKS for p in problems)


def test_dask_workers_give_the_same_report(work: Built, capsys: pytest.CaptureFixture[str]) -> None:
    names = flip_json(work)
    delete_source(work)
    cfg = dict(out=work.ds, deep=True, source=work.src, labels=work.labels, progress=False)
    one = verify(VerifyConfig(**cfg, workers=1))
    two = verify(VerifyConfig(**cfg, workers=2))
    assert two.workers == 2 and not two.ok
    assert sorted(p.line() for p in one.problems) == sorted(p.line() for p in two.problems)
    assert any(p.check == "meta" and p.key == names["key"] for p in two.problems)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.mkdir(), "holds no dataset"),
        (lambda p: p.write_text("x"), "not a folder"),
    ],
    ids=["missing", "empty-folder", "a-file"],
)
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup, message: str) -> None:
    out = tmp_path / "out"
    setup(out)
    assert shards_main(["verify", str(out), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    with pytest.raises(VerifyUsageError):
        verify(VerifyConfig(out=out, workers=1, progress=False))


def test_bad_labels_csv_is_a_usage_error(work: Built, capsys: pytest.CaptureFixture[str]) -> None:
    bad = work.ds.parent / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert shards_main(["verify", str(work.ds), "--labels", str(bad), "--workers", "1", "--no-progress"]) == 2
    assert "lacks column" in capsys.readouterr().err


def test_config_rejects_zero_workers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers=0"):
        VerifyConfig(out=tmp_path, workers=0)


def test_scan_hashes_every_byte_once(built: Built) -> None:
    import hashlib

    for path in sorted((built.ds / "shards").iterdir()):
        scan = scan_shard(path, deep=True, size=64)
        assert scan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert scan.bytes == path.stat().st_size and scan.complete and not scan.problems


def test_scan_hashes_each_sample_as_the_writer_did(built: Built) -> None:
    for info in read_manifest(built.ds).shards:
        path = built.ds / "shards" / info.name
        assert scan_shard(path, digests=True).xxh3 == list(info.xxh3)
        assert scan_shard(path).xxh3 is None  # not asked: nothing hashed but the sha256


@pytest.mark.parametrize(("damage", "member"), [
    (edit_manifest_npy_digest, "npy"),
    (edit_manifest_json_digest, "json"),
    (replace_shard_keep_digests, "npy"),
], ids=["manifest-npy", "manifest-json", "shard-replaced"])
def test_a_digest_mismatch_is_one_line_naming_shard_sample_and_member(
        damage: Callable[[Built], dict[str, str]], member: str, work: Built) -> None:
    names = damage(work)
    report = verify(VerifyConfig(out=work.ds, workers=1, progress=False))
    assert not report.ok and report.to_json()["problems_by_check"] == {"sample_xxh3": 1}
    [p] = report.problems
    assert (p.shard, p.key) == (names["shard"], names["key"])
    assert p.line().startswith(f"{names['shard']} key {names['key']}: sample 1 .{member} hashes to xxh3 ")
    assert "the loader refuses this sample" in p.line() and p.expected is not None


@pytest.mark.parametrize(("damage", "checks"), [
    (no_damage, set()),
    (flip_image_pixel, {"shard_sha256"}),
    (flip_json, {"shard_sha256", "meta"}),
], ids=["clean", "image-pixel", "json-byte"])
def test_a_format_1_dataset_has_no_digests_to_check(
        damage: Callable[[Built], dict[str, str]], checks: set[str], work: Built) -> None:
    """Quick mode only: ``as_format_1`` rewrites the manifest alone, so the samples' JSON keeps
    the fields of the current format, which deep mode would report."""
    from tests.formats import as_format_1

    damage(work)
    as_format_1(work.ds)
    assert all(s.xxh3 is None for s in read_manifest(work.ds).shards)
    report = verify(VerifyConfig(out=work.ds, workers=1, progress=False))
    assert {p.check for p in report.problems} == checks, report.lines()


def test_reader_flipped_byte_raises_checksum_error_naming_the_shard(work: Built) -> None:
    flip_image_pixel(work)
    info = read_manifest(work.ds).shards[1]
    with pytest.raises(ShardChecksumError) as err:
        for _ in iter_samples(work.ds / "shards" / info.name, expected_sha256=info.sha256, size=64):
            pass
    assert err.value.shard == info.name and info.name in str(err.value)


def _tar(path: Path, members: list[tuple[str, bytes | None]], trailer: bytes = b"") -> Path:
    """A tar of (name, data) members; data None makes a directory entry."""
    import io

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if trailer:
        with open(path, "ab") as f:
            f.write(trailer)
    return path


def _npy() -> bytes:
    from shards.format import encode_image

    return encode_image(np.zeros((8, 8), np.uint8))


def _json(key: str) -> bytes:
    return json.dumps({"key": key, "split": "train", "target": 0, "boxes": []}).encode()


LONG_KEY = "k" * 128  # its member names exceed 100 bytes: the tar needs pax headers


@pytest.mark.parametrize(
    "members, trailer, expect_checks, keys",
    [
        ([("a.npy", _npy()), ("a.json", _json("a")), (f"{LONG_KEY}.npy", _npy()), (f"{LONG_KEY}.json", _json(LONG_KEY))],
         b"", set(), ["a", LONG_KEY]),
        ([("../a.npy", _npy()), ("a.json", _json("a"))], b"", {"member_name", "pairing"}, []),
        ([("/abs.npy", _npy())], b"", {"member_name"}, []),
        ([("a.npy", _npy()), ("a.txt", b"x"), ("a.json", _json("a"))], b"", {"tar_member"}, ["a"]),
        ([("d", None), ("a.npy", _npy()), ("a.json", _json("a"))], b"", {"tar_member"}, ["a"]),
        ([("a.npy", _npy()), ("b.npy", _npy()), ("b.json", _json("b"))], b"", {"pairing"}, ["b"]),
        ([("a.npy", _npy()), ("a.npy", _npy()), ("a.json", _json("a"))], b"", {"pairing"}, ["a"]),
        ([("a.npy", _npy()), ("a.json", _json("a")), ("b.npy", _npy()), ("b.json", _json("b")),
          ("a.npy", _npy()), ("a.json", _json("a"))], b"", {"duplicate_key"}, ["a", "b", "a"]),
        ([("a.npy", _npy()), ("a.json", _json("b"))], b"", {"meta"}, ["a"]),
        ([("a.npy", _npy()), ("a.json", _json("a"))], b"junk", {"tar_trailer"}, ["a"]),
    ],
    ids=["clean-with-pax-names", "dotdot", "absolute", "foreign-member", "directory", "lone-npy", "npy-twice",
         "key-twice-in-shard", "json-names-other-key", "junk-after-end"],
)
def test_scan_structure(tmp_path: Path, members, trailer: bytes, expect_checks: set[str], keys: list[str]) -> None:
    scan = scan_shard(_tar(tmp_path / "s.tar", members, trailer), split="train", deep=True, size=8)
    assert {p.check for p in scan.problems if p.check not in ("meta_fields", "meta_value", "transform")} == expect_checks
    assert scan.keys == keys
    assert scan.complete


# --------------------------------------------------------------------------- every bad field at once


@pytest.mark.parametrize(("edit", "lines"), [
    pytest.param(lambda m: m["shards"][1].update(split="tr", bytes=-5),
                 ["train-000001.tar: split 'tr' (expected one of ['train', 'val'])",
                  "train-000001.tar: bytes -5 (expected a non-negative integer)"], id="two-fields-of-one-shard"),
    pytest.param(lambda m: (m["params"].update(size="big"), m["shards"][0].update(sha256="ABC")),
                 ["manifest: params.size 'big' (expected a positive integer)",
                  "train-000000.tar: sha256 'ABC' (expected 64 lowercase hex digits)"], id="params-and-a-shard"),
    pytest.param(lambda m: (m["params"].pop("clahe_clip"), m["params"].pop("clahe_grid")),
                 ["manifest: params lack ['clahe_clip', 'clahe_grid']"], id="two-missing-params"),
])
def test_manifest_reports_every_bad_field_naming_field_value_and_shard(
    work: Built, capsys: pytest.CaptureFixture[str], edit: Callable[[dict[str, Any]], Any], lines: list[str],
) -> None:
    _edit_manifest(work, edit)
    code, out = _run([str(work.ds)], capsys)
    assert code == 1
    for line in lines:
        assert line in out.splitlines(), out


def test_sample_json_reports_every_bad_field(tmp_path: Path) -> None:
    good = {"key": "a", "patient_id": "a", "source": {"path": "a.dcm", "sha256": "0" * 64}, "split": "train",
            "target": 0, "class": "Normal", "boxes": [], "view_position": "PA", "sex": "F", "age": 40, "qa": [],
            "transform": {"scale": 1.0, "pad_x": 0, "pad_y": 0, "rows": 8, "cols": 8, "size": 8}}

    def scan(meta: dict[str, Any], name: str) -> list[str]:
        path = _tar(tmp_path / name, [("a.npy", _npy()), ("a.json", json.dumps(meta).encode())])
        return [p.line() for p in scan_shard(path, split="train", deep=True, size=8).problems]

    assert scan(good, "good.tar") == []
    assert scan({**good, "target": True, "sex": 3, "age": 200}, "bad.tar") == [
        "bad.tar key a: target True (expected -1, 0 or 1)",
        "bad.tar key a: sex 3 (expected a string or null)",
        "bad.tar key a: age 200 (expected an integer 0..130 or null)",
    ]
