"""``python -m shards stats`` and ``python -m shards show`` on the session's small dataset."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shards.__main__ import main as shards_main
from shards.format import CLASS_NAMES, SPLITS
from shards.labels import read_labels
from shards.manifest import read_manifest
from shards.show import PANEL_INCHES, TITLE_INCHES, find_samples
from shards.stats import compute_stats


def _png_shape(path: Path) -> tuple[int, int]:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.std() > 0.01, "blank image"
    return img.shape[0], img.shape[1]


def _keys(ds: Path, target: int, n: int) -> list[str]:
    t = read_labels(ds / "labels.zarr")
    return [str(k) for k in t.key[t.target == target][:n]]


def test_stats_agree_with_manifest_and_source(ingested_small: Path, synth_small) -> None:
    st = compute_stats(ingested_small)
    m = read_manifest(ingested_small)
    assert st.size == 64 and st.total == synth_small.n_images
    for split in SPLITS:
        c = m.counts[split]
        assert st.samples[split] == c["samples"]
        assert st.targets[split]["positive"] == c["positives"]
        assert st.box_count(split) == c["boxes"]
        assert sum(st.boxes_per_image[split].values()) == c["positives"]
        assert sum(st.classes[split].values()) == c["samples"]
        assert st.shards[split] == c["shards"]
    assert len(st.box_wh) == synth_small.n_boxes
    assert ((st.box_wh > 0) & (st.box_wh <= 64)).all()
    class_totals = {c: sum(st.classes[s].get(c, 0) for s in SPLITS) for c in CLASS_NAMES}
    assert class_totals == {c: synth_small.class_counts.get(c, 0) for c in CLASS_NAMES}
    assert not st.rejects and not st.label_problems


@pytest.mark.parametrize(
    "lines, rejects, problems",
    [
        ([], {}, {}),
        ([{"kind": "file", "path": "a.dcm", "reason": "truncated", "detail": "x"},
          {"kind": "file", "path": "b.dcm", "reason": "truncated", "detail": "x"},
          {"kind": "file", "path": "c.dcm", "reason": "not_dicom", "detail": "x"}],
         {"truncated": 2, "not_dicom": 1}, {}),
        ([{"kind": "label", "reason": "label_without_image", "detail": "x", "patient_id": "p", "path": None,
           "line": None}, "not json"],
         {}, {"label_without_image": 1}),
    ],
    ids=["none", "file-rejects", "label-problem-and-a-bad-line"],
)
def test_stats_count_rejects_by_reason(ingested_small: Path, tmp_path: Path, lines, rejects, problems) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(ingested_small, ds)
    (ds / "rejects.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    st = compute_stats(ds)
    assert st.rejects == rejects and st.label_problems == problems


def test_stats_cli_prints_tables_and_draws_png(ingested_small: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "stats.png"
    assert shards_main(["stats", str(ingested_small), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    m = read_manifest(ingested_small)
    train = next(x for x in out.splitlines() if x.startswith("train "))
    assert train.split()[1] == str(m.counts["train"]["samples"])
    for heading in ("class", "boxes per positive image", "box size", "view position", "rejects: 0"):
        assert heading in out
    assert _png_shape(png) == (950, 1700)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """The figures ``plot_stats`` draws, kept open for the test to read (it closes each after saving)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list = []
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


