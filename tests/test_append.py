"""``python -m ingest --append``: new files as new shards in a new version."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.__main__ import main as ingest_main
from shards.__main__ import main as shards_main
from shards.manifest import SHARDS_DIR, read_manifest
from shards.seeds import split_hash
from shards.store import open_store, read_labels_from
from shards.versions import read_record
from tests.fault_injection import fault_env
from tests.procs import kill_after_shards
from tests.inputs import copy_into

REPO = Path(__file__).resolve().parents[1]

OPTIONS = {"size": 64, "shard_size": 4, "workers": 1, "val_fraction": 0.25}
FLAGS = ["--size", "64", "--shard-size", "4", "--workers", "1", "--val-fraction", "0.25", "--no-progress"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions(out: Path, capsys) -> list[str]:
    """The lines ``python -m shards versions OUT`` prints."""
    capsys.readouterr()
    assert shards_main(["versions", str(out)]) == 0
    return capsys.readouterr().out.splitlines()


def _parts(synth, root: Path, n: int) -> list[Path]:
    """``synth``'s images dealt into ``n`` folders, in name order."""
    files = sorted(synth.images_dir.glob("*.dcm"))
    return [copy_into(root / f"part{i + 1}", files[i::n]) for i in range(n)]


def _args(synth, dicom_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--dicom-dir", str(dicom_dir), "--labels", str(synth.labels_csv), "--class-info",
            str(synth.class_info_csv), "--out", str(out), *FLAGS, *extra]


def _rows(out: Path | str) -> dict[str, tuple]:
    """Each sample's key -> (patient, split, target, class, boxes)."""
    t = read_labels_from(open_store(out))
    return {str(t.key[i]): (str(t.patient_id[i]), str(t.split[i]), int(t.target[i]), int(t.class_id[i]),
                            t.boxes_of(i).tolist()) for i in range(len(t))}


@pytest.fixture(scope="module")
def appended(synth_small, tmp_path_factory):
    """The 24 files in one ingest, and in three parts: an ingest and two appends (shard
    hashes of each version taken before the next)."""
    from ingest.pipeline import run_ingest

    work = tmp_path_factory.mktemp("append")
    union = work / "union"
    run_ingest(synth_small.ingest_config(union, **OPTIONS))
    parts = _parts(synth_small, work / "in", 3)
    out = work / "ds"
    assert ingest_main(_args(synth_small, parts[0], out)) == 0
    hashes = [{p.name: _sha(p) for p in (out / SHARDS_DIR).iterdir()}]
    for part in parts[1:]:
        assert ingest_main(_args(synth_small, part, out, "--append")) == 0
        hashes.append({p.name: _sha(p) for p in (out / SHARDS_DIR).iterdir()})
    return union, out, parts, hashes


def test_three_appends_give_the_samples_boxes_and_targets_of_one_ingest(appended):
    union, out, _, _ = appended
    one, three = _rows(union), _rows(out)
    assert one.keys() == three.keys()
    for key in one:
        assert one[key][0] == three[key][0] and one[key][2:] == three[key][2:]
    # The first part's patients keep the split of their first ingest; each later one's is (seed, id).
    m = read_manifest(out)
    assert m.version == 3 and m.counts["samples"] == 24 == read_manifest(union).counts["samples"]
    assert m.counts["label_problems_by_reason"] == read_manifest(union).counts["label_problems_by_reason"]
    first = _rows(f"{out}@v1")
    for key, row in three.items():
        if key in first:
            assert row[1] == first[key][1]
        else:
            assert row[1] == ("val" if split_hash(0, row[0]) < 0.25 else "train")


def test_old_shards_keep_their_bytes_and_every_version_verifies(appended, capsys):
    _, out, _, hashes = appended
    now = {p.name: _sha(p) for p in (out / SHARDS_DIR).iterdir()}
    for before in hashes:
        assert {name: now[name] for name in before} == before
    added = [read_record(out, n).change.shards_added for n in (2, 3)]
    assert added[0] and added[1] and not set(added[0]) & set(hashes[0])
    for n in (1, 2, 3):
        assert shards_main(["verify", f"{out}@v{n}"]) == 0, capsys.readouterr()
    sources = read_manifest(out).source["sources"]
    assert len(sources) == 3 and len(set(sources)) == 3


