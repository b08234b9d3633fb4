"""Pseudonyms: what ``--pseudonymize KEYFILE`` puts in a dataset instead of identifiers.

A hospital keeps a secret key; the ingest writes, in place of each identifier, a keyed hash
of it. The same key gives the same pseudonyms, so the same dataset (split, shard order and
bytes), and the key's holder can map an identifier to its pseudonym again (``verify``
reconciles a pseudonymized dataset with its source this way); without the key a pseudonym
cannot be tied to the identifier it stands for.

Every pseudonym is ``HMAC-SHA256(key, DOMAIN || 0x00 || value)`` in lower-case hex, truncated
to :data:`HEX_CHARS` characters (128 bits: no collision is expected below 2**64 values). The
domain keeps a patient id and a path with the same text from getting the same pseudonym:

============  ==================================  ====================================
domain        value                               used as
============  ==================================  ====================================
``patient``   the patient id (file name or tag)   ``patient_id``, the sample key
``path``      the file's path under --dicom-dir   ``source.path`` (``<hex>.dcm``)
``file``      an absolute path (folder, CSV)      the manifest's ``dicom_dir``, ...
``files``     the sorted (path, size) list        the manifest's source fingerprint
============  ==================================  ====================================

The key fingerprint, recorded in the manifest, is the HMAC of the fixed text
:data:`FINGERPRINT_TEXT`: it names the key without revealing it, so a run with another key
over the same dataset folder is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

HEX_CHARS = 32
"""Hex characters kept of each HMAC-SHA256 (128 of its 256 bits)."""
FINGERPRINT_TEXT = b"pneumo-hpc key fingerprint"
"""The fixed text whose HMAC names a key (:attr:`Pseudonymizer.fingerprint`)."""
MIN_KEY_BYTES = 16
"""Shortest key accepted: HMAC-SHA256 with a shorter key is as weak as the key."""
PATH_SUFFIX = ".dcm"
SCHEME = f"hmac-sha256/{HEX_CHARS}"
"""How the manifest names the pseudonyms: the MAC and the hex digits kept."""


class KeyFileError(ValueError):
    """A key file that cannot serve: missing, empty, too short or readable by others."""


def load_key(path: Path | str) -> bytes:
    """The key in ``path`` (its bytes, surrounding whitespace stripped).

    Raises:
        KeyFileError: the file is missing, not a regular file, readable by group or others
            (``chmod 600``), empty or shorter than :data:`MIN_KEY_BYTES`.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"--pseudonymize {path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"--pseudonymize {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"--pseudonymize {path}: not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"--pseudonymize {path}: the key file is open to group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run chmod 600 {path}"
        )
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"--pseudonymize {path}: {exc.strerror}") from None
    if not key:
        raise KeyFileError(f"--pseudonymize {path}: the key file is empty")
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"--pseudonymize {path}: the key is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                           "(e.g. head -c 32 /dev/urandom | base64 > KEYFILE)")
    return key


class Pseudonymizer:
    """The pseudonyms of one key (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("empty pseudonymization key")
        self._key = key
        self.fingerprint = hmac.new(key, FINGERPRINT_TEXT, hashlib.sha256).hexdigest()[:HEX_CHARS]
        """Names the key in the manifest; reveals nothing of it."""

    @classmethod
    def from_file(cls, path: Path | str) -> "Pseudonymizer":
        """The pseudonymizer of the key in ``path`` (raises :class:`KeyFileError`)."""
        return cls(load_key(path))

    def _hex(self, domain: str, value: str) -> str:
        msg = domain.encode() + b"\x00" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:HEX_CHARS]

    def patient(self, patient_id: str) -> str:
        """A patient id's pseudonym: also a valid sample key (hex only)."""
        return self._hex("patient", patient_id)

    def path(self, rel_path: str) -> str:
        """A source file's pseudonymous path (relative to the DICOM folder)."""
        return self._hex("path", rel_path) + PATH_SUFFIX

    def file(self, path: Path | str) -> str:
        """An absolute path's pseudonym (the DICOM folder, the labels files)."""
        return "hmac:" + self._hex("file", os.fspath(Path(path).resolve()))

    def fingerprint_files(self, inputs: list[tuple[str, int]]) -> str:
        """The keyed fingerprint of a sorted ``(relative path, size)`` file list."""
        mac = hmac.new(self._key, b"files\x00", hashlib.sha256)
        for rel, size in inputs:
            mac.update(f"{rel}\t{size}\n".encode("utf-8", "surrogateescape"))
        return mac.hexdigest()
