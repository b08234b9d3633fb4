"""Scanning one shard for ``python -m shards verify``: hash and parse it in one pass.

:func:`scan_shard` reads a shard's bytes exactly once, hashing them as they arrive and parsing
the tar headers, member names, key pairing, JSON (and with ``deep`` the images) from the same
buffer; with ``digests`` it also hashes each sample's members as the writer does (xxh3-128,
:mod:`shards.checksum`). It never raises for damaged data: everything found is a
:class:`Problem` in the returned :class:`ShardScan`, for the driver in :mod:`shards.verify` to
report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from shards.checksum import digest_of
from shards.format import (
    CLASS_NAMES,
    FORMAT_VERSION,
    IMAGE_EXT,
    META_EXT,
    MEMBER_EXTS,
    META_FIELDS_BY_VERSION,
    FormatError,
    check_key,
    check_member_name,
    decode_image,
    decode_meta,
    key_for,
    split_member,
)
from shards.geometry import TRANSFORM_FIELDS, letterbox_geometry
from shards.manifest import READ_CHUNK, sha256_file
from shards.qa import QA_FLAGS
from shards.report import Problem
from shards.tar import TarHeaderError, TarMember, TarParser, TarTruncatedError

log = logging.getLogger(__name__)

HEX64 = re.compile(r"^[0-9a-f]{64}$")
"""A hex SHA-256 digest."""


@dataclasses.dataclass
class ShardScan:
    """What scanning one shard found (the result of one task)."""

    name: str
    bytes: int = 0
    """Bytes read (the file size, unless it could not be read)."""
    sha256: str | None = None
    """Hex sha256 of the bytes read; None if the file could not be opened."""
    keys: list[str] = dataclasses.field(default_factory=list)
    """Keys of the samples found, in file order (one per key group)."""
    complete: bool = False
    """True when the tar parsed to its end-of-archive marker; False means keys may be missing."""
    positives: int = 0
    boxes: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Each sample's parsed JSON (``keep_records``), for the cross-checks done by the driver."""
    xxh3: list[tuple[str, str]] | None = None
    """Each sample's hex xxh3-128 of its ``.npy`` and ``.json`` data, aligned with :attr:`keys`
    (``digests``); None when not computed."""
    problems: list[Problem] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