def test_stats_png_draws_the_counts(ingested_small: Path, tmp_path: Path, drawn: list) -> None:
    from shards.stats import plot_stats

    st = compute_stats(ingested_small)
    plot_stats(st, tmp_path / "stats.png")
    (fig,) = drawn
    samples, classes, per_image, sizes, views, rejects = fig.axes
    assert f"{st.total} samples ({st.samples['train']} train / {st.samples['val']} val)" in fig.get_suptitle()
    # Samples per split, stacked by target: each segment is a target's count; they sum to the split.
    stacked = {c.get_label(): list(c.datavalues) for c in samples.containers}
    for i, split in enumerate(SPLITS):
        assert {t: v[i] for t, v in stacked.items()} == {t: st.targets[split][t] for t in stacked}
        assert sum(v[i] for v in stacked.values()) == st.samples[split]
    # Detailed class: one bar per (split, class), its width the count.
    by_split = {c.get_label(): list(c.datavalues) for c in classes.containers}
    names = [label.get_text().replace(" /\n", " / ") for label in classes.get_yticklabels()]
    assert names == list(CLASS_NAMES)
    for split in SPLITS:
        assert by_split[split] == [st.classes[split].get(c, 0) for c in names]
    # Boxes per positive image: bar k of a split is its count of images with k boxes.
    for c in per_image.containers:
        assert list(c.datavalues) == [st.boxes_per_image[c.get_label()].get(k, 0) for k in range(len(c))]
    # Box sizes: one point per box, at its width and height.
    (points,) = sizes.collections
    assert np.allclose(np.sort(points.get_offsets(), axis=0), np.sort(st.box_wh, axis=0))
    # View position and sex: every sample counted once per kind.
    for c in views.containers:
        split = c.get_label()
        assert sum(c.datavalues) == 2 * st.samples[split]
    assert [t.get_text() for t in rejects.texts] == ["no rejects, no label problems"]


def test_stats_png_draws_rejects_by_reason(ingested_small: Path, tmp_path: Path, drawn: list) -> None:
    from shards.stats import plot_stats

    ds = tmp_path / "ds"
    shutil.copytree(ingested_small, ds)
    lines = [{"kind": "file", "path": f"{i}.dcm", "reason": r, "detail": "x"}
             for i, r in enumerate(["truncated", "truncated", "not_dicom"])]
    lines.append({"kind": "label", "reason": "no_image", "detail": "x", "patient_id": "p", "path": None, "line": 3})
    (ds / "rejects.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    plot_stats(compute_stats(ds), tmp_path / "stats.png")
    rejects = drawn[0].axes[5]
    (bars,) = rejects.containers
    labels = [label.get_text() for label in rejects.get_yticklabels()]
    assert dict(zip(labels, bars.datavalues)) == {"truncated\n(file)": 2, "not_dicom\n(file)": 1, "no_image\n(label)": 1}
    assert "Rejected files (3) and label problems (1)" in rejects.get_title()


def test_stats_on_missing_folder_exits_2(tmp_path: Path, capsys) -> None:
    assert shards_main(["stats", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "positives, negatives, with_source, rows, cols",
    [
        (1, 0, False, 1, 1),
        (1, 1, True, 2, 2),
        (2, 1, False, 3, 1),
    ],
)
def test_show_draws_one_row_per_key(ingested_small: Path, synth_small, tmp_path: Path, capsys,
                                    positives: int, negatives: int, with_source: bool, rows: int, cols: int) -> None:
    keys = _keys(ingested_small, 1, positives) + _keys(ingested_small, 0, negatives)
    png = tmp_path / "show.png"
    argv = ["show", str(ingested_small), *keys, "-o", str(png)]
    if with_source:
        argv += ["--source", str(synth_small.images_dir)]
    assert shards_main(argv) == 0
    assert str(png) in capsys.readouterr().out
    h, w = _png_shape(png)
    assert w == round(PANEL_INCHES * cols * 110)
    assert h == round((PANEL_INCHES + TITLE_INCHES) * rows * 110)


def test_find_samples_keeps_the_order_asked(ingested_small: Path) -> None:
    keys = _keys(ingested_small, 0, 2)[::-1] + _keys(ingested_small, 1, 1)
    samples = find_samples(ingested_small, keys)
    assert [s.key for s in samples] == keys
    assert all(s.image.shape == (64, 64) and s.meta["key"] == s.key for s in samples)
    assert np.asarray(samples[-1].meta["boxes"]).shape[1:] == (4,)


def test_show_unknown_key_exits_2(ingested_small: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "x.png"
    assert shards_main(["show", str(ingested_small), "no-such-key", "-o", str(png)]) == 2
    assert "no-such-key" in capsys.readouterr().err
    assert not png.exists()
