"""Image QA flags: their names, their bits in ``labels.zarr``'s ``qa`` array, and their rules.

A flag marks an image that no one should train on without knowing (a lateral view, a blank
frame, burned-in text, a mislabelled export). Flags are part of the format: each sample's JSON
lists its flags (``qa``, in :data:`QA_FLAGS` order) and ``labels.zarr`` holds the same set as
a bitmask, bit ``i`` for ``QA_FLAGS[i]``. Flags never change pixels and never reject a file;
the ingest computes them (:mod:`ingest.qa`), training may leave flagged samples out
(``--exclude-qa``). A dataset written before the flags existed reads as unflagged.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

QA_FLAGS = (
    "blank",
    "lateral",
    "not_chest",
    "burned_in_annotation",
    "low_dynamic_range",
    "small_source",
    "inverted_suspect",
)
"""Every flag, in bit order (a new flag is appended: the bits of older ones never move)."""

QA_RULES = {
    "blank": "near-constant after windowing: the middle 99% of its pixels span fewer than 8 grey levels (8-bit, before CLAHE)",
    "lateral": "ViewPosition is LL, RL or LATERAL",
    "not_chest": "BodyPartExamined is present and is not CHEST",
    "burned_in_annotation": "the BurnedInAnnotation tag is YES (text in the pixels, possibly a name or a date)",
    "low_dynamic_range": "most pixels in a few grey levels before CLAHE: the 8 most frequent hold more than half of "
                         "the pixels that are not saturated (0 or 255)",
    "small_source": "the source image has fewer than 512 rows or columns",
    "inverted_suspect": "the decoded image looks inverted: across its middle rows the central columns (spine, "
                        "mediastinum) are darker than the columns either side (lungs) by more than 8 grey levels",
}
"""The rule of each flag, in one line (:mod:`ingest.qa` holds the parameters)."""

QA_DTYPE = np.uint16
"""dtype of ``labels.zarr``'s ``qa`` array: room for 16 flags."""


def _check(flags: Iterable[str]) -> list[str]:
    flags = list(flags)
    unknown = [f for f in flags if f not in QA_FLAGS]
    if unknown:
        raise ValueError(f"unknown QA flag(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(QA_FLAGS)}")
    return flags


def qa_mask(flags: Iterable[str]) -> int:
    """The bitmask of ``flags`` (raises ValueError on an unknown name)."""
    mask = 0
    for flag in _check(flags):
        mask |= 1 << QA_FLAGS.index(flag)
    return mask


def qa_names(mask: int) -> list[str]:
    """The flags set in ``mask``, in :data:`QA_FLAGS` order."""
    return [flag for i, flag in enumerate(QA_FLAGS) if int(mask) >> i & 1]


def parse_qa_flags(text: str) -> tuple[str, ...]:
    """``blank,lateral`` -> the named flags (a CLI value; empty text names none).

    Raises:
        ValueError: a name that is not a flag, naming it and the allowed ones.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    return tuple(sorted(set(_check(names)), key=QA_FLAGS.index))