def test_appending_the_same_files_again_skips_them_all(appended, synth_small, tmp_path, capsys):
    _, out, parts, _ = appended
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    capsys.readouterr()
    assert ingest_main(_args(synth_small, synth_small.images_dir, copy, "--append")) == 0
    text = capsys.readouterr().out
    assert "nothing to append" in text and "skipped 24 already ingested" in text
    assert read_manifest(copy).version == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--size", "96"], "size 64 -> 96"),
        (["--seed", "3"], "seed 0 -> 3"),
    ],
)
def test_an_append_with_other_parameters_is_exit_2_naming_them(appended, synth_small, tmp_path, capsys, flags, message):
    _, out, parts, _ = appended
    args = _args(synth_small, parts[0], out, "--append")
    args += flags  # the later flag wins
    capsys.readouterr()
    assert ingest_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_original_ingest_again_on_a_versioned_dataset_is_refused(appended, synth_small, capsys):
    _, out, parts, _ = appended
    capsys.readouterr()
    assert ingest_main(_args(synth_small, parts[0], out)) == 2
    err = capsys.readouterr().err
    assert "--append" in err and len(err.strip().splitlines()) == 1
    assert read_manifest(out).version == 3


def test_append_to_nothing_is_exit_2(synth_small, tmp_path, capsys):
    assert ingest_main(_args(synth_small, synth_small.images_dir, tmp_path / "none", "--append")) == 2
    assert "no dataset to append to" in capsys.readouterr().err


def test_a_new_file_of_a_patient_in_the_dataset_is_a_duplicate_key(appended, synth_small, tmp_path):
    _, out, parts, _ = appended
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    new = tmp_path / "new"
    new.mkdir()
    source = sorted(parts[0].glob("*.dcm"))[0]
    data = bytearray(source.read_bytes())
    data[-1] ^= 0xFF  # another file (another sha256) of the same patient
    (new / source.name).write_bytes(bytes(data))
    assert ingest_main(_args(synth_small, new, copy, "--append")) == 0
    m = read_manifest(copy)
    assert m.version == 4 and m.counts["samples"] == 24
    assert m.counts["rejects_by_reason"].get("duplicate_key") == 1


def test_a_changed_label_of_a_patient_in_the_dataset_is_a_relabel_problem(appended, synth_small, tmp_path):
    _, _, parts, _ = appended
    out = tmp_path / "ds"
    assert ingest_main(_args(synth_small, parts[0], out)) == 0
    in_first = {f.stem for f in parts[0].glob("*.dcm")}
    rows = synth_small.labels_csv.read_text().splitlines()
    positive = next(i for i, r in enumerate(rows[1:], 1) if r.endswith(",1") and r.split(",")[0] in in_first)
    patient = rows[positive].split(",")[0]
    cells = rows[positive].split(",")
    cells[1] = str(float(cells[1]) + 5)  # a moved box
    rows[positive] = ",".join(cells)
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    before = _rows(out)
    args = _args(synth_small, parts[1], out, "--append")
    args[args.index("--labels") + 1] = str(csv)
    assert ingest_main(args) == 0
    after = _rows(out)
    assert {k: after[k] for k in before} == before
    problems = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [p["patient_id"] for p in problems if p["reason"] == "relabel_needs_rewrite"] == [patient]
    assert read_manifest(out).counts["label_problems_by_reason"]["relabel_needs_rewrite"] == 1


def _state(out: Path) -> dict[str, object]:
    """What an append writes, but the version record's time."""
    t = read_labels_from(open_store(out))
    m = read_manifest(out)
    return {
        "shards": {p.name: p.read_bytes() for p in sorted((out / SHARDS_DIR).iterdir())},
        "labels": {f: getattr(t, f).tolist() for f in ("key", "split", "target", "shard", "boxes", "box_offsets")},
        "rejects": (out / "rejects.jsonl").read_bytes(),
        "index": (out / "versions" / "v0002.sources.json").read_bytes(),
        "manifest": (m.version, m.shards, m.counts),
    }


