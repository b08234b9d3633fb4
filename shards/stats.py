"""``python -m shards stats``: what is in a dataset, from its manifest, labels.zarr and rejects.

Counts per split, class balance, boxes per image, box sizes, view positions, sex and age, QA
flags, and rejects by reason; :func:`plot_stats` draws the same distributions into one PNG (matplotlib,
Agg backend). Reads no shard: everything comes from ``labels.zarr`` and ``rejects.jsonl``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from shards.format import CLASS_NAMES, SPLITS
from shards.labels import read_labels
from shards.manifest import LABELS_NAME, REJECTS_NAME, read_manifest
from shards.qa import QA_FLAGS

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
TARGETS = ("positive", "negative", "unlabelled")
SPLIT_COLORS = {"train": "#4C72B0", "val": "#DD8452"}
TARGET_COLORS = {"positive": "#C44E52", "negative": "#4C72B0", "unlabelled": "#8C8C8C"}


@dataclasses.dataclass
class DatasetStats:
    """The distributions of one dataset; every per-split mapping is keyed by split name."""

    out: Path | str
    """The dataset: its folder, or the URL it was read from (``python -m shards stats URL``)."""
    size: int
    """Side of the square images (px)."""
    shards: dict[str, int]
    samples: dict[str, int]
    targets: dict[str, dict[str, int]]
    """split -> positive / negative / unlabelled -> samples."""
    classes: dict[str, dict[str, int]]
    """split -> detailed class (or ``unknown``) -> samples."""
    boxes_per_image: dict[str, dict[int, int]]
    """split -> number of boxes -> samples, over positive samples only."""
    box_wh: np.ndarray
    """(M, 2) float32 width and height of every box, in px of the stored image."""
    views: dict[str, dict[str, int]]
    sexes: dict[str, dict[str, int]]
    ages: np.ndarray
    """Known ages in years, all splits."""
    rejects: dict[str, int]
    """File rejects by reason."""
    label_problems: dict[str, int]
    """Label problems by reason."""
    qa: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    """split -> QA flag (or ``any``) -> samples carrying it."""

    @property
    def total(self) -> int:
        return sum(self.samples.values())

    def lines(self) -> list[str]:
        """The report ``python -m shards stats`` prints."""
        splits = list(SPLITS)
        out = [
            f"dataset: {self.out}  ({self.total} samples, {sum(self.shards.values())} shards, "
            f"{self.size}x{self.size} px)",
            "",
        ]
        rows = []
        for s in splits:
            t = self.targets[s]
            n = self.samples[s]
            pos = f"{t['positive']} ({100 * t['positive'] / n:.1f}%)" if n else "0"
            rows.append([s, n, pos, t["negative"], t["unlabelled"], int(self.box_count(s)), self.shards[s]])
        out += _table(["split", "samples", "positives", "negatives", "unlabelled", "boxes", "shards"], rows)
        out.append("")
        names = [*CLASS_NAMES, UNKNOWN]
        out += _table(["class", *splits, "all"],
                      [[c, *(self.classes[s].get(c, 0) for s in splits), sum(self.classes[s].get(c, 0) for s in splits)]
                       for c in names if any(self.classes[s].get(c, 0) for s in splits) or c != UNKNOWN])
        out.append("")
        most = max([k for s in splits for k in self.boxes_per_image[s]] or [0])
        out += _table(["boxes per positive image", *map(str, range(most + 1))],
                      [[s, *(self.boxes_per_image[s].get(k, 0) for k in range(most + 1))] for s in splits])
        out.append("")
        if len(self.box_wh):
            w, h = self.box_wh[:, 0], self.box_wh[:, 1]
            area = 100 * w * h / float(self.size * self.size)
            q = (0, 5, 50, 95, 100)
            out += _table([f"box size (px of {self.size})", "min", "p5", "median", "p95", "max"],
                          [["width", *(f"{v:.1f}" for v in np.percentile(w, q))],
                           ["height", *(f"{v:.1f}" for v in np.percentile(h, q))],
                           ["area % of image", *(f"{v:.2f}" for v in np.percentile(area, q))]])
        else:
            out.append("box size: no boxes")
        out.append("")
        views = sorted({v for s in splits for v in self.views[s]}, key=_unknown_last)
        out += _table(["view position", *splits], [[v, *(self.views[s].get(v, 0) for s in splits)] for v in views])
        out.append("")
        sexes = sorted({v for s in splits for v in self.sexes[s]}, key=_unknown_last)
        out += _table(["sex", *splits], [[v, *(self.sexes[s].get(v, 0) for s in splits)] for v in sexes])
        if len(self.ages):
            a = np.percentile(self.ages, (0, 50, 100))
            out.append(f"age (years): min {a[0]:.0f}, median {a[1]:.0f}, max {a[2]:.0f}; "
                       f"{self.total - len(self.ages)} unknown")
        out.append("")
        if self.qa:
            names = [*QA_FLAGS, "any"]
            out += _table(["QA flag", *splits, "all"],
                          [[f, *(self.qa[s].get(f, 0) for s in splits), sum(self.qa[s].get(f, 0) for s in splits)]
                           for f in names])
            out.append("")
        out.append(f"rejects: {sum(self.rejects.values())}"
                   + "".join(f"\n  {r}: {n}" for r, n in sorted(self.rejects.items(), key=lambda x: -x[1])))
        out.append(f"label problems: {sum(self.label_problems.values())}"
                   + "".join(f"\n  {r}: {n}" for r, n in sorted(self.label_problems.items(), key=lambda x: -x[1])))
        return out

    def box_count(self, split: str) -> int:
        return sum(k * n for k, n in self.boxes_per_image[split].items())


def _unknown_last(v: str) -> tuple[bool, str]:
    return (v == UNKNOWN, v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    def fmt(r: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [fmt(cells[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells[1:])]


def compute_stats(out: Path | str) -> DatasetStats:
    """Gather the distributions of the dataset at ``out``.

    Raises:
        FileNotFoundError: no ``manifest.json`` (not a finished dataset).
        FormatError: a malformed manifest or label store.
    """
    out = Path(out)
    manifest = read_manifest(out)
    table = read_labels(out / LABELS_NAME)
    split = table.split.astype(str)
    counts = np.diff(table.box_offsets)
    boxes = np.asarray(table.boxes, dtype=np.float32).reshape(-1, 4)
    box_wh = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)

    def per_split(values: np.ndarray) -> dict[str, dict[Any, int]]:
        return {s: dict(collections.Counter(values[split == s].tolist())) for s in SPLITS}

    target_names = np.array(["unlabelled", "negative", "positive"], dtype=object)[table.target.astype(int) + 1]
    class_names = np.array([*CLASS_NAMES, UNKNOWN], dtype=object)[
        np.where(table.class_id >= 0, table.class_id, len(CLASS_NAMES)).astype(int)
    ]
    views = np.array([str(v) or UNKNOWN for v in table.view_position], dtype=object)
    sexes = np.array([str(v) or UNKNOWN for v in table.sex], dtype=object)
    positive = table.target == 1
    rejects, problems = _read_rejects(out / REJECTS_NAME)
    return DatasetStats(
        out=out,
        size=manifest.size,
        shards={s: len(manifest.shards_of(s)) for s in SPLITS},
        samples={s: int((split == s).sum()) for s in SPLITS},
        targets={s: {t: d.get(t, 0) for t in TARGETS} for s, d in per_split(target_names).items()},
        classes=per_split(class_names),
        boxes_per_image={s: dict(sorted(collections.Counter(counts[(split == s) & positive].tolist()).items()))
                         for s in SPLITS},
        box_wh=box_wh,
        views=per_split(views),
        sexes=per_split(sexes),
        ages=table.age[table.age >= 0].astype(np.float64),
        rejects=rejects,
        label_problems=problems,
        qa={s: {**{f: int(((table.qa >> i) & 1)[split == s].sum()) for i, f in enumerate(QA_FLAGS)},
                "any": int((table.qa[split == s] != 0).sum())} for s in SPLITS},
    )


def _read_rejects(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    files: collections.Counter[str] = collections.Counter()
    labels: collections.Counter[str] = collections.Counter()
    if not path.exists():
        log.warning("%s is missing; no rejects counted", path)
        return {}, {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rec = json.loads(line)
            (files if rec["kind"] == "file" else labels)[str(rec["reason"])] += 1
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s line %d is malformed; skipped (python -m shards verify reports it)", path, n)
    return dict(files), dict(labels)


def plot_stats(stats: DatasetStats, png: Path | str) -> Path:
    """Draw the distributions of ``stats`` into ``png`` (2 x 3 panels) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5), constrained_layout=True)
    _plot_samples(axes[0, 0], stats)
    _plot_classes(axes[0, 1], stats)
    _plot_boxes_per_image(axes[0, 2], stats)
    _plot_box_sizes(axes[1, 0], stats, fig)
    _plot_views(axes[1, 1], stats)
    _plot_rejects(axes[1, 2], stats)
    fig.suptitle(
        f"{PurePosixPath(str(stats.out)).name}: {stats.total} samples ({stats.samples['train']} train / {stats.samples['val']} val), "
        f"{stats.size}x{stats.size} px, {sum(stats.shards.values())} shards, {sum(stats.rejects.values())} rejects",
        fontsize=15, fontweight="bold",
    )
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _label_bars(ax: Any, bars: Any) -> None:
    """Write each vertical bar's count above it."""
    for bar in bars:
        v = bar.get_height()
        if v:
            ax.annotate(f"{int(v)}", (bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height()),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")


def _integer_axis(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _plot_samples(ax: Any, st: DatasetStats) -> None:
    splits = list(SPLITS)
    bottom = np.zeros(len(splits))
    for t in TARGETS:
        vals = np.array([st.targets[s][t] for s in splits], dtype=float)
        if not vals.any():
            continue
        ax.bar(splits, vals, bottom=bottom, color=TARGET_COLORS[t], label=t, width=0.6)
        for i, v in enumerate(vals):
            if v >= 0.06 * max(st.samples.values()):  # only where the segment is tall enough to hold it
                ax.text(i, bottom[i] + v / 2, f"{int(v)}", ha="center", va="center", color="white", fontsize=10,
                        fontweight="bold")
        bottom += vals
    for i, s in enumerate(splits):
        n = st.samples[s]
        pct = f"{100 * st.targets[s]['positive'] / n:.1f}% pos" if n else ""
        ax.annotate(f"{n}\n{pct}", (i, bottom[i]), ha="center", va="bottom", fontsize=10, xytext=(0, 3),
                    textcoords="offset points")
    ax.set_ylim(0, max(bottom.max(), 1) * 1.22)
    _integer_axis(ax.yaxis)
    ax.set_title("Samples per split (by target)", fontsize=12)
    ax.set_ylabel("samples")
    ax.legend(loc="upper right", fontsize=9)


def _plot_classes(ax: Any, st: DatasetStats) -> None:
    names = [c for c in (*CLASS_NAMES, UNKNOWN) if c != UNKNOWN or any(st.classes[s].get(UNKNOWN) for s in SPLITS)]
    y = np.arange(len(names))
    h = 0.38
    for i, s in enumerate(SPLITS):
        vals = [st.classes[s].get(c, 0) for c in names]
        bars = ax.barh(y + (i - 0.5) * h, vals, height=h, color=SPLIT_COLORS[s], label=s)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v}", (bar.get_width(), bar.get_y() + h / 2), va="center", fontsize=9, xytext=(3, 0),
                        textcoords="offset points")
    ax.set_yticks(y, [c.replace(" / ", " /\n") for c in names], fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, max([v for s in SPLITS for v in st.classes[s].values()] or [1]) * 1.18)
    ax.set_xlabel("samples")
    _integer_axis(ax.xaxis)
    ax.set_title("Detailed class", fontsize=12)
    ax.legend(loc="lower right", fontsize=9)


