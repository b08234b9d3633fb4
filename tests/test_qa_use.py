"""Using the QA flags: training leaves flagged samples out of its plan deterministically and
every rank still gets the same batches; evaluation reports with and without them; ``--resume``
refuses another set; ``shards stats`` counts them and ``shards show --qa`` draws them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from shards.labels import read_labels, write_labels
from shards.qa import qa_mask
from tests.test_train import launch, ok
from train.config import TrainConfig, dump_toml, load_toml
from train.data import ShardLoader, read_split

LATERAL, BLANK = qa_mask(["lateral"]), qa_mask(["blank"])


@pytest.fixture(scope="module")
def flagged(ingested_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ingested_small`` with lateral on every third labels row and blank on every fifth
    (only labels.zarr changes: the loader plans from it)."""
    data = tmp_path_factory.mktemp("flagged") / "ds"
    shutil.copytree(ingested_small, data)
    table = read_labels(data / "labels.zarr")
    rows = np.arange(len(table))
    table.qa = (np.where(rows % 3 == 0, LATERAL, 0) | np.where(rows % 5 == 0, BLANK, 0)).astype(table.qa.dtype)
    write_labels(data / "labels.zarr", table)
    return data


def _train_rows(info) -> set[int]:
    return {b + i for b, s in zip(info.shard_base, info.shards) for i in range(s.samples)}


@pytest.mark.parametrize("exclude", [LATERAL, LATERAL | BLANK, BLANK])
def test_excluded_samples_leave_the_plan_and_every_rank_gets_equal_batches(flagged: Path, exclude: int):
    full = read_split(flagged, "train")
    info = read_split(flagged, "train", exclude_qa=exclude)
    qa = read_labels(flagged / "labels.zarr").qa
    kept = {r for r in _train_rows(full) if not qa[r] & exclude}
    assert info.samples == len(kept) and info.excluded == full.samples - len(kept) > 0
    for world in (1, 2):
        ids, per_rank = [], []
        for rank in range(world):
            loader = ShardLoader(info, rank=rank, world=world, global_batch=4, lanes=4, workers=0, seed=5)
            batches = list(loader.epoch(1))
            assert len(batches) == loader.steps == math.ceil(len(kept) / 4)
            assert all(len(b) == 4 // world for b in batches)
            for b in batches:  # each batch holds the samples its ids name
                assert [str(info.keys[i]) for i in b.index.tolist()] == b.keys
            per_rank.append(np.stack([b.index.numpy() for b in batches]))
        ids = np.concatenate(per_rank, 1).ravel().tolist()
        assert set(ids) == kept and len(ids) - len(kept) < 4  # each once, under a batch of repeats
        if world == 1:
            first = ids
        assert ids == first  # the global batches do not depend on the world size
    again = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=4, workers=0, seed=5)
    assert np.concatenate([b.index.numpy() for b in again.epoch(1)]).tolist() == first


def test_evaluation_keeps_every_sample_by_default(flagged: Path):
    info = read_split(flagged, "val")
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=2, workers=0, train=False)
    seen = [i for b in loader.epoch(0) for i, v in zip(b.index.tolist(), b.valid.tolist()) if v]
    assert sorted(seen) == sorted(_train_rows(info))


@pytest.mark.parametrize(("value", "stored"), [
    ("lateral", ["lateral"]),
    ("blank,lateral", ["blank", "lateral"]),
    (["inverted_suspect", "blank"], ["blank", "inverted_suspect"]),
    ("", []),
])
def test_exclusions_round_trip_through_the_run_config(tmp_path: Path, value, stored: list[str]):
    cfg = TrainConfig.from_dict({"out": str(tmp_path), "data": {"path": "ds", "exclude_qa": value}})
    assert cfg.data.exclude_qa == stored
    (tmp_path / "config.toml").write_text(dump_toml(cfg))
    assert TrainConfig.from_dict(load_toml(tmp_path / "config.toml")) == cfg


