"""``shards.manifest.sha256_file``: the digest of every byte, whatever the file's size against
the reader's buffer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shards.manifest import sha256_file


@pytest.mark.parametrize("size", [0, 1, (256 << 10) - 1, 256 << 10, (256 << 10) + 1, (5 << 20) + 3],
                         ids=["empty", "one-byte", "buffer-less-one", "one-buffer", "buffer-plus-one", "5-MiB-odd"])
def test_sha256_file_hashes_every_byte(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_sha256_file_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "absent")