@pytest.mark.slow
def test_an_append_killed_and_resumed_is_byte_identical_to_one_not_killed(appended, synth_small, tmp_path):
    _, _, parts, _ = appended
    new = tmp_path / "new"
    new.mkdir()
    for part in parts[1:]:
        for f in part.glob("*.dcm"):
            shutil.copyfile(f, new / f.name)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert ingest_main(_args(synth_small, parts[0], whole)) == 0
    shutil.copytree(whole, killed)
    assert ingest_main(_args(synth_small, new, whole, "--append")) == 0

    cmd = [sys.executable, "-m", "ingest", *_args(synth_small, new, killed, "--append")]
    # 0.5 s per 4-sample shard, so the kill lands mid-run (the decoder opens each file itself)
    finished = kill_after_shards(cmd, killed, 1, env=fault_env("*.dcm=sleep:0.125"), cwd=REPO)
    assert read_manifest(killed).version == 1 and finished < 4
    res = subprocess.run(cmd[:-1] + ["--append"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "reused" in res.stdout and not (killed / ".ingest").exists()
    assert _state(killed) == _state(whole)


def _keyfile(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pseudonymized(appended, synth_small, tmp_path_factory):
    """The first part ingested under a key, then the second appended under the same key."""
    _, _, parts, _ = appended
    work = tmp_path_factory.mktemp("pseudo")
    key = _keyfile(work / "key", b"a secret the hospital keeps, 41 bytes long")
    out = work / "ds"
    assert ingest_main(_args(synth_small, parts[0], out, "--pseudonymize", str(key))) == 0
    assert ingest_main(_args(synth_small, parts[1], out, "--append", "--pseudonymize", str(key))) == 0
    return out, key, work


def test_a_pseudonymized_dataset_appends_under_its_key(pseudonymized, synth_small, capsys):
    out, _, _ = pseudonymized
    m = read_manifest(out)
    assert m.version == 2 and m.counts["samples"] == 16
    ids = {f.stem for f in synth_small.images_dir.glob("*.dcm")}
    assert not ids & {row[0] for row in _rows(out).values()}  # pseudonyms only
    for n in (1, 2):
        assert shards_main(["verify", f"{out}@v{n}"]) == 0, capsys.readouterr()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("other", "pseudonymized with another key"),
        (None, "give the same --pseudonymize KEYFILE"),
    ],
    ids=["another-key", "no-key"],
)
def test_an_append_with_another_key_is_refused(pseudonymized, appended, synth_small, capsys, key, message):
    out, _, work = pseudonymized
    _, _, parts, _ = appended
    extra = ["--pseudonymize", str(_keyfile(work / "other", b"another secret, also long enough: 41 bytes"))] if key else []
    capsys.readouterr()
    assert ingest_main(_args(synth_small, parts[2], out, "--append", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert read_manifest(out).version == 2


def test_a_withdrawal_erases_an_appended_patient_from_every_source_index(appended, synth_small, tmp_path):
    from shards.withdraw import withdraw

    _, out, parts, _ = appended
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    patient = sorted(f.stem for f in parts[2].glob("*.dcm"))[0]
    assert withdraw(copy, [patient]).patients == 1
    indexes = [copy / "sources.json", *sorted((copy / "versions").glob("*.sources.json"))]
    assert len(indexes) == 3
    for path in indexes:
        assert patient.encode() not in path.read_bytes(), path
    # Its file is unknown again: appending it makes a new version with it.
    new = tmp_path / "new"
    new.mkdir()
    shutil.copyfile(parts[2] / f"{patient}.dcm", new / f"{patient}.dcm")
    assert ingest_main(_args(synth_small, new, copy, "--append")) == 0
    m = read_manifest(copy)
    assert m.version == 5 and m.counts["samples"] == 24
    ever = {s.name for n in (1, 2, 3, 4) for s in read_record(copy, n).manifest.shards}
    assert not set(read_record(copy, 5).change.shards_added) & ever  # no shard number used twice
    assert shards_main(["verify", str(copy)]) == 0


def test_an_append_without_labels_to_a_labelled_dataset_is_refused(appended, tmp_path, capsys):
    _, out, parts, _ = appended
    capsys.readouterr()
    assert ingest_main(["--dicom-dir", str(parts[0]), "--out", str(out), "--append", *FLAGS]) == 2
    assert "give --labels" in capsys.readouterr().err


def test_an_append_without_the_class_info_the_dataset_was_made_with_is_refused(appended, synth_small, capsys):
    _, out, parts, _ = appended
    args = _args(synth_small, parts[0], out, "--append")
    i = args.index("--class-info")
    del args[i:i + 2]
    capsys.readouterr()
    assert ingest_main(args) == 2  # else every stored class would read as a relabel
    assert "give --class-info" in capsys.readouterr().err


def test_an_append_with_class_info_to_a_dataset_made_without_it_is_refused(appended, synth_small, tmp_path, capsys):
    _, _, parts, _ = appended
    out = tmp_path / "ds"
    first = _args(synth_small, parts[0], out)
    i = first.index("--class-info")
    del first[i:i + 2]
    assert ingest_main(first) == 0
    capsys.readouterr()
    assert ingest_main(_args(synth_small, parts[1], out, "--append")) == 2
    assert "leave out --class-info" in capsys.readouterr().err


def test_an_archive_appends_its_new_members_and_skips_the_ones_already_in(appended, synth_small, tmp_path, capsys):
    import zipfile

    _, _, parts, _ = appended
    out = tmp_path / "ds"
    assert ingest_main(_args(synth_small, parts[0], out)) == 0
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in [sorted(parts[0].glob("*.dcm"))[0], *parts[1].glob("*.dcm"), *parts[2].glob("*.dcm")]:
            zf.write(f, f"stage_2_train_images/{f.name}")
        zf.writestr("stage_2_train_labels.csv", synth_small.labels_csv.read_text())
    capsys.readouterr()
    assert ingest_main(_args(synth_small, archive, out, "--append", "--members", "stage_2_train_images/")) == 0
    assert "skipped 1 already ingested" in capsys.readouterr().out
    m = read_manifest(out)
    assert m.version == 2 and m.counts["samples"] == 24 and m.source["sources"][-1] == f"{archive.resolve()}!/stage_2_train_images/"
    assert shards_main(["verify", str(out)]) == 0, capsys.readouterr()


def test_a_dataset_made_before_the_source_index_is_appended_to(appended, synth_small, tmp_path, capsys):
    """Format 4: no sources.json; the append reads its samples' JSON once instead."""
    _, _, parts, _ = appended
    out = tmp_path / "ds"
    assert ingest_main(_args(synth_small, parts[0], out)) == 0
    (out / "sources.json").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 4
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert ingest_main(_args(synth_small, synth_small.images_dir, out, "--append")) == 0
    assert "skipped 8 already ingested" in capsys.readouterr().out
    m = read_manifest(out)
    assert m.version == 2 and m.counts["samples"] == 24 and m.format_version == 4
    assert shards_main(["verify", f"{out}@v1"]) == 0 and shards_main(["verify", str(out)]) == 0


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("before_format_6", "rejected_earlier", "lines"),
    [
        (False, 1, 1),  # its reject line holds its sha256: skipped, not rejected again
        (True, 0, 2),  # a line without one: processed and rejected again, as before format 6
    ],
    ids=["format-6", "before-format-6"],
)
def test_a_file_rejected_earlier_is_skipped_by_its_sha256(appended, synth_small, tmp_path, capsys,
                                                          before_format_6, rejected_earlier, lines):
    _, _, parts, _ = appended
    patient = sorted(parts[2].glob("*.dcm"))[0].name  # labelled, so only its bytes can reject it
    junk = b"not a DICOM file\n" * 20
    first, new, out = tmp_path / "first", tmp_path / "new", tmp_path / "ds"
    shutil.copytree(parts[0], first)
    shutil.copytree(parts[1], new)
    (first / patient).write_bytes(junk)
    (new / patient).write_bytes(junk)
    assert ingest_main(_args(synth_small, first, out)) == 0
    [line] = [e for e in _lines(out) if e["kind"] == "file"]
    assert line["path"] == patient and line["sha256"] == hashlib.sha256(junk).hexdigest()
    if before_format_6:
        text = "".join(json.dumps({k: v for k, v in e.items() if k != "sha256"}) + "\n" for e in _lines(out))
        (out / "rejects.jsonl").write_text(text)
    capsys.readouterr()
    assert ingest_main(_args(synth_small, new, out, "--append")) == 0
    assert f"skipped 0 already ingested, {rejected_earlier} rejected earlier" in capsys.readouterr().out
    assert [e["path"] for e in _lines(out) if e["kind"] == "file"] == [patient] * lines
    m = read_manifest(out)
    assert m.counts["samples"] == 16 and m.counts["rejects"] == lines and m.counts["inputs"] == 16 + lines
    # Another file of that patient (the real one) is no earlier reject: it becomes a sample.
    assert ingest_main(_args(synth_small, parts[2], out, "--append")) == 0
    assert read_manifest(out).counts["samples"] == 24 and Path(patient).stem in _rows(out)
    assert shards_main(["verify", str(out)]) == 0, capsys.readouterr()


def _with_rows(synth, path: Path, before: list[str], after: list[str]) -> Path:
    """``synth``'s labels file with ``before`` rows after its header and ``after`` rows at its end."""
    header, *rows = synth.labels_csv.read_text().splitlines()
    path.write_text("\n".join([header, *before, *rows, *after]) + "\n")
    return path


@pytest.mark.parametrize(
    ("before", "after", "new"),
    [
        ([], ["ghost-1,,,,,2"], []),  # the same labels file again
        (["ghost-2,,,,,7"], ["ghost-1,,,,,2"], ["ghost-2"]),  # the old rows moved down, one more problem
    ],
    ids=["same-file", "old-rows-kept-one-new"],
)
def test_label_problems_already_recorded_are_not_reported_again(appended, synth_small, tmp_path, capsys,
                                                                 before, after, new):
    _, _, parts, _ = appended
    out = tmp_path / "ds"
    args = _args(synth_small, parts[0], out)
    args[args.index("--labels") + 1] = str(_with_rows(synth_small, tmp_path / "v1.csv", [], ["ghost-1,,,,,2"]))
    assert ingest_main(args) == 0
    args = _args(synth_small, parts[1], out, "--append")
    args[args.index("--labels") + 1] = str(_with_rows(synth_small, tmp_path / "v2.csv", before, after))
    capsys.readouterr()
    assert ingest_main(args) == 0
    # ghost-1's bad_target, and parts[2]'s 8 patients still without an image, are recorded already.
    assert f"; {1 + 8} label problems already recorded" in capsys.readouterr().out
    problems = [e for e in _lines(out) if e["kind"] == "label"]
    assert sorted(e["patient_id"] for e in problems if e["reason"] == "bad_target") == ["ghost-1", *new]
    assert len({(e["reason"], e["patient_id"]) for e in problems}) == len(problems)  # none twice
    m = read_manifest(out)
    assert m.counts["label_problems_by_reason"] == {"bad_target": 1 + len(new), "label_without_image": 8}
    assert shards_main(["verify", str(out)]) == 0, capsys.readouterr()


def test_a_relabel_is_reported_once_and_never_applied(appended, synth_small, tmp_path, capsys):
    _, _, parts, _ = appended
    out = tmp_path / "ds"
    assert ingest_main(_args(synth_small, parts[0], out)) == 0
    in_first = {f.stem for f in parts[0].glob("*.dcm")}
    rows = synth_small.labels_csv.read_text().splitlines()
    negative = next(i for i, r in enumerate(rows[1:], 1) if r.endswith(",0") and r.split(",")[0] in in_first)
    patient = rows[negative].split(",")[0]
    rows[negative] = f"{patient},10,10,20,20,1"  # a negative made positive
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    before = _rows(out)
    for n, part in enumerate(parts[1:], start=2):
        args = _args(synth_small, part, out, "--append")
        args[args.index("--labels") + 1] = str(csv)
        capsys.readouterr()
        assert ingest_main(args) == 0
        assert read_manifest(out).version == n
        relabels = [e["patient_id"] for e in _lines(out) if e["reason"] == "relabel_needs_rewrite"]
        assert relabels == [patient]
        assert {k: _rows(out)[k] for k in before} == before  # the dataset keeps the label it was made with
    assert "label problems already recorded" in capsys.readouterr().out
    for n in (2, 3):
        assert read_record(out, n).manifest.counts["label_problems_by_reason"]["relabel_needs_rewrite"] == 1


def _zip(path: Path, files: list[Path], folder: str) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for f in files:
            zf.write(f, f"{folder}{f.name}")
    return path


@pytest.mark.parametrize(
    ("source", "members", "recorded"),
    [
        ("folder", None, "{path}"),
        ("zip", "stage_2_train_images", "{path}!/stage_2_train_images/"),
        ("zip", None, "{path}"),  # the whole archive
    ],
    ids=["folder", "zip-members", "zip-whole"],
)
def test_every_version_names_the_source_that_fed_it(appended, synth_small, tmp_path, capsys, source, members, recorded):
    _, _, parts, _ = appended
    files = sorted(parts[0].glob("*.dcm"))
    path = parts[0] if source == "folder" else _zip(tmp_path / "export.zip", files, "stage_2_train_images/")
    out = tmp_path / "ds"
    assert ingest_main(_args(synth_small, path, out, *(["--members", members] if members else []))) == 0
    first = recorded.format(path=path.resolve())
    assert read_manifest(out).source["sources"] == [first]
    assert ingest_main(_args(synth_small, parts[1], out, "--append")) == 0
    assert read_manifest(out).source["sources"] == [first, str(parts[1].resolve())]
    assert read_record(out, 1).manifest.source["sources"] == [first]
    lines = _versions(out, capsys)
    assert lines[1].endswith(f"first ingest from {first}")
    assert lines[2].endswith(f"from {parts[1].resolve()}")


def test_versions_names_the_source_of_a_first_ingest_that_did_not_list_it(appended, synth_small, tmp_path, capsys):
    """A first ingest before format 6 wrote no source.sources: its dicom_dir stands for it."""
    _, _, parts, _ = appended
    out = tmp_path / "ds"
    assert ingest_main(_args(synth_small, parts[0], out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["source"]["sources"]
    manifest["format_version"] = 5
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert ingest_main(_args(synth_small, parts[1], out, "--append")) == 0
    assert read_manifest(out).source["sources"] == [str(parts[0].resolve()), str(parts[1].resolve())]
    lines = _versions(out, capsys)
    assert lines[1].endswith(f"first ingest from {parts[0].resolve()}")
    assert lines[2].endswith(f"from {parts[1].resolve()}")


def test_an_append_by_patient_id_tag_keeps_the_same_patient_rule_and_the_splits(appended, synth_small, tmp_path, capsys):
    """``--patient-id tag``: renamed files, the id read from each file's PatientID tag."""
    _, _, parts, _ = appended
    renamed = []
    for i, part in enumerate(parts[:2]):
        folder = tmp_path / f"renamed{i + 1}"
        folder.mkdir()
        for n, f in enumerate(sorted(part.glob("*.dcm"))):
            shutil.copyfile(f, folder / f"scan-{i}-{n}.dcm")
        renamed.append(folder)
    again = sorted(parts[0].glob("*.dcm"))[0]
    data = bytearray(again.read_bytes())
    data[-1] ^= 0xFF  # another file (another sha256) of a patient the dataset holds
    (renamed[1] / "rescan.dcm").write_bytes(bytes(data))
    out = tmp_path / "ds"
    assert ingest_main(_args(synth_small, renamed[0], out, "--patient-id", "tag")) == 0
    capsys.readouterr()
    assert ingest_main(_args(synth_small, renamed[1], out, "--append")) == 2  # the id's source is a parameter
    assert "patient_id" in capsys.readouterr().err
    assert ingest_main(_args(synth_small, renamed[1], out, "--append", "--patient-id", "tag")) == 0
    rows, first = _rows(out), _rows(f"{out}@v1")
    assert sorted(p for p, *_ in rows.values()) == sorted(f.stem for p in parts[:2] for f in p.glob("*.dcm"))
    for key, row in rows.items():
        assert row[1] == (first[key][1] if key in first else "val" if split_hash(0, row[0]) < 0.25 else "train")
    m = read_manifest(out)
    assert m.version == 2 and m.counts["samples"] == 16
    rejects = [e for e in _lines(out) if e["kind"] == "file"]
    assert [(e["path"], e["reason"]) for e in rejects] == [("rescan.dcm", "duplicate_key")]
    assert shards_main(["verify", str(out)]) == 0, capsys.readouterr()


@pytest.mark.parametrize(
    ("skipped", "rejected_earlier", "first_line"),
    [
        (3, 0, "nothing to append: every input file is already in the dataset"),
        (3, 1, "nothing to append: every input file is already in the dataset or was rejected earlier"),
    ],
)
def test_the_summary_of_an_append_with_nothing_new_says_why(tmp_path, skipped, rejected_earlier, first_line):
    from ingest.pipeline import IngestSummary

    counts = {"samples": 3, "train": {"samples": 2}, "val": {"samples": 1}, "positives": 1, "boxes": 1,
              "rejects": 1, "label_problems": 0}
    summary = IngestSummary(out=tmp_path, counts=counts, rejects_by_reason={}, problems_by_reason={}, shards_built=0,
                            shards_reused=0, seconds=0.1, already_complete=True, skipped=skipped,
                            rejected_earlier=rejected_earlier, version=2)
    lines = summary.lines()
    assert lines[0] == first_line
    assert lines[2] == (f"version: 2; skipped {skipped} already ingested, {rejected_earlier} rejected earlier; "
                        "0 label problems already recorded")
