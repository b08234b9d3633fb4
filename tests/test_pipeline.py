"""The ingest driver's bookkeeping of its OUT folder, without a cluster: which folder it takes
over (``_check_out``) and what it deletes from ``shards/`` (``_remove_stale``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest.config import IngestConfig
from ingest.pipeline import IngestUsageError, _check_out, _remove_stale
from ingest.workdir import params_file
from shards.manifest import RunIdentity

PARAMS = IngestConfig(dicom_dir=Path("in"), out=Path("out")).dataset_params()
IDENTITY = RunIdentity.of(PARAMS, "fingerprint-a", "labels-a")


def _manifest_of(identity: RunIdentity) -> dict:
    source = {"fingerprint": identity.source_fingerprint, "labels_sha256": identity.labels_sha256}
    return {"format_version": 1, "params": identity.params, "params_hash": identity.params_hash, "source": source}


def _finished(identity: RunIdentity) -> Callable[[Path], None]:
    def make(out: Path) -> None:
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps(_manifest_of(identity)))
    return make


def _unfinished(identity: RunIdentity) -> Callable[[Path], None]:
    def make(out: Path) -> None:
        params_file(out).parent.mkdir(parents=True)
        params_file(out).write_text(json.dumps(identity.to_json()))
    return make


def _other_seed() -> RunIdentity:
    return RunIdentity.of({**PARAMS, "seed": 7}, "fingerprint-a", "labels-a")


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda out: None, False),
        (lambda out: out.mkdir(), False),
        (_finished(IDENTITY), True),
        (_unfinished(IDENTITY), False),
        (_finished(_other_seed()), "holds a dataset made with other parameters (seed 7 -> 0)"),
        (_unfinished(_other_seed()), "holds a dataset made with other parameters (seed 7 -> 0)"),
        (_finished(RunIdentity.of(PARAMS, "fingerprint-b", "labels-a")), "made from a different set of source files"),
        (_unfinished(RunIdentity.of(PARAMS, "fingerprint-b", "labels-a")), "made from a different set of source files"),
        (_finished(RunIdentity.of(PARAMS, "fingerprint-a", None)), "made with a different labels file"),
        (_unfinished(RunIdentity.of(PARAMS, "fingerprint-a", "labels-b")), "made with a different labels file"),
        (lambda out: out.write_text("x"), "exists and is not a folder"),
        (lambda out: (out.mkdir(), (out / "notes.txt").write_text("x")), "holds no pneumo-hpc dataset"),
    ],
    ids=[
        "absent", "empty", "complete", "unfinished-resumes",
        "complete-other-params", "unfinished-other-params",
        "complete-other-sources", "unfinished-other-sources",
        "complete-labelled-vs-unlabelled", "unfinished-other-labels",
        "a-file", "a-foreign-folder",
    ],
)
def test_check_out(tmp_path: Path, make: Callable[[Path], None], expected: bool | str) -> None:
    """True: already complete; False: (re)start there; a message: refused (exit 2)."""
    out = tmp_path / "out"
    make(out)
    cfg = IngestConfig(dicom_dir=tmp_path, out=out)
    if isinstance(expected, bool):
        assert _check_out(cfg, IDENTITY) is expected
    else:
        with pytest.raises(IngestUsageError, match=r"^--out .* ") as err:
            _check_out(cfg, IDENTITY)
        assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "present, planned, kept",
    [
        (["train-000000.tar", "val-000000.tar"], ["train-000000.tar", "val-000000.tar"],
         ["train-000000.tar", "val-000000.tar"]),
        (["train-000000.tar", ".train-000001.tar.tmp-0a1b2c3d4e5f", ".val-000000.tar.tmp-123"],
         ["train-000000.tar", "train-000001.tar"], ["train-000000.tar"]),
        (["train-000000.tar", "train-000007.tar", "notes.txt"], ["train-000000.tar"], ["train-000000.tar"]),
        ([], ["train-000000.tar"], []),
    ],
    ids=["only-planned-shards-all-kept", "temporary-files-deleted", "unplanned-files-deleted", "empty"],
)
def test_remove_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                      present: list[str], planned: list[str], kept: list[str]) -> None:
    """Only ``shards/`` is touched: planned shards stay, everything else there goes, and each
    file that is not a temporary file is named in a warning."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in present:
        (shards / name).write_bytes(b"x")
    around = [tmp_path / "manifest.json", tmp_path / "rejects.jsonl", params_file(tmp_path)]
    for path in around:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep")
    with caplog.at_level(logging.WARNING, logger="ingest.pipeline"):
        _remove_stale(tmp_path, set(planned))
    assert sorted(p.name for p in shards.iterdir()) == sorted(kept)
    assert all(p.read_text() == "keep" for p in around)
    warned = [r.getMessage() for r in caplog.records]
    unplanned = [n for n in present if n not in planned and ".tmp-" not in n]
    assert len(warned) == len(unplanned) and all(any(n in w for w in warned) for n in unplanned)