def test_unknown_exclusion_is_a_config_error():
    with pytest.raises(ValueError, match=r"data.exclude_qa='lateral,sideways': unknown QA flag\(s\) 'sideways'"):
        TrainConfig.from_dict({"data": {"exclude_qa": "lateral,sideways"}})


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(run), "--image-size", "64", "--batch-size", "4",
            "--eval-batch-size", "4", "--workers", "0", "--amp", "none", "--epochs", "1", "--seed", "3", *extra]


def test_training_records_exclusions_reports_both_metrics_and_resume_refuses_others(flagged: Path, tmp_path: Path):
    run = tmp_path / "run"
    ok(launch(_args(flagged, run, "--exclude-qa", "lateral", "--max-steps", "2"), nproc=1))
    assert load_toml(run / "config.toml")["data"]["exclude_qa"] == ["lateral"]
    result = json.loads((run / "eval.json").read_text())
    val = read_split(flagged, "val")
    qa = read_labels(flagged / "labels.zarr").qa
    flagged_val = sum(1 for r in _train_rows(val) if qa[r] & LATERAL)
    assert result["samples"] == val.samples
    assert result["without_qa"]["flags"] == ["lateral"]
    assert result["without_qa"]["samples"] == val.samples - flagged_val > 0
    assert "accuracy" in result["without_qa"]

    refused = launch(["--out", str(run), "--resume", "--exclude-qa", "blank"], nproc=1)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert "cannot resume" in line and "[lateral]" in line and "[blank]" in line
    ok(launch(["--out", str(run), "--resume", "--max-steps", "3"], nproc=1))  # the recorded set


def test_exclude_qa_eval_leaves_them_out_of_evaluation(flagged: Path, tmp_path: Path):
    run = tmp_path / "run"
    ok(launch(_args(flagged, run, "--exclude-qa", "lateral", "--exclude-qa-eval", "--max-steps", "1"), nproc=1))
    result = json.loads((run / "eval.json").read_text())
    val = read_split(flagged, "val", exclude_qa=LATERAL)
    assert result["samples"] == val.samples < read_split(flagged, "val").samples
    assert "without_qa" not in result


# --------------------------------------------------------------------------- stats and show


def test_stats_count_the_flags(flagged: Path, capsys):
    from shards.__main__ import main as shards_main
    from shards.stats import compute_stats

    st = compute_stats(flagged)
    table = read_labels(flagged / "labels.zarr")
    for split in ("train", "val"):
        rows = table.split == split
        assert st.qa[split]["lateral"] == int((table.qa[rows] & LATERAL != 0).sum())
        assert st.qa[split]["blank"] == int((table.qa[rows] & BLANK != 0).sum())
        assert st.qa[split]["any"] == int((table.qa[rows] != 0).sum()) > 0
    assert shards_main(["stats", str(flagged)]) == 0
    lines = capsys.readouterr().out.splitlines()
    lateral = next(line for line in lines if line.startswith("lateral "))
    assert lateral.split()[1:] == [str(st.qa["train"]["lateral"]), str(st.qa["val"]["lateral"]),
                                   str(st.qa["train"]["lateral"] + st.qa["val"]["lateral"])]


def test_show_qa_draws_flagged_examples(flagged: Path, tmp_path: Path, capsys):
    from shards.__main__ import main as shards_main
    from shards.show import qa_examples

    table = read_labels(flagged / "labels.zarr")
    keys = qa_examples(flagged, "blank", count=3, seed=1)
    assert len(keys) == 3 and keys == qa_examples(flagged, "blank", count=3, seed=1)
    assert all(table.qa[table.index()[k]] & BLANK for k in keys)
    assert shards_main(["show", str(flagged), "--qa", "blank", "--count", "2", "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--qa", "sideways"], "unknown QA flag(s) 'sideways'"),
    (["--qa", "inverted_suspect"], "no sample of"),
    (["somekey", "--qa", "blank"], "name sample keys or --qa FLAG"),
    ([], "name sample keys or --qa FLAG"),
])
def test_show_qa_usage_errors(flagged: Path, tmp_path: Path, capsys, args: list[str], message: str):
    from shards.__main__ import main as shards_main

    assert shards_main(["show", str(flagged), *args, "-o", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
