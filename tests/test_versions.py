"""Dataset versions: ``OUT@vN``, ``python -m shards versions|gc|withdraw``, erasure."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shards.__main__ import main as shards_main
from shards.cache import ShardCache, drop_unlisted
from shards.local_copy import local_copy
from shards.origin import open_origin
from shards.format import FORMAT_VERSION, FormatError, key_for
from shards.labels import STRING_FIELDS, read_labels
from shards.manifest import LABELS_NAME, MANIFEST_NAME, SHARDS_DIR, Manifest, manifest_sha256, read_manifest
from shards.store import open_store, read_labels_from, read_manifest_from
from shards.versions import (
    VERSIONS_DIR,
    VersionNotFoundError,
    VersionUnavailableError,
    read_record,
    recorded_shards,
    split_version,
)
from shards.withdraw import WithdrawError, withdraw


def _epoch(location) -> tuple[list[str], np.ndarray]:
    from train.data import ShardLoader, read_split

    info = read_split(open_origin(location), "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=2, workers=0)
    batches = list(loader.epoch(0))
    return [k for b in batches for k in b.keys], np.concatenate([b.images.numpy() for b in batches])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def other_synth(tmp_path_factory):
    """8 other patients' files and labels."""
    from ingest.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("other") / "rsna", 8, seed=7, size=128, progress=False)


OPTIONS = {"size": 64, "shard_size": 4, "val_fraction": 0.25}


@pytest.fixture(scope="module")
def other_ingest(other_synth, tmp_path_factory) -> Path:
    """``other_synth`` ingested with the parameters of ``ingested_small``."""
    from ingest.pipeline import run_ingest

    out = tmp_path_factory.mktemp("other-ds") / "ds"
    run_ingest(other_synth.ingest_config(out, workers=1, **OPTIONS))
    return out


@pytest.fixture(scope="module")
def two_versions(ingested_small, other_synth, tmp_path_factory):
    """A copy of ``ingested_small`` (its epoch read before anything changed), then a second
    version that appends ``other_synth``'s files (``python -m ingest --append``)."""
    from ingest.append import run_append

    out = tmp_path_factory.mktemp("versions") / "ds"
    shutil.copytree(ingested_small, out)
    before = _epoch(out)
    shard_bytes = {p.name: _sha(p) for p in (out / SHARDS_DIR).iterdir()}
    run_append(other_synth.ingest_config(out, workers=1, append=True, **OPTIONS))
    return out, before, shard_bytes


