"""``python -m train.report RUN -o FILE.png``: plot a run's ``metrics.jsonl``.

Four panels: the training loss terms, the learning rate, throughput (images/s) with the
fraction of step time spent waiting for data, and the validation metrics per evaluation
(classifier: accuracy, ROC AUC, F1, sensitivity, specificity and the all-negative
baseline; detector: mAP@0.5, RSNA score at the run's confidence and at the best one,
image-level AUC).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shards.cli import EXIT_USAGE

__all__ = ["load_metrics", "main", "panels", "plot_run"]

CLASSIFY_KEYS = ("accuracy", "roc_auc", "f1", "sensitivity", "specificity")
DETECT_KEYS = ("map50", "rsna", "rsna_best", "image_auc")


def load_metrics(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``train`` and ``eval`` records of a run, in file order.

    A resumed run appends to the file; records of steps that a resume repeated are
    replaced by the later ones.

    Raises:
        FileNotFoundError: No metrics.jsonl in ``run``.
    """
    path = run / "metrics.jsonl" if run.is_dir() else run
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        (train if rec.get("kind") == "train" else evals)[int(rec["step"])] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


Series = dict[str, tuple[list[int], list[float]]]
"""One panel's lines: label -> (steps, values); a label without points is left out."""

LOSS, LR, THROUGHPUT, DATA_WAIT, VALIDATION = (
    "training loss", "learning rate", "throughput", "data wait", "validation")
"""The panels (``data wait`` shares the throughput panel, on its own axis)."""


def panels(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Series]:
    """What :func:`plot_run` draws: per panel, each line's points."""

    def lines(records: list[dict[str, Any]], keys: tuple[str, ...], labels: tuple[str, ...] | None = None) -> Series:
        drawn = {label: _series(records, key) for key, label in zip(keys, labels or keys)}
        return {label: pts for label, pts in drawn.items() if pts[0]}

    detector = any("map50" in r for r in evals)
    validation = lines(evals, DETECT_KEYS if detector else CLASSIFY_KEYS)
    if not detector:
        validation.update(lines(evals, ("baseline_accuracy",), ("all-negative accuracy",)))
    return {
        LOSS: lines(train, ("loss", "box", "cls", "dfl")),
        LR: lines(train, ("lr",)),
        THROUGHPUT: lines(train, ("images_per_s",), ("images/s",)),
        DATA_WAIT: lines(train, ("data_wait",)),
        VALIDATION: validation,
    }


def plot_run(run: Path, out: Path) -> Path:
    """Draw the four panels of ``run`` into ``out`` (PNG, matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = panels(*load_metrics(run))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    ax = axes[0, 0]
    for label, (xs, ys) in drawn[LOSS].items():
        ax.plot(xs, ys, label=label, lw=2 if label == "loss" else 1)
    ax.set(title="training loss (mean over ranks and logging window)", xlabel="step")
    ax.legend()
    ax = axes[0, 1]
    for xs, ys in drawn[LR].values():
        ax.plot(xs, ys)
    ax.set(title="learning rate", xlabel="step")
    ax = axes[1, 0]
    for label, (xs, ys) in drawn[THROUGHPUT].items():
        ax.plot(xs, ys, label=label, color="C0")
    ax.set(title="throughput", xlabel="step", ylabel="images/s (all ranks)")
    twin = ax.twinx()
    for label, (xs, ys) in drawn[DATA_WAIT].items():
        twin.plot(xs, ys, color="C3", label=label)
    twin.set_ylim(0, 1)
    twin.set_ylabel("fraction of step time waiting for data", color="C3")
    ax = axes[1, 1]
    for label, (xs, ys) in drawn[VALIDATION].items():
        if label == "all-negative accuracy":
            ax.plot(xs, ys, ls="--", color="grey", label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set(title="validation", xlabel="step", ylim=(0, 1.02))
    if drawn[VALIDATION]:
        ax.legend(fontsize=8)
    fig.suptitle(str(run))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder (holds metrics.jsonl)")
    p.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = plot_run(args.run, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