class _HashedChunks:
    """A :class:`shards.tar.ByteSource` that reads a file in big chunks, hashing each chunk as
    it arrives, and hands out byte ranges from them: the file's bytes are read exactly once,
    whatever is parsed or skipped.

    A memoryview returned by :meth:`read` is valid until the next call.
    """

    def __init__(self, raw: BinaryIO, chunk: int = READ_CHUNK) -> None:
        self._raw = raw
        self._buf = bytearray(chunk)
        self._mv = memoryview(self._buf)
        self._pos = self._end = 0
        self.sha256 = hashlib.sha256()
        self.total = 0

    @property
    def offset(self) -> int:
        """File offset of the next byte to hand out."""
        return self.total - (self._end - self._pos)

    def _fill(self) -> bool:
        n = self._raw.readinto(self._mv)
        if not n:
            return False
        self.sha256.update(self._mv[:n])
        self.total += n
        self._pos, self._end = 0, n
        return True

    def read(self, n: int) -> bytes | memoryview:
        """The next ``n`` bytes (fewer at end of file)."""
        if self._end - self._pos >= n:
            view = self._mv[self._pos : self._pos + n]
            self._pos += n
            return view
        parts = [bytes(self._mv[self._pos : self._end])]
        need = n - (self._end - self._pos)
        self._pos = self._end
        while need and self._fill():
            k = min(need, self._end)
            parts.append(bytes(self._mv[:k]))
            self._pos, need = k, need - k
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Skip ``n`` bytes (still hashed); return how many there were."""
        done = 0
        while True:
            k = min(self._end - self._pos, n - done)
            self._pos += k
            done += k
            if done == n or not self._fill():
                return done

    def drain(self) -> int | None:
        """Consume the rest of the file; return the offset of its first non-zero byte, if any."""
        first: int | None = None
        while True:
            if first is None and self._pos < self._end:
                rest = self._mv[self._pos : self._end].tobytes()
                stripped = rest.lstrip(b"\0")
                if stripped:
                    first = self.offset + len(rest) - len(stripped)
            self._pos = self._end
            if not self._fill():
                return first


def _key_of(name: str | None) -> str | None:
    """Best effort: the sample key in a member name (None when there is none)."""
    try:
        return check_key(split_member(name)[0]) if name is not None else None
    except FormatError:
        return None


class _ShardWalk:
    """The state of one pass over a shard's tar structure."""

    def __init__(self, scan: ShardScan, chunks: _HashedChunks, *, split: str | None, size: int | None,
                 deep: bool, keep_records: bool, digests: bool = False,
                 format_version: int = FORMAT_VERSION) -> None:
        self.format_version = format_version
        self.scan, self.chunks = scan, chunks
        self.split, self.size, self.deep, self.keep = split, size, deep, keep_records
        self.digests = digests
        if digests:
            scan.xxh3 = []
        self.cur_key: str | None = None
        self.cur_exts: set[str] = set()
        self.cur_meta: dict[str, Any] | None = None
        self.cur_digests: dict[str, str] = {}
        self.seen: set[str] = set()

    def problem(self, check: str, what: str, key: str | None = None, expected: str | None = None) -> None:
        self.scan.problems.append(Problem(check, what, expected, shard=self.scan.name, key=key))

    def run(self) -> None:
        parser = TarParser(self.chunks, self.scan.name)
        try:
            for member in parser.members():
                self._member(member, parser)
        except TarTruncatedError as exc:
            self._truncated(exc)
            return
        except TarHeaderError as exc:
            self.problem("tar_header", f"{exc.what}; rest of shard not parsed", key=_key_of(exc.name))
            return
        self._close_sample()
        junk = self.chunks.drain()
        if junk is not None:
            self.problem("tar_trailer", f"non-zero byte at offset {junk} after the end-of-archive marker")
        self.scan.complete = True

    def _truncated(self, exc: TarTruncatedError) -> None:
        if exc.member is not None:
            self.problem("tar_truncated", exc.what, key=_key_of(exc.member))
        elif self.cur_key is not None and len(self.cur_exts) < 2:
            self.problem("tar_truncated", f"{exc.what}, before this sample's other member", key=self.cur_key)
        else:
            self._close_sample()
            after = f" after key {self.scan.keys[-1]}" if self.scan.keys else ""
            self.problem("tar_truncated", exc.what + after)
        self.cur_key = None  # reported; no "missing .json" on top

    def _member(self, member: TarMember, parser: TarParser) -> None:
        """Check one member; read its data when there is something to check in it."""
        name = member.name
        key: str | None = None
        ok = member.is_file
        if not ok:
            self.problem("tar_member", f"member {name!r} is not a regular file (type {member.type!r})")
        try:
            check_member_name(name)
            key, ext = split_member(name)
            check_key(key)
        except FormatError as exc:
            if ok:
                self.problem("member_name", str(exc), key=key)
            ok = False
        if ok and ext not in MEMBER_EXTS:
            self.problem("tar_member", f"unexpected member {name!r}", key=key, expected=f".{IMAGE_EXT} or .{META_EXT}")
            ok = False
        if not ok or key is None:
            return
        if key != self.cur_key:
            self._close_sample()
            self.cur_key, self.cur_exts, self.cur_meta, self.cur_digests = key, set(), None, {}
        if ext in self.cur_exts:
            self.problem("pairing", f"member {name} occurs twice in a row", key=key)
            return
        self.cur_exts.add(ext)
        if ext == META_EXT:
            data = bytes(parser.read_data(member))
            if self.digests:
                self.cur_digests[ext] = digest_of(data)
            self._meta(key, data)
        elif self.deep or self.digests:
            data = parser.read_data(member)  # a truncation raises here, not as an image problem
            if self.digests:
                self.cur_digests[ext] = digest_of(data)
            if self.deep:
                try:
                    decode_image(data, self.size)
                except FormatError as exc:
                    self.problem("image", str(exc), key=key)

    def _close_sample(self) -> None:
        key = self.cur_key
        if key is None:
            return
        self.cur_key = None
        missing = [f".{e}" for e in MEMBER_EXTS if e not in self.cur_exts]
        if missing:
            self.problem("pairing", f"sample lacks {' and '.join(missing)}", key=key)
            return
        if key in self.seen:
            self.problem("duplicate_key", "key occurs twice in this shard", key=key)
        self.seen.add(key)
        self.scan.keys.append(key)
        if self.scan.xxh3 is not None:
            self.scan.xxh3.append((self.cur_digests.get(IMAGE_EXT, ""), self.cur_digests.get(META_EXT, "")))
        meta = self.cur_meta
        if meta is not None:
            if meta.get("target") == 1:
                self.scan.positives += 1
            boxes = meta.get("boxes")
            self.scan.boxes += len(boxes) if isinstance(boxes, list) else 0
        if self.keep:
            self.scan.records.append(meta if meta is not None else {"key": key})

    def _meta(self, key: str, data: bytes) -> None:
        try:
            meta = decode_meta(data)
        except FormatError as exc:
            self.problem("meta", str(exc), key=key)
            return
        if meta.get("key") != key:
            self.problem("meta", f"{key}.json names key {meta.get('key')!r}", key=key, expected=key)
        if self.split is not None and meta.get("split") != self.split:
            self.problem("meta", f"split {meta.get('split')!r} in a {self.split} shard", key=key, expected=self.split)
        self.cur_meta = meta
        if self.deep:
            for check, what, expected in check_meta(meta, key, self.size, self.format_version):
                self.problem(check, what, key=key, expected=expected)


