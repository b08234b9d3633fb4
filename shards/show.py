"""``python -m shards show``: draw samples with their boxes, optionally beside the source DICOM.

Each sample is one row: the stored image with its boxes (title: key, target, class, split) and,
with ``source``, the original DICOM decoded as the ingest decodes it, with the boxes mapped
back to source pixels through the letterbox transform stored in the sample's JSON.
:func:`qa_examples` picks the samples that carry a QA flag (``show --qa FLAG``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shards.archive import ArchiveError, is_archive, read_member
from shards.format import FormatError
from shards.geometry import boxes_from_letterbox
from shards.labels import read_labels
from shards.manifest import LABELS_NAME, SHARDS_DIR, Manifest, read_manifest
from shards.qa import parse_qa_flags, qa_mask
from shards.reader import Sample, ShardChecksumError, iter_samples

log = logging.getLogger(__name__)

BOX_COLOR = "#FF3B30"
PANEL_INCHES = 5.0
TITLE_INCHES = 0.9
"""Height per row for the three-line titles."""
QA_EXAMPLES = 8
"""Samples ``show --qa FLAG`` draws by default."""


class ShowError(ValueError):
    """The dataset cannot be read or a key is not in it (the CLI exits 2)."""


def find_samples(out: Path | str, keys: Sequence[str]) -> list[Sample]:
    """Read the samples ``keys`` from the dataset at ``out``, in the order asked.

    The shard of each key comes from ``labels.zarr``; keys it lacks are searched in every shard.

    Raises:
        ShowError: no readable manifest, or some keys are in no shard.
    """
    out = Path(out)
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, FormatError) as exc:
        raise ShowError(f"{out}: cannot read the dataset ({exc})") from exc
    wanted = list(dict.fromkeys(keys))
    shard_of = _shards_from_labels(out, manifest, wanted)
    found: dict[str, Sample] = {}
    by_shard: dict[str, set[str]] = {}
    for key in wanted:
        if key in shard_of:
            by_shard.setdefault(shard_of[key], set()).add(key)
    for name, ks in by_shard.items():
        found.update(_read_keys(out, manifest, name, ks))
    rest = set(wanted) - set(found)
    for info in manifest.shards:  # not where labels.zarr says (or no labels): search everywhere
        if not rest:
            break
        got = _read_keys(out, manifest, info.name, rest)
        found.update(got)
        rest -= set(got)
    if rest:
        raise ShowError(f"key(s) not in {out}: {', '.join(sorted(rest))}")
    return [found[k] for k in wanted]


def _shards_from_labels(out: Path, manifest: Manifest, keys: list[str]) -> dict[str, str]:
    try:
        table = read_labels(out / LABELS_NAME)
    except FormatError as exc:
        log.warning("labels.zarr unreadable (%s); searching every shard", exc)
        return {}
    index = table.index()
    shard_of: dict[str, str] = {}
    for k in keys:
        r = index.get(k)
        if r is not None and 0 <= int(table.shard[r]) < len(manifest.shards):
            shard_of[k] = manifest.shards[int(table.shard[r])].name
    return shard_of


def _read_keys(out: Path, manifest: Manifest, name: str, keys: set[str]) -> dict[str, Sample]:
    got: dict[str, Sample] = {}
    path = out / SHARDS_DIR / name
    try:
        for sample in iter_samples(path, size=manifest.size):
            if sample.key in keys:
                got[sample.key] = sample
                if len(got) == len(keys):
                    break
    except (OSError, FormatError, ShardChecksumError) as exc:
        log.warning("%s: %s (run python -m shards verify)", name, exc)
    return got


def qa_examples(out: Path | str, flag: str, count: int = QA_EXAMPLES, seed: int = 0) -> list[str]:
    """Keys of up to ``count`` samples carrying the QA ``flag``, drawn at random by ``seed``
    (in labels.zarr order; the same arguments give the same keys).

    Raises:
        ShowError: an unknown flag, an unreadable label store, or no sample carrying the flag.
    """
    try:
        bit = qa_mask(parse_qa_flags(flag))
        table = read_labels(Path(out) / LABELS_NAME)
    except (ValueError, FileNotFoundError) as exc:
        raise ShowError(str(exc)) from exc
    rows = np.flatnonzero(table.qa & bit)
    if not len(rows):
        raise ShowError(f"no sample of {out} carries the QA flag {flag!r} (of {len(table)} samples)")
    chosen = np.sort(np.random.default_rng(seed).choice(rows, size=min(count, len(rows)), replace=False))
    return [str(table.key[r]) for r in chosen]


def show(
    out: Path | str,
    keys: Sequence[str],
    output: Path | str,
    *,
    source: Path | str | None = None,
) -> Path:
    """Draw the samples ``keys`` of the dataset at ``out`` into the PNG ``output``.

    Args:
        out: dataset folder.
        keys: sample keys, one row each.
        output: PNG file to write.
        source: the ingested DICOM folder (or ``.zip``/``.tar``); adds the source image (boxes
            in source pixels).

    Returns:
        The path written.

    Raises:
        ShowError: the dataset cannot be read or a key is not in it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = find_samples(out, keys)
    cols = 2 if source is not None else 1
    figsize = (PANEL_INCHES * cols, (PANEL_INCHES + TITLE_INCHES) * len(samples))
    fig, axes = plt.subplots(len(samples), cols, figsize=figsize, squeeze=False, constrained_layout=True)
    for row, sample in zip(axes, samples):
        _draw_sample(row[0], sample)
        if source is not None:
            _draw_source(row[1], sample, Path(source))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _draw_boxes(ax: Any, boxes: np.ndarray) -> None:
    from matplotlib.patches import Rectangle

    lw = 1.8
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=BOX_COLOR, linewidth=lw))
        ax.text(x1, y1, f" {i}", color="white", fontsize=8, va="bottom", ha="left",
                bbox=dict(facecolor=BOX_COLOR, edgecolor="none", pad=0.5, alpha=0.85))


