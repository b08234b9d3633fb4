"""Poison files: a file that kills its worker process or keeps it busy past ``--sample-timeout``
costs one reject, never the run, and every other sample keeps its bytes.

Faults come from outside the production code: ``tests/inject/sitecustomize.py`` on the
``PYTHONPATH`` of the worker processes (LocalCluster) or of the Slurm worker jobs makes opening
one named file crash or sleep.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import subprocess
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ingest import runner
from ingest.config import IngestConfig
from ingest.isolate import ChildDied, ChildTimedOut, IsolatedProcess
from ingest.pipeline import IngestOutOfSpace, run_ingest
from ingest.retry import RAISED_RETRIES, Event
from shards.manifest import read_manifest
from tests.fault_injection import fault_env

if TYPE_CHECKING:
    from tests.slurm_fixture import SlurmInfo

TIMEOUT_S = 4.0
"""--sample-timeout of these runs: far above the milliseconds a 128 px test image takes."""


def _members(out: Path) -> dict[str, dict[str, bytes]]:
    """``{shard: {member name: bytes}}`` of a dataset."""
    found = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            found[shard.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    return found


def _sources(out: Path) -> dict[str, list[str]]:
    """``{shard: [source path of each sample, in order]}``."""
    return {
        shard: [json.loads(data)["source"]["path"] for name, data in members.items() if name.endswith(".json")]
        for shard, members in _members(out).items()
    }


def _file_rejects(out: Path) -> dict[str, str]:
    lines = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return {r["path"]: r["reason"] for r in lines if r["kind"] == "file"}


def _assert_same_samples(out: Path, reference: Path, rejected: set[str]) -> None:
    """Every sample of ``reference`` whose source is not in ``rejected`` is in ``out`` with the
    same bytes, in the same shard; shards that lost nothing are byte-identical files."""
    got, want = _members(out), _members(reference)
    assert sorted(got) == sorted(want)
    sources = _sources(reference)
    for shard, members in want.items():
        lost = [p for p in sources[shard] if p in rejected]
        if not lost:
            assert (out / "shards" / shard).read_bytes() == (reference / "shards" / shard).read_bytes(), shard
            continue
        lost_keys = {Path(p).stem for p in lost}
        kept = {name: data for name, data in members.items() if name.split(".")[0] not in lost_keys}
        assert got[shard] == kept, f"{shard}: other samples differ from the run without poison files"


def _poison(reference: Path) -> tuple[str, str, str]:
    """A file of train-000000 to crash on, one of train-000001 to hang on, and a shard to kill
    every worker building it (as a machine-wide fault would)."""
    sources = _sources(reference)
    return sources["train-000000.tar"][0], sources["train-000001.tar"][1], "val-000000.tar"


@pytest.mark.slow
def test_local_cluster_poison_files_cost_one_reject_each(
    ingested_small: Path, synth_small: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    crash, hang, doomed = _poison(ingested_small)
    rules = f"{crash}=segv,{hang}=sleep:300,.{doomed}.tmp-*=exit"
    for name, value in fault_env(rules).items():
        monkeypatch.setenv(name, value)  # the LocalCluster's worker processes inherit it
    out = tmp_path / "ds"
    cfg = synth_small.ingest_config(out, size=64, shard_size=4, workers=2, val_fraction=0.25, sample_timeout=TIMEOUT_S)
    with caplog.at_level(logging.WARNING):
        summary = run_ingest(cfg)

    rejects = _file_rejects(out)
    doomed_files = set(_sources(ingested_small)[doomed])
    assert rejects == {crash: "worker_crashed", hang: "sample_timeout", **{p: "worker_crashed" for p in doomed_files}}
    assert summary.counts["samples"] == synth_small.n_images - len(rejects)
    _assert_same_samples(out, ingested_small, set(rejects))
    assert (out / "shards" / doomed).is_file() and read_manifest(out).counts["samples"] == summary.counts["samples"]
    text = caplog.text
    assert "KilledWorker" not in text and "workers died" not in text
    assert "rebuilding it file by file in isolated processes" in text
    assert "sample_timeout" in text and "its files are rejected as worker_crashed" in text
    assert not (out / ".ingest").exists()


@pytest.mark.parametrize(
    "error, resubmits",
    [("ENOSPC", 0), ("EIO", RAISED_RETRIES)],
    ids=["disk-full-stops-at-once", "other-error-is-retried-then-stops"],
)
def test_a_shard_task_that_raises_is_retried_by_the_policy(
    synth_small: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    error: str, resubmits: int,
) -> None:
    """A task's own error (here, opening its shard) is no worker death: the driver submits it
    again as ``ingest.retry`` says, then ends the run with that error; a full disk ends it at
    once (IngestOutOfSpace)."""
    for name, value in fault_env(f".train-000000.tar.tmp-*=errno:{error}").items():
        monkeypatch.setenv(name, value)  # the LocalCluster's worker processes inherit it
    cfg = IngestConfig(
        dicom_dir=synth_small.images_dir, out=tmp_path / "ds", labels=synth_small.labels_csv, size=64, shard_size=4,
        workers=1, val_fraction=0.25, progress=False,
    )
    with caplog.at_level(logging.WARNING, logger="ingest"), pytest.raises((OSError, IngestOutOfSpace)) as raised:
        run_ingest(cfg)
    cause = raised.value if isinstance(raised.value, OSError) else raised.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == getattr(errno, error)
    assert caplog.text.count(f"shard train-000000.tar: its task raised OSError: [Errno {getattr(errno, error)}]") == resubmits
    assert not (tmp_path / "ds" / "manifest.json").exists()


def _sleep_then(seconds: float, value: float) -> float:
    time.sleep(seconds)
    return value


def test_isolated_process_survives_what_kills_or_hangs_its_child() -> None:
    with IsolatedProcess() as child:
        assert child.call(math.sqrt, 16.0, timeout_s=30) == 4.0
        with pytest.raises(ValueError, match="invalid literal"):
            child.call(int, "x", timeout_s=30)  # an exception comes back; the child lives on
        with pytest.raises(ChildDied, match="exited with code 3"):
            child.call(os._exit, 3, timeout_s=30)
        with pytest.raises(ChildTimedOut, match="no answer within 0.5 s"):
            child.call(_sleep_then, 60.0, 1.0, timeout_s=0.5)
        assert child.call(_sleep_then, 0.0, 2.0, timeout_s=30) == 2.0  # a fresh child


@pytest.mark.slurm
def test_slurm_poison_files_cost_one_reject_each(
    slurm_cluster: SlurmInfo, synth_small: Any, ingested_small: Path, tmp_path: Path
) -> None:
    from tests.test_slurm_ingest import RUN_TIMEOUT_S, _dask_config, _env, _ingest_cmd, _no_jobs_left, _unique_name

    crash, hang, _ = _poison(ingested_small)
    name = _unique_name()
    config = _dask_config(tmp_path / "dask", slurm_cluster.partition, name)
    out = tmp_path / "ds"
    env = fault_env(f"{crash}=kill,{hang}=sleep:300", _env(config))  # the worker jobs inherit it from sbatch
    proc = subprocess.run(_ingest_cmd(synth_small, out, "--jobs", "2", "--sample-timeout", str(TIMEOUT_S)), env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S * 2, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KilledWorker" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rejects = _file_rejects(out)
    assert rejects == {crash: "worker_crashed", hang: "sample_timeout"}, proc.stderr[-3000:]
    _assert_same_samples(out, ingested_small, set(rejects))
    assert _no_jobs_left(name), "worker jobs are cancelled when the run ends"


def _label_lines(out: Path, reason: str) -> dict[str, dict[str, Any]]:
    lines = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return {p["path"]: p for p in lines if p["kind"] == "label" and p["reason"] == reason}


def test_patient_ids_by_tag_or_by_name_on_a_renamed_set(synth_small: Any, tmp_path: Path) -> None:
    """Five files renamed as a PACS export would (``normal (i).dcm``) and one file named after
    another patient: by tag all six are ingested with their labels; by name the renamed ones
    are ``no_label`` rejects and every mismatch is a ``patient_id_mismatch`` line."""
    import shutil

    from shards.labels import read_labels
    from shards.verify import VerifyConfig, verify

    recs = synth_small.records
    src = tmp_path / "renamed"
    src.mkdir()
    for i, rec in enumerate(recs[:5]):
        shutil.copy(rec.path, src / f"normal ({i}).dcm")
    shutil.copy(recs[6].path, src / f"{recs[5].patient_id}.dcm")  # tag recs[6], name recs[5]
    (src / "cut (9).dcm").write_bytes(recs[7].path.read_bytes()[:3000])  # its header holds, its pixels end early
    tag_of = {f"normal ({i}).dcm": rec.patient_id for i, rec in enumerate(recs[:5])}
    tag_of[f"{recs[5].patient_id}.dcm"] = recs[6].patient_id
    tag_of["cut (9).dcm"] = recs[7].patient_id

    def ingest(mode: str) -> Path:
        out = tmp_path / mode
        run_ingest(IngestConfig(dicom_dir=src, out=out, labels=synth_small.labels_csv, size=32, shard_size=4,
                                workers=1, progress=False, patient_id=mode))  # type: ignore[arg-type]
        return out

    by_tag = ingest("tag")
    table = read_labels(by_tag / "labels.zarr")
    want = [*recs[:5], recs[6]]
    assert sorted(map(str, table.patient_id)) == sorted(r.patient_id for r in want)
    assert sorted(map(int, table.target)) == sorted(r.target for r in want)
    assert _file_rejects(by_tag) == {"cut (9).dcm": "truncated"}
    lines = _label_lines(by_tag, "patient_id_mismatch")
    assert {p: line["patient_id"] for p, line in lines.items()} == tag_of
    report = verify(VerifyConfig(out=by_tag, deep=True, source=src, labels=synth_small.labels_csv, workers=1, progress=False))
    assert report.ok, report  # the truncated file's patient is its tag's

    by_name = ingest("name")
    assert _file_rejects(by_name) == {**{f"normal ({i}).dcm": "no_label" for i in range(5)}, "cut (9).dcm": "no_label"}
    assert [str(p) for p in read_labels(by_name / "labels.zarr").patient_id] == [recs[5].patient_id]
    lines = _label_lines(by_name, "patient_id_mismatch")
    assert sorted(lines) == sorted(tag_of)
    for path, line in lines.items():
        assert repr(tag_of[path]) in line["detail"] and repr(Path(path).stem) in line["detail"]
        assert line["patient_id"] == Path(path).stem


class _Events:
    """The client's side of ``get_events`` for the start announcements (``announce_start``)."""

    def __init__(self, *started: tuple[str, str]) -> None:
        self._events = [(float(i), {"key": key, "worker": worker}) for i, (key, worker) in enumerate(started)]

    def get_events(self, topic: str) -> list[tuple[float, dict[str, str]]]:
        return self._events