def scan_shard(
    path: Path | str,
    *,
    split: str | None = None,
    size: int | None = None,
    deep: bool = False,
    keep_records: bool = False,
    digests: bool = False,
    format_version: int = FORMAT_VERSION,
) -> ShardScan:
    """Hash and parse one shard in a single pass over its bytes; never raises for bad data.

    Args:
        path: the shard file.
        split: the split the manifest gives the shard (each JSON must agree), or None.
        size: the image side (deep mode checks every image), or None.
        deep: decode every image and check every JSON field (:func:`check_meta`).
        format_version: the manifest's format version, which decides the JSON's fields.
        keep_records: return every sample's parsed JSON in :attr:`ShardScan.records`.
        digests: hash each sample's members as the writer does (:attr:`ShardScan.xxh3`), for
            a manifest that records per-sample digests (format 2 on).

    Returns:
        A :class:`ShardScan` with the sha256, the keys in file order and the problems found.
    """
    t0 = time.perf_counter()
    path = Path(path)
    scan = ShardScan(name=path.name)
    try:
        raw = open(path, "rb", buffering=0)
    except OSError as exc:
        scan.problems.append(Problem("shard_unreadable", f"cannot open: {exc.strerror or exc}", shard=path.name))
        return scan
    with raw:
        chunks = _HashedChunks(raw)
        try:
            _ShardWalk(scan, chunks, split=split, size=size, deep=deep, keep_records=keep_records,
                       digests=digests, format_version=format_version).run()
            chunks.drain()  # a parse stopped early still hashes the whole file
        except OSError as exc:
            scan.problems.append(Problem("shard_unreadable", f"read error at byte {chunks.total}: {exc}",
                                         shard=path.name))
            scan.complete = False
        scan.bytes, scan.sha256 = chunks.total, chunks.sha256.hexdigest()
    scan.seconds = time.perf_counter() - t0
    return scan


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_meta(
    meta: dict[str, Any], key: str, size: int | None, format_version: int = FORMAT_VERSION
) -> list[tuple[str, str, str | None]]:
    """Deep checks of one sample's JSON: exact fields (those of ``format_version``), value
    types, boxes, transform, QA flags.

    Written out by hand rather than as a JSON Schema: this runs once per sample, and
    jsonschema costs about 20 times as much (see :mod:`shards.schema`).

    Returns:
        ``(check, what, expected)`` for each problem found (empty when the JSON is sound).
    """
    out: list[tuple[str, str, str | None]] = []
    fields, wanted = set(meta), META_FIELDS_BY_VERSION.get(format_version, META_FIELDS_BY_VERSION[FORMAT_VERSION])
    if fields != set(wanted):
        extra, missing = sorted(fields - set(wanted)), sorted(set(wanted) - fields)
        parts = ([f"extra fields {extra}"] if extra else []) + ([f"missing fields {missing}"] if missing else [])
        what = "; ".join(parts)
        out.append(("meta_fields", what, f"exactly {list(wanted)}"))
    flags = meta.get("qa", [])
    if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)
            and flags == sorted(set(flags) & set(QA_FLAGS), key=QA_FLAGS.index)):
        out.append(("meta_value", f"qa {flags!r}", f"a list of distinct flags from {list(QA_FLAGS)}, in that order"))
    pid = meta.get("patient_id")
    if not isinstance(pid, str) or not pid:
        out.append(("meta_value", f"patient_id {pid!r}", "a non-empty string"))
    elif key_for(pid) != key:
        out.append(("meta_value", f"patient_id {pid!r} gives key {key_for(pid)!r}", key))
    src = meta.get("source")
    if not (isinstance(src, dict) and isinstance(src.get("path"), str) and isinstance(src.get("sha256"), str)
            and HEX64.match(src["sha256"])):
        out.append(("meta_value", f"source {src!r}", "{path: str, sha256: 64 hex digits}"))
    target = meta.get("target")
    if target not in (-1, 0, 1) or isinstance(target, bool):
        out.append(("meta_value", f"target {target!r}", "-1, 0 or 1"))
    cls = meta.get("class")
    if cls is not None and cls not in CLASS_NAMES:
        out.append(("meta_value", f"class {cls!r}", f"one of {list(CLASS_NAMES)} or null"))
    for field in ("view_position", "sex"):
        if meta.get(field) is not None and not isinstance(meta.get(field), str):
            out.append(("meta_value", f"{field} {meta.get(field)!r}", "a string or null"))
    age = meta.get("age")
    if age is not None and not (isinstance(age, int) and not isinstance(age, bool) and 0 <= age <= 130):
        out.append(("meta_value", f"age {age!r}", "an integer 0..130 or null"))
    boxes = meta.get("boxes")
    if not isinstance(boxes, list):
        out.append(("meta_value", f"boxes {boxes!r}", "a list of [x1, y1, x2, y2]"))
    else:
        if boxes and target != 1:
            out.append(("meta_value", f"{len(boxes)} box(es) on a sample with target {target!r}", "no boxes"))
        for b in boxes:
            if not (isinstance(b, list) and len(b) == 4 and all(_finite_number(v) for v in b)):
                out.append(("meta_value", f"box {b!r}", "[x1, y1, x2, y2] of finite numbers"))
            elif size is not None and not (0 <= b[0] < b[2] <= size and 0 <= b[1] < b[3] <= size):
                out.append(("box_outside", f"box {_fmt_box(b)} is not inside the {size}x{size} image or has no area",
                            f"0 <= x1 < x2 <= {size}, 0 <= y1 < y2 <= {size}"))
    out.extend(_check_transform(meta.get("transform"), size))
    return out


