"""The on-disk sample format shared by the ingest writer, the verifier and the readers.

A sample is two tar members that share a key: ``<key>.npy`` (a uint8 array of shape
(size, size), saved with :func:`numpy.save` and ``allow_pickle=False``) and ``<key>.json``
(the sample's metadata, UTF-8, sorted keys). webdataset groups members by the part of the
name before the first dot, so keys never contain a dot.
"""

from __future__ import annotations

import functools
import io
import json
import re
from typing import Any

import numpy as np

FORMAT_VERSION = 6
"""Version of the dataset layout that writers write; bumped on any change to the format.
Readers accept this version and every earlier one (:data:`FORMAT_VERSIONS`)."""
FORMAT_VERSIONS = {
    1: "the layout, with a sha256 per shard",
    2: "an xxh3-128 per sample member in the manifest (shards.checksum)",
    3: "QA flags: a ``qa`` list in each sample's JSON, a ``qa`` bitmask array in labels.zarr",
    4: "the manifest names its dataset version; versions/ holds the earlier ones (shards.versions)",
    5: "sources.json and versions/vNNNN.sources.json: the source index appends read (shards.source_index); "
       "the manifest's source lists every folder or archive that fed the dataset",
    6: "a rejects.jsonl file line carries the file's sha256 when its bytes were judged (an append skips "
       "those files); the first ingest's manifest names its source in source.sources too",
}
"""What each version added; readers accept every version listed here (a dataset before
version 3 reads as unflagged)."""

IMAGE_EXT = "npy"
META_EXT = "json"
MEMBER_EXTS = (IMAGE_EXT, META_EXT)
"""Member suffixes of one sample, in the order they are written."""

SPLITS = ("train", "val")
"""The dataset's splits, in manifest order."""
CLASS_NAMES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
"""RSNA's detailed classes; a sample's ``class_id`` indexes this tuple (-1: unknown)."""
POSITIVE_CLASS = CLASS_NAMES[2]
"""The one class with ``Target=1`` (and boxes)."""

TAR_MTIME = 0
TAR_MODE = 0o644
"""Fixed tar header fields, so the same samples give byte-identical shards."""

NPY_HEADER_MAX = 4096
"""Longest ``.npy`` header a reader accepts."""
_KEY_OK = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class FormatError(ValueError):
    """A shard member or manifest does not follow the dataset format."""


def key_for(patient_id: str) -> str:
    """Return the shard key for a patient id: the id with every character outside
    ``[A-Za-z0-9_-]`` (dots in UIDs, spaces, slashes) replaced by ``_``."""
    key = _KEY_BAD_CHARS.sub("_", patient_id)
    if not key:
        raise ValueError(f"patient id {patient_id!r} gives an empty key")
    return key[:128]


def check_key(key: str) -> str:
    """Raise :class:`FormatError` unless ``key`` is a valid sample key; return it."""
    if not _KEY_OK.match(key):
        raise FormatError(f"invalid sample key {key!r}: want 1-128 of [A-Za-z0-9_-]")
    return key


def shard_name(split: str, index: int) -> str:
    """Return the file name of shard ``index`` of ``split`` (``train-000003.tar``)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return f"{split}-{index:06d}.tar"


SHARD_NAME = re.compile(rf"^({'|'.join(SPLITS)})-(\d{{6}})\.tar$")
"""A shard file name as :func:`shard_name` makes it; groups: split, index."""


def split_member(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) at its first dot, as webdataset does."""
    key, dot, ext = name.partition(".")
    if not dot:
        raise FormatError(f"member {name!r} has no extension")
    return key, ext


def check_member_name(name: str) -> None:
    """Raise :class:`FormatError` for a name that could escape an extraction directory.

    A shard's members sit at the archive's root, so a safe name holds no separator at all;
    without one, the only name that leaves the directory is ``..`` itself. Strings only, no
    path object: the loader checks two names a sample.
    """
    if "/" in name or "\\" in name or name == "..":
        raise FormatError(f"unsafe member name {name!r}")


def encode_image(image: np.ndarray) -> bytes:
    """Serialise an image as ``.npy`` bytes (never pickled)."""
    head, body = image_parts(image)
    return head + body.tobytes()


def image_parts(image: np.ndarray) -> tuple[bytes, memoryview]:
    """An image's ``.npy`` serialisation as (header, a view of the pixels): the bytes of
    :func:`encode_image` without copying the pixels."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be a 2-D uint8 array, got {image.dtype} {image.shape}")
    image = np.ascontiguousarray(image)
    return npy_header_bytes(image.shape), memoryview(image.reshape(-1))


@functools.lru_cache(maxsize=64)
def npy_header_bytes(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered uint8 array of ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a ``.npy`` header; every image of a
    dataset has the same header, so parsing it once per distinct header is enough."""
    fmt = np.lib.format
    stream = io.BytesIO(head)
    try:
        version = fmt.read_magic(stream)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = reader(stream)
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(f"unreadable .npy: {exc}") from exc
    return tuple(shape), bool(fortran), dtype, stream.tell()


def decode_image(data: bytes | bytearray | memoryview, size: int | None = None) -> np.ndarray:
    """Parse ``.npy`` bytes without unpickling or copying; check uint8, 2-D, (size, size).

    The header is parsed by numpy's own header reader (a literal, never unpickled) and the
    pixels are viewed in place (a view of ``data``: writable only if ``data`` is), about 20x
    faster than ``np.load`` on a BytesIO; the member must hold exactly the pixels its header
    announces.

    Raises:
        FormatError: not a ``.npy``, not a 2-D uint8 array, not (size, size), or a wrong length.
    """
    view = memoryview(data)
    head = bytes(view[:10])
    if len(head) == 10 and head[6:8] == b"\x01\x00":  # version 1.0: 2-byte header length
        head = bytes(view[: 10 + int.from_bytes(head[8:10], "little")])
    else:
        head = bytes(view[:NPY_HEADER_MAX])
    shape, fortran, dtype, offset = npy_header(head)
    if dtype != np.uint8 or len(shape) != 2:
        raise FormatError(f"image is {dtype} {shape}, expected uint8 2-D")
    if size is not None and shape != (size, size):
        raise FormatError(f"image shape {shape}, expected ({size}, {size})")
    n = shape[0] * shape[1]
    if len(view) - offset != n:
        raise FormatError(f".npy holds {len(view) - offset} pixel bytes, its header announces {n}")
    return np.frombuffer(data, dtype=np.uint8, count=n, offset=offset).reshape(shape, order="F" if fortran else "C")


def encode_meta(meta: dict[str, Any]) -> bytes:
    """Serialise sample metadata as canonical JSON (sorted keys, no whitespace)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def decode_meta(data: bytes) -> dict[str, Any]:
    """Parse a sample's ``.json`` member."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"unreadable .json: {exc}") from exc
    if not isinstance(meta, dict):
        raise FormatError(f".json holds a {type(meta).__name__}, expected an object")
    return meta


META_FIELDS = (
    "key",
    "patient_id",
    "source",
    "split",
    "target",
    "class",
    "boxes",
    "transform",
    "view_position",
    "sex",
    "age",
    "qa",
)
"""The fields of a sample's JSON: nothing else from the DICOM header leaves the source."""
META_FIELDS_BY_VERSION = {1: META_FIELDS[:-1], 2: META_FIELDS[:-1], 3: META_FIELDS, 4: META_FIELDS, 5: META_FIELDS, 6: META_FIELDS}
"""The fields of a sample's JSON in each format version."""