@pytest.mark.parametrize(
    "started, finished, event",
    [
        ([("other", "w1")], set(), Event.QUEUED_BEHIND),  # queued behind a task running on w1
        ([("other", "w1")], {"other"}, Event.QUEUED),  # that task had finished: the culprit is unknown
        ([("other", "w2")], set(), Event.QUEUED),  # nothing known about w1
        ([("other", "w1"), ("mine", "w0")], set(), Event.CRASHED),  # it ran (elsewhere, earlier): the death counts
    ],
    ids=["queued-behind-a-running-task", "behind-a-finished-task", "unknown-worker", "it-started"],
)
def test_a_shard_queued_behind_anothers_crash_is_not_blamed(
    tmp_path: Path, started: list[tuple[str, str]], finished: set[str], event: Event
) -> None:
    """A worker's death is observed as the death of the task that announced its start there
    last; a shard only queued behind it is forgiven (``ingest.retry``) as long as that task is
    known to be unfinished."""
    from types import SimpleNamespace

    state = runner._ShardState(SimpleNamespace(name="train-000001.tar"), {})  # type: ignore[arg-type]
    cfg = SimpleNamespace(out=tmp_path)
    got = runner._death_event(cfg, _Events(*started), "mine", state, "w1", finished)  # type: ignore[arg-type]
    assert got is event


def _announce_and_die() -> None:
    from ingest.announce import announce_start

    announce_start()
    os._exit(1)  # at once, as a file that crashes its worker on the first read


def test_a_task_that_kills_its_worker_at_once_has_announced_its_start(tmp_path: Path) -> None:
    """The driver blames a worker's death on the task that announced its start there last; the
    announcement must reach the scheduler before the task goes on, or the death falls on a
    shard that was only queued behind it."""
    import dask
    from distributed import KilledWorker

    from ingest.cluster import open_client
    from ingest.announce import STARTED_TOPIC

    cfg = IngestConfig(dicom_dir=tmp_path, out=tmp_path / "out", workers=1)
    with dask.config.set(runner.SCHEDULER_CONFIG), open_client(cfg) as client:
        future = client.submit(_announce_and_die, key="announce-and-die", pure=False)
        with pytest.raises(KilledWorker) as died:
            future.result(timeout=60)
        announced = [msg for _, msg in client.get_events(STARTED_TOPIC)]
    assert announced == [{"key": "announce-and-die", "worker": died.value.last_worker.address}]