def _check_transform(tr: Any, size: int | None) -> list[tuple[str, str, str | None]]:
    if not (isinstance(tr, dict) and set(tr) == set(TRANSFORM_FIELDS) and all(_finite_number(tr[f]) for f in tr)):
        return [("transform", f"transform {tr!r}", f"numbers {list(TRANSFORM_FIELDS)}")]
    if size is not None and tr["size"] != size:
        return [("transform", f"transform size {tr['size']}", f"{size} (the manifest's params.size)")]
    rows, cols = tr["rows"], tr["cols"]
    if not (isinstance(rows, int) and isinstance(cols, int) and rows > 0 and cols > 0):
        return [("transform", f"source geometry rows={rows} cols={cols}", "positive integers")]
    geom = letterbox_geometry(rows, cols, int(tr["size"]))
    same_pad = (tr["pad_x"], tr["pad_y"]) == (geom.pad_x, geom.pad_y)
    if not (math.isclose(tr["scale"], geom.scale, rel_tol=1e-9) and same_pad):
        got = f"scale {tr['scale']} pad ({tr['pad_x']}, {tr['pad_y']})"
        return [("transform", f"{got} for a {cols}x{rows} source",
                 f"scale {geom.scale} pad ({geom.pad_x}, {geom.pad_y})")]
    return []


def _fmt_box(b: Any) -> str:
    return "[" + ", ".join(f"{float(v):.2f}" for v in b) + "]"


def fmt_boxes(boxes: Any) -> str:
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return "[" + ", ".join(_fmt_box(b) for b in arr) + "]"


def hash_files(root: Path | str, rels: list[str]) -> dict[str, str]:
    """sha256 of each file ``root/rel``; an unreadable file maps to ``"error: ..."``."""
    out: dict[str, str] = {}
    for rel in rels:
        try:
            out[rel] = sha256_file(Path(root) / rel)
        except OSError as exc:
            out[rel] = f"error: {exc.strerror or exc}"
    return out


