"""Which DICOM objects are radiographs: a file is judged by its SOP Class UID before its pixels.

A hospital's export holds more than images: segmentations, structured reports, presentation
states, key object selections, RT objects, encapsulated PDFs, waveforms. Some carry pixel data
(a SEG is a 1-bit mask, an RT Dose a dose grid) that would decode into a plausible-looking
"image". The SOP Class UID says what the object is, so each file is judged by it as soon as
its header is read, before any pixel is decoded:

| the file's SOP class                                 | ``radiograph`` (default) | ``any-image``      |
|------------------------------------------------------|--------------------------|--------------------|
| CR, DX (for presentation, for processing), SC        | a sample                 | a sample           |
| another image class (CT, MR, US, NM, MG, XA, ...)    | ``not_a_radiograph``     | a sample           |
| not an image (SEG, SR, PR, KO, RT, PDF, waveform...) | ``not_an_image``         | ``not_an_image``   |
| none, or a private class the registry does not name  | judged by pixel data     | judged by pixel data |

The radiograph classes: Computed Radiography and Digital X-Ray (both forms: a "for
processing" image is a raw detector image, still a projection radiograph the windowing of
the decoder handles), and the Secondary Capture classes: RSNA's own files are Secondary
Capture, and so is film digitised by a scanner. Mammography, intra-oral and breast projection
X-ray are projection radiographs too, but of other anatomy with their own detectors; a chest
model is not meant to see them, so they need ``any-image``. Fluoroscopy and angiography
(XRF, XA) are cine runs, not radiographs.

The classes come from pydicom's UID dictionary (the DICOM standard's registry): a storage SOP
class whose name says ``Image Storage`` is an image; every other storage class is not.
"""

from __future__ import annotations

from pydicom._uid_dict import UID_dictionary

from ingest.config import SOP_CLASS_POLICIES

RADIOGRAPH_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}
"""The classes ``--sop-classes radiograph`` accepts (a multi-frame one still needs one frame)."""

_IMAGE_NAMES_WITHOUT_IMAGE = frozenset(("Enhanced US Volume Storage",))
"""Image classes whose registered name does not say ``Image Storage``."""


def _storage_classes() -> tuple[dict[str, str], dict[str, str]]:
    """(image classes, non-image storage classes) of the registry, UID -> name."""
    images: dict[str, str] = {}
    others: dict[str, str] = {}
    for uid, entry in UID_dictionary.items():
        name, kind = entry[0], entry[1]
        if kind != "SOP Class" or "Storage" not in name or "Commitment" in name:
            continue
        if "Image Storage" in name or name in _IMAGE_NAMES_WITHOUT_IMAGE:
            images[uid] = name
        else:
            others[uid] = name
    return images, others


IMAGE_CLASSES, NON_IMAGE_CLASSES = _storage_classes()
"""Every registered image storage class, and every other storage class (UID -> name)."""


class NotAccepted(Exception):
    """A file whose SOP class the policy refuses; ``reason`` is a reject reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


REASONS = {
    "not_an_image": "its SOP class is a storage class that is not an image (SEG, SR, PR, KO, RT, PDF, waveform, ...)",
    "not_a_radiograph": "an image class other than CR, DX or Secondary Capture (CT, MR, US, MG, ...); --sop-classes any-image accepts it",
}
"""Reject reasons of :func:`judge`, with what they mean."""


def judge(uid: str | None, policy: str | None) -> None:
    """Refuse a file by its SOP Class UID under ``policy``; return if it may be decoded.

    Args:
        uid: The SOP Class UID (SOPClassUID, else the file meta's MediaStorageSOPClassUID);
            None or empty when the file has none.
        policy: One of :data:`SOP_CLASS_POLICIES`; None judges nothing (a dataset made
            before the option existed).

    Raises:
        NotAccepted: ``not_an_image`` or ``not_a_radiograph``, the detail naming the class.
        ValueError: an unknown policy.
    """
    if policy is None:
        return
    if policy not in SOP_CLASS_POLICIES:
        raise ValueError(f"sop_classes={policy!r}; allowed: {', '.join(SOP_CLASS_POLICIES)}")
    if not uid or uid in RADIOGRAPH_CLASSES:
        return
    name = NON_IMAGE_CLASSES.get(uid)
    if name is not None:
        raise NotAccepted("not_an_image", f"SOP class {name} ({uid})")
    name = IMAGE_CLASSES.get(uid)
    if name is not None and policy == "radiograph":
        raise NotAccepted("not_a_radiograph", f"SOP class {name} ({uid}); --sop-classes any-image accepts it")
