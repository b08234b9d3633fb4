"""From a DICOM file's bytes to the training image, under a resample mode.

``area`` (the original order): decode at full size -> CLAHE at full size -> area resize into
the letterbox. ``dct`` (the default): a fast-path JPEG frame is decoded by libjpeg-turbo at the
smallest n/8 scale that still covers the letterboxed size (1024 -> 640 is exactly 5/8, no
resize left), area-resized the rest of the way if needed, and CLAHE runs at the output size;
every other file is processed as with ``area``. The mode is a processing parameter, recorded
in the manifest and its hash.

The QA flags (:mod:`ingest.qa`) are judged here too, on the decoded image just after its
decode, while its pixels are still in the CPU's cache: judged after CLAHE and the letterbox,
their sampling grid read the image back from memory, and cost twice as much.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ingest import transforms
from ingest.config import RESAMPLE_MODES
from ingest.dicom import DecodedDicom, decode_dicom
from ingest.qa import qa_flags
from shards.geometry import Letterbox, letterbox_geometry
from shards.manifest import ProcessingParams


@dataclasses.dataclass(frozen=True)
class Rendered:
    """The training image of one file, its letterbox, and what the decoder read."""

    image: np.ndarray
    """uint8 (size, size)."""
    geom: Letterbox
    decoded: DecodedDicom
    qa: list[str]
    """The image's QA flags (:func:`ingest.qa.qa_flags`)."""


def render(data: bytes, processing: ProcessingParams | Mapping[str, Any]) -> Rendered:
    """Decode, CLAHE and letterbox one DICOM file by the ingest's processing parameters.

    Args:
        data: The whole DICOM file.
        processing: The parameters, or a manifest's ``params`` holding them
            (:meth:`ProcessingParams.from_params`).

    Raises:
        DicomRejected: the file cannot become a sample.
    """
    if not isinstance(processing, ProcessingParams):
        processing = ProcessingParams.from_params(processing)
    size, resample = int(processing.size), processing.resample
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample={resample!r}; allowed: {', '.join(RESAMPLE_MODES)}")
    decoded = decode_dicom(
        data,
        max_pixels=int(processing.max_pixels),
        fit=size if resample == "dct" else None,
        sop_classes=processing.sop_classes,
    )
    flags = qa_flags(decoded)
    geom = letterbox_geometry(decoded.rows, decoded.cols, size)
    clip, grid = processing.clahe_clip, processing.clahe_grid
    if decoded.resampled:
        resized = transforms.resize_area(decoded.pixels, geom.new_shape)
        image = transforms.pad_letterbox(transforms.clahe(resized, clip, grid), geom)
    else:
        image = transforms.letterbox(transforms.clahe(decoded.pixels, clip, grid), geom)
    return Rendered(image, geom, decoded, flags)