def _plot_boxes_per_image(ax: Any, st: DatasetStats) -> None:
    most = max([k for s in SPLITS for k in st.boxes_per_image[s]] or [0])
    x = np.arange(most + 1)
    w = 0.38
    for i, s in enumerate(SPLITS):
        vals = [st.boxes_per_image[s].get(k, 0) for k in x]
        _label_bars(ax, ax.bar(x + (i - 0.5) * w, vals, width=w, color=SPLIT_COLORS[s], label=s))
    ax.set_xticks(x)
    ax.set_xlabel("boxes per image")
    ax.set_ylabel("positive samples")
    top = max([v for s in SPLITS for v in st.boxes_per_image[s].values()] or [1])
    ax.set_ylim(0, top * 1.15)
    _integer_axis(ax.yaxis)
    ax.set_title("Boxes per positive image", fontsize=12)
    ax.legend(fontsize=9)


def _plot_box_sizes(ax: Any, st: DatasetStats, fig: Any) -> None:
    ax.set_title(f"Box size (px of the {st.size}x{st.size} image)", fontsize=12)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_xlim(0, st.size)
    ax.set_ylim(0, st.size)
    ax.set_aspect("equal")
    wh = st.box_wh
    if not len(wh):
        ax.text(0.5, 0.5, "no boxes", ha="center", va="center", transform=ax.transAxes, fontsize=12)
        return
    if len(wh) > 2000:
        hb = ax.hexbin(wh[:, 0], wh[:, 1], gridsize=40, extent=(0, st.size, 0, st.size), mincnt=1, cmap="viridis")
        fig.colorbar(hb, ax=ax, label="boxes", shrink=0.8)
    else:
        ax.scatter(wh[:, 0], wh[:, 1], s=24 if len(wh) < 300 else 10, alpha=0.6, color=SPLIT_COLORS["train"],
                   edgecolors="none")
    med = np.median(wh, axis=0)
    ax.axvline(med[0], color="#C44E52", lw=1, ls="--")
    ax.axhline(med[1], color="#C44E52", lw=1, ls="--")
    ax.text(0.98, 0.97, f"{len(wh)} boxes\nmedian {med[0]:.0f} x {med[1]:.0f} px", transform=ax.transAxes,
            ha="right", va="top", fontsize=10, bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))