@pytest.fixture
def dataset(ingested_small, tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(ingested_small, out)
    return out


@pytest.mark.parametrize("given, expected", [
    ("s3://bkt/ds@v3", ("s3://bkt/ds", 3)),
    ("https://alice:pw@host/ds", ("https://alice:pw@host/ds", None)),
    ("https://alice:pw@host/ds@v12", ("https://alice:pw@host/ds", 12)),
    ("/data/ds", ("/data/ds", None)),
    ("/data/ds@v0001", ("/data/ds", 1)),
    ("/data/ds@vx", ("/data/ds@vx", None)),
    (Path("/data/ds@v2"), (Path("/data/ds"), 2)),
])
def test_split_version_takes_only_a_trailing_at_v_digits(given, expected):
    assert split_version(given) == expected


def test_version_zero_is_refused():
    with pytest.raises(VersionNotFoundError, match="numbered from 1"):
        split_version("ds@v0")


@pytest.mark.parametrize("format_version, ok", [(1, True), (FORMAT_VERSION, True), (0, False),
                                                 (FORMAT_VERSION + 1, False), ("2", False)])
def test_manifest_reader_accepts_every_format_version_up_to_the_current(ingested_small, format_version, ok):
    data = json.loads((ingested_small / MANIFEST_NAME).read_text())
    data["format_version"] = format_version
    if format_version == 1:
        data.pop("version", None)  # format 1 had no version number: version 1 of itself
    if ok:
        assert Manifest.from_dict(data).version == 1
    else:
        with pytest.raises(FormatError, match="format_version"):
            Manifest.from_dict(data)


def test_a_version_reads_exactly_what_it_held(two_versions, ingested_small, other_ingest):
    out, (keys, images), _ = two_versions
    old, extra = read_manifest(ingested_small), read_manifest(other_ingest)
    assert read_manifest(out).version == 2
    v1 = read_manifest_from(open_store(f"{out}@v1"))
    assert v1.shards == old.shards and v1.counts == old.counts
    assert len(read_labels_from(open_store(f"{out}@v1"))) == old.counts["samples"]
    assert len(read_labels_from(open_store(out))) == old.counts["samples"] + extra.counts["samples"]
    again_keys, again_images = _epoch(f"{out}@v1")
    assert again_keys == keys
    np.testing.assert_array_equal(again_images, images)
    assert _epoch(out)[0] != keys  # the latest has more samples


def test_earlier_shards_keep_their_bytes_and_every_version_verifies(two_versions, capsys):
    out, _, shard_bytes = two_versions
    assert {n: _sha(out / SHARDS_DIR / n) for n in shard_bytes} == shard_bytes
    for name in (str(out), f"{out}@v1", f"{out}@v2"):
        assert shards_main(["verify", name, "--deep", "--workers", "1", "--no-progress"]) == 0, capsys.readouterr()
        assert shards_main(["stats", name]) == 0
    assert f"{out}@v1" in capsys.readouterr().out


def test_verify_of_a_version_checks_that_version_s_per_sample_digests(two_versions, tmp_path, capsys):
    out = tmp_path / "ds"
    shutil.copytree(two_versions[0], out)
    path = out / VERSIONS_DIR / "v0001.json"
    record = json.loads(path.read_text())
    shard = record["manifest"]["shards"][0]
    shard["xxh3"][0][1] = "0" * 32  # the first sample's .json, in version 1's manifest alone
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    report = tmp_path / "report.json"
    assert shards_main(["verify", f"{out}@v1", "--workers", "1", "--no-progress", "--json", str(report)]) == 1
    [problem] = json.loads(report.read_text())["problems"]
    assert (problem["check"], problem["shard"], problem["key"]) == ("sample_xxh3", shard["name"], shard["first_key"])
    assert f"{shard['name']} key {shard['first_key']}: sample 0 .json hashes to xxh3 " in capsys.readouterr().out
    assert shards_main(["verify", str(out), "--workers", "1", "--no-progress"]) == 0  # the latest's digests hold


def test_versions_lists_number_date_samples_and_change(two_versions, capsys):
    out, _, _ = two_versions
    assert shards_main(["versions", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "v1" and "first ingest" in lines[1]
    assert lines[2].split()[0] == "v2" and "append: added 8 patients, 8 samples" in lines[2]


def test_a_version_that_does_not_exist_is_a_one_line_usage_error(two_versions, capsys):
    out, _, _ = two_versions
    assert shards_main(["verify", f"{out}@v9", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such version" in err and "versions 1 to 2" in err


def test_stale_file_clean_up_keeps_every_kept_version_shard(two_versions, ingested_small, tmp_path):
    from ingest.pipeline import _remove_stale

    out = tmp_path / "ds"
    shutil.copytree(two_versions[0], out)
    assert recorded_shards(out) == {s.name for s in read_manifest(out).shards}
    (out / SHARDS_DIR / "train-000099.tar").write_bytes(b"stale")
    _remove_stale(out, {s.name for s in read_manifest(ingested_small).shards})  # a plan of version 1 alone
    assert sorted(p.name for p in (out / SHARDS_DIR).iterdir()) == sorted(recorded_shards(out))


def test_gc_only_says_what_it_would_delete_without_yes(two_versions, tmp_path, capsys):
    out = tmp_path / "ds"
    shutil.copytree(two_versions[0], out)
    stray = out / SHARDS_DIR / "train-000099.tar"
    stray.write_bytes(b"left by a killed change")
    assert shards_main(["gc", str(out), "--keep", "1"]) == 0
    said = capsys.readouterr().out
    assert "would delete shards/train-000099.tar" in said and "would drop versions v1" in said
    assert stray.exists() and read_record(out, 1).unavailable is None
    assert shards_main(["gc", str(out), "--keep", "1", "--yes"]) == 0
    assert not stray.exists() and read_record(out, 1).unavailable is not None
    assert shards_main(["verify", f"{out}@v1", "--no-progress"]) == 2
    assert "gc --keep 1" in capsys.readouterr().err
    assert shards_main(["verify", str(out), "--workers", "1", "--no-progress"]) == 0


def _every_byte(out: Path) -> list[tuple[str, bytes]]:
    """Each file under ``out`` as bytes, and each label store as its decoded strings."""
    found = []
    for path in sorted(out.rglob("*")):
        if path.is_file() and ".zarr" not in path.relative_to(out).as_posix():
            found.append((str(path), path.read_bytes()))
    for store in [out / LABELS_NAME, *sorted((out / VERSIONS_DIR).glob("*.zarr"))]:
        table = read_labels(store)
        found.append((str(store), "\n".join(str(v) for f in STRING_FIELDS for v in getattr(table, f)).encode()))
    return found


def test_withdraw_leaves_no_byte_of_the_patients_and_keeps_other_shards(dataset, capsys):
    table = read_labels(dataset / LABELS_NAME)
    first_of = {}
    for pid, shard in zip(table.patient_id, table.shard):
        first_of.setdefault(int(shard), str(pid))
    gone = [first_of[0], first_of[2]]  # in two shards
    before = {p.name: _sha(p) for p in (dataset / SHARDS_DIR).iterdir()}
    touched = {read_manifest(dataset).shards[i].name for i in (0, 2)}
    patients = dataset.parent / "withdraw.txt"
    patients.write_text("# consent withdrawn\n" + "\n".join(gone) + "\n")

    assert shards_main(["withdraw", str(dataset), "--patients", str(patients)]) == 0
    assert "version 2: withdrew 2 patients, 2 samples; 2 shards rewritten" in capsys.readouterr().out

    for where, data in _every_byte(dataset):
        for pid in gone:
            assert pid.encode() not in data and key_for(pid).encode() not in data, where
    after = {p.name: _sha(p) for p in (dataset / SHARDS_DIR).iterdir()}
    assert {n: h for n, h in before.items() if n not in touched} == {n: h for n, h in after.items() if n in before}
    assert not touched & set(after)
    assert len(set(after) - set(before)) <= len(gone)
    record = read_record(dataset, 2)
    assert (record.change.kind, record.change.patients, record.change.samples) == ("withdraw", 2, 2)
    assert record.manifest_sha256 == manifest_sha256(read_manifest(dataset))
    assert shards_main(["verify", str(dataset), "--deep", "--workers", "1", "--no-progress"]) == 0
    assert shards_main(["verify", f"{dataset}@v2", "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert shards_main(["verify", f"{dataset}@v1", "--no-progress"]) == 2
    assert "cannot be read or checked" in capsys.readouterr().err
    with pytest.raises(VersionUnavailableError, match="withdrew patients"):
        read_manifest_from(open_store(f"{dataset}@v1"))


def test_withdraw_drops_the_rejects_lines_of_the_patients(dataset):
    lines = [{"kind": "file", "path": "gone-1.dcm", "reason": "not_dicom", "detail": "no preamble"},
             {"kind": "label", "reason": "no_image", "detail": "labelled, no file", "patient_id": "gone-2",
              "path": None, "line": 3},
             {"kind": "file", "path": "gone-10.dcm", "reason": "not_dicom", "detail": "an id that contains one"}]
    (dataset / "rejects.jsonl").write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
    m = read_manifest(dataset)
    m.counts.update(rejects=2, rejects_by_reason={"not_dicom": 2}, label_problems=1,
                    label_problems_by_reason={"no_image": 1}, inputs=m.counts.get("inputs", 0) + 2)
    (dataset / MANIFEST_NAME).write_text(m.to_json())
    result = withdraw(dataset, ["gone-1", "gone-2"])
    assert (result.patients, result.samples, result.shards_rewritten) == (2, 0, 0)
    assert [json.loads(x)["path"] for x in (dataset / "rejects.jsonl").read_text().splitlines()] == ["gone-10.dcm"]
    counts = read_manifest(dataset).counts
    assert (counts["rejects"], counts["label_problems"]) == (1, 0)
    # v1 listed no withdrawn shard: it stays readable, its rejects without the lines
    assert read_record(dataset, 1).unavailable is None
    assert len(read_manifest_from(open_store(f"{dataset}@v1")).shards) == len(m.shards)
    assert "gone-1.dcm" not in (dataset / VERSIONS_DIR / "v0001.rejects.jsonl").read_text()


def test_withdraw_after_an_append_keeps_the_versions_that_never_held_them(two_versions, other_ingest,
                                                                         ingested_small, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(two_versions[0], out)
    pid = str(read_labels(other_ingest / LABELS_NAME).patient_id[0])
    result = withdraw(out, [pid])
    assert result.version == 3 and result.versions_unavailable == (2,)
    assert read_manifest_from(open_store(f"{out}@v1")).version == 1
    with pytest.raises(VersionUnavailableError):
        read_labels_from(open_store(f"{out}@v2"))
    with local_copy(f"{out}@v1") as (view, shown):
        assert shown == f"{out}@v1"
        assert read_manifest(view).counts == read_manifest(ingested_small).counts
        assert sorted(p.name for p in (view / SHARDS_DIR).iterdir()) == sorted(
            s.name for s in read_manifest(ingested_small).shards)


@pytest.mark.parametrize("patients, message", [
    ("", "no patient id"),
])
def test_a_patients_file_without_ids_is_a_one_line_usage_error(dataset, tmp_path, capsys, patients, message):
    f = tmp_path / "p.txt"
    f.write_text(patients)
    assert shards_main(["withdraw", str(dataset), "--patients", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_unknown_patients_change_nothing(dataset, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("nobody-here\n")
    assert shards_main(["withdraw", str(dataset), "--patients", str(f)]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert not (dataset / VERSIONS_DIR).exists()


def test_a_pseudonymized_dataset_needs_its_key(dataset):
    m = read_manifest(dataset)
    m.source["pseudonym"] = {"scheme": "hmac-sha256", "key_fingerprint": "0" * 32}
    (dataset / MANIFEST_NAME).write_text(m.to_json())
    with pytest.raises(WithdrawError, match="needs the --pseudonymize KEYFILE"):
        withdraw(dataset, ["anyone"])


def test_the_node_cache_drops_shards_only_unavailable_versions_list(dataset, tmp_path):
    cache = ShardCache(tmp_path / "cache")
    store = open_store(dataset)
    manifest = read_manifest(dataset)
    for shard in manifest.shards:
        with cache.hold(store, shard):
            pass
    pid = str(read_labels(dataset / LABELS_NAME).patient_id[0])
    withdraw(dataset, [pid])
    assert drop_unlisted(cache, open_store(dataset)) == 1
    assert not cache.path_of(manifest.shards[0]).exists()
    assert all(cache.path_of(s).exists() for s in manifest.shards[1:])


@pytest.mark.parametrize("pseudonymize", [False, True], ids=["plain", "pseudonymized"])
def test_withdraw_erases_every_name_of_a_hospital_patient(tmp_path, capsys, pseudonymize):
    from ingest.config import IngestConfig
    from ingest.pipeline import run_ingest
    from shards.pseudonym import Pseudonymizer
    from tests.test_privacy import KEY, _hospital_export, _key, _markers

    dicoms, labels = _hospital_export(tmp_path, "name")
    key = _key(tmp_path / "key") if pseudonymize else None
    out = tmp_path / "out"
    run_ingest(IngestConfig(dicom_dir=dicoms, out=out, labels=labels, size=64, shard_size=2, workers=1,
                            val_fraction=0.34, progress=False, pseudonymize=key))
    gone = _markers(0)
    names = {gone["file_name"], gone["patient_id_tag"], key_for(gone["file_name"])}
    if pseudonymize:
        names.add(Pseudonymizer(KEY).patient(gone["file_name"]))
    patients = tmp_path / "withdraw.txt"
    patients.write_text(gone["file_name"] + "\n")
    args = ["withdraw", str(out), "--patients", str(patients)]
    if pseudonymize:
        wrong = _key(tmp_path / "other", KEY + b"2")
        assert shards_main([*args, "--pseudonymize", str(wrong)]) == 2
        assert "not the key the dataset was made with" in capsys.readouterr().err
        args += ["--pseudonymize", str(key)]
    assert shards_main(args) == 0
    assert "withdrew 1 patients, 1 samples" in capsys.readouterr().out
    for where, data in _every_byte(out):
        for name in names:
            assert name.encode() not in data, (where, name)
    assert shards_main(["verify", str(out), "--deep", "--workers", "1", "--no-progress"]) == 0


def test_a_change_keeps_the_dataset_format_and_numbers_its_version(dataset):
    from tests.formats import as_format_1

    as_format_1(dataset)
    withdraw(dataset, [str(read_labels(dataset / LABELS_NAME).patient_id[0])])
    m = read_manifest(dataset)
    assert (m.format_version, m.version) == (1, 2)  # the samples are copied as format 1 wrote them
    assert read_record(dataset, 1).manifest.format_version == 1


def test_a_run_records_its_version_and_resume_refuses_another(two_versions, tmp_path):
    from tests.conftest import train_cli
    from train.checkpoint import load_export
    from train.config import load_toml

    out = two_versions[0]
    run = tmp_path / "run"
    common = ["--out", str(run), "--task", "classify", "--strategy", "ddp", "--image-size", "64", "--batch-size", "4",
              "--eval-batch-size", "4", "--workers", "0", "--epochs", "1", "--ckpt-every", "2", "--seed", "3"]
    done = train_cli("--data", f"{out}@v1", *common, "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    v1 = read_manifest_from(open_store(f"{out}@v1"))
    data = load_toml(run / "config.toml")["data"]
    assert (data["path"], data["version"], data["manifest_sha256"]) == (f"{out}@v1", 1, manifest_sha256(v1))

    refused = train_cli("--out", str(run), "--resume", "--data", str(out))
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert f"{out}@v1" in line and f"{out}@v2" in line and "cannot resume" in line

    done = train_cli("--out", str(run), "--resume")  # config.toml names OUT@v1
    assert done.returncode == 0, done.stderr[-3000:]
    exported = load_export(run)["config"]["data"]
    assert (exported["version"], exported["manifest_sha256"]) == (1, manifest_sha256(v1))


def test_lifecycle_bench_section_withdraws_one_shard_per_patient(dataset):
    import argparse

    from shards.bench_common import BenchData
    from shards.lifecycle_bench import lifecycle_section

    files = sorted((dataset / SHARDS_DIR).iterdir())
    data = BenchData(out=dataset, shard_files=files, samples=24, bytes=0, cores=1)
    sec = lifecycle_section(data, argparse.Namespace(withdraw=3))
    rows = {r[0]: r[1] for r in sec.rows}
    assert rows["patients withdrawn"] == "3" and rows["shards rewritten"] == "3" and rows["verify of the new version"] == "OK"
    assert "PASS" in sec.notes[-1]
    assert not (dataset / VERSIONS_DIR).exists()  # the section works on a copy


def test_a_withdrawal_stopped_after_its_version_finishes_when_run_again(dataset, tmp_path, monkeypatch, capsys):
    import shards.withdraw

    pid = str(read_labels(dataset / LABELS_NAME).patient_id[0])
    replaced = read_manifest(dataset).shards[0].name
    real = shards.withdraw._erase_from_earlier

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped between writing version 2 and erasing version 1

    monkeypatch.setattr(shards.withdraw, "_erase_from_earlier", killed)
    with pytest.raises(KeyboardInterrupt):
        withdraw(dataset, [pid])
    assert read_manifest(dataset).version == 2 and (dataset / SHARDS_DIR / replaced).exists()
    monkeypatch.setattr(shards.withdraw, "_erase_from_earlier", real)
    patients = tmp_path / "p.txt"
    patients.write_text(pid + "\n")
    assert shards_main(["withdraw", str(dataset), "--patients", str(patients)]) == 0
    said = capsys.readouterr().out
    assert "version 2: finished its interrupted withdrawal" in said and "nothing changed" not in said
    assert read_manifest(dataset).version == 2 and not (dataset / SHARDS_DIR / replaced).exists()
    assert read_record(dataset, 1).unavailable is not None
    for where, data in _every_byte(dataset):
        assert pid.encode() not in data, where
    assert shards_main(["verify", str(dataset), "--workers", "1", "--no-progress"]) == 0


def test_show_takes_a_version(two_versions, other_ingest, tmp_path, capsys):
    out = two_versions[0]
    old_key = str(read_labels(out / VERSIONS_DIR / "v0001.labels.zarr").key[0])
    new_key = str(read_labels(other_ingest / LABELS_NAME).key[0])
    png = tmp_path / "s.png"
    assert shards_main(["show", f"{out}@v1", old_key, "-o", str(png)]) == 0 and png.stat().st_size > 0
    assert shards_main(["show", f"{out}@v2", new_key, "-o", str(png)]) == 0
    capsys.readouterr()
    assert shards_main(["show", f"{out}@v1", new_key, "-o", str(png)]) == 2  # not in version 1
    assert new_key in capsys.readouterr().err