def _draw_sample(ax: Any, s: Sample) -> None:
    meta = s.meta
    boxes = np.asarray(meta.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
    size = s.image.shape[0]
    ax.imshow(s.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest" if size < 256 else "antialiased")
    _draw_boxes(ax, boxes)
    ax.set_title(
        f"{s.key}\ntarget {meta.get('target')} | {meta.get('class') or 'no class'} | {meta.get('split')} | "
        f"{len(boxes)} box{'es' if len(boxes) != 1 else ''}\nstored {s.image.shape[1]}x{s.image.shape[0]} px"
        f"{' | qa: ' + ', '.join(meta['qa']) if meta.get('qa') else ''}",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_source(ax: Any, s: Sample, source: Path) -> None:
    # The one upward import of shards/: the source is shown as the ingest decoded it, so it
    # takes the ingest's own decoder (lazily: only --source needs it, and it needs pydicom).
    from ingest.dicom import DicomRejected, decode_dicom

    src = s.meta.get("source") or {}
    rel = str(src.get("path"))
    ax.set_xticks([])
    ax.set_yticks([])
    try:
        data = read_member(source, rel) if is_archive(source) else (source / rel).read_bytes()
        pixels = decode_dicom(data).pixels
    except (OSError, ArchiveError, DicomRejected) as exc:
        ax.set_title(f"source {rel}", fontsize=9)
        ax.text(0.5, 0.5, f"cannot show the source:\n{exc}", ha="center", va="center", transform=ax.transAxes,
                fontsize=9, wrap=True)
        return
    changed = hashlib.sha256(data).hexdigest() != src.get("sha256")
    boxes = np.asarray(s.meta.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
    back = boxes_from_letterbox(boxes, s.meta["transform"]) if len(boxes) else boxes
    ax.imshow(pixels, cmap="gray", vmin=0, vmax=255)
    _draw_boxes(ax, back)
    note = ("WARNING: file changed since the ingest (sha256 differs)" if changed
            else "boxes mapped back to source pixels")
    ax.set_title(f"source {rel}\n{pixels.shape[1]}x{pixels.shape[0]} px\n{note}",  # 3 lines, as the sample's title
                 fontsize=9, color="#B00020" if changed else "black")