def _plot_views(ax: Any, st: DatasetStats) -> None:
    views = sorted({v for s in SPLITS for v in st.views[s]}, key=_unknown_last)
    sexes = sorted({v for s in SPLITS for v in st.sexes[s]}, key=_unknown_last)
    groups = [("view", v, st.views) for v in views] + [("sex", v, st.sexes) for v in sexes]
    x = np.arange(len(groups))
    w = 0.38
    for i, s in enumerate(SPLITS):
        vals = [d[s].get(v, 0) for _, v, d in groups]
        _label_bars(ax, ax.bar(x + (i - 0.5) * w, vals, width=w, color=SPLIT_COLORS[s], label=s))
    ax.set_xticks(x, [f"{v}\n({kind})" for kind, v, _ in groups], fontsize=10)
    if views and sexes:
        ax.axvline(len(views) - 0.5, color="grey", lw=0.8)
    top = max([v for s in SPLITS for d in (st.views, st.sexes) for v in d[s].values()] or [1])
    ax.set_ylim(0, top * 1.15)
    _integer_axis(ax.yaxis)
    ax.set_ylabel("samples")
    ages = f"; age median {np.median(st.ages):.0f} y" if len(st.ages) else ""
    ax.set_title(f"View position and sex{ages}", fontsize=12)
    ax.legend(fontsize=9)


def _plot_rejects(ax: Any, st: DatasetStats) -> None:
    items = [(f"{r}\n(file)", n, "#8172B2") for r, n in sorted(st.rejects.items(), key=lambda x: -x[1])]
    items += [(f"{r}\n(label)", n, "#937860") for r, n in sorted(st.label_problems.items(), key=lambda x: -x[1])]
    ax.set_title(f"Rejected files ({sum(st.rejects.values())}) and label problems "
                 f"({sum(st.label_problems.values())})", fontsize=12)
    if not items:
        ax.text(0.5, 0.5, "no rejects, no label problems", ha="center", va="center", transform=ax.transAxes,
                fontsize=12)
        ax.set_axis_off()
        return
    y = np.arange(len(items))
    bars = ax.barh(y, [n for _, n, _ in items], color=[c for _, _, c in items])
    for bar, (_, n, _) in zip(bars, items):
        ax.annotate(f"{n}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=9,
                    xytext=(3, 0), textcoords="offset points")
    ax.set_yticks(y, [r for r, _, _ in items], fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, max(n for _, n, _ in items) * 1.18)
    ax.set_xlabel("count")
    _integer_axis(ax.xaxis)
