"""The per-sample checksum: xxh3-128 of the data of each member a sample is built from.

The manifest keeps two checks of a shard's bytes. Its sha256 of the whole file serves
provenance, ``verify --deep`` and the first check of a downloaded copy. The per-sample
digests (format 2 on) serve the check on every read: a reader hashes each member it uses as it
reads it, at about the cost of a memory copy (xxh3 runs at several GB/s on one core, sha256 at
about 2), and refuses a sample whose bytes differ before any of it is used, whatever order the
samples are read in. Tar headers and padding are not part of a digest: the tar checksum of a
header, the member names and sizes checked against the manifest, and the file size cover them
on this path; ``verify --deep`` still hashes whole shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from shards.format import MEMBER_EXTS

DIGEST_HEX = 32
"""Hex characters of one digest (128 bits)."""


def new_digest() -> xxhash.xxh3_128:
    """A running digest: ``update`` it with a member's data in pieces, then ``hexdigest``."""
    return xxhash.xxh3_128()


def digest_of(*pieces: bytes | bytearray | memoryview) -> str:
    """Hex xxh3-128 of the concatenation of ``pieces`` (one member's data)."""
    if len(pieces) == 1:
        return xxhash.xxh3_128_hexdigest(pieces[0])
    h = xxhash.xxh3_128()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()


def check_digests(shard: str, samples: int, digests: Sequence[Sequence[str]]) -> None:
    """Raise ValueError unless ``digests`` holds one well-formed digest per member of each
    of the shard's ``samples`` samples."""
    if len(digests) != samples:
        raise ValueError(f"shard {shard}: {len(digests)} per-sample checksums for {samples} samples")
    for i, pair in enumerate(digests):
        if len(pair) != len(MEMBER_EXTS) or any(
            not isinstance(d, str) or len(d) != DIGEST_HEX for d in pair
        ):
            raise ValueError(f"shard {shard}: sample {i}'s checksums {pair!r}: want {len(MEMBER_EXTS)} "
                             f"hex digests of {DIGEST_HEX} characters ({'/'.join(MEMBER_EXTS)})")
