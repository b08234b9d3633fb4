"""Where a dataset lives: a folder, ``file://``, ``http(s)://`` or ``s3://``, opened through fsspec.

:func:`open_store` turns what a user passes as ``--data`` into a :class:`Store`: an fsspec
filesystem and the dataset root inside it. Readers then fetch ``manifest.json``,
``labels.zarr`` (zarr v3 over the same filesystem) and the shards from it.

Credentials are never ours to hold: s3fs reads the environment (``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ``AWS_ENDPOINT_URL``...), ``~/.aws/{config,credentials}`` and fsspec's own
configuration (``~/.config/fsspec/*.json``, ``FSSPEC_S3_*``); HTTP(S) servers may take
``user:password@`` in the URL. Whatever a URL carries, only :func:`redact_url`'s form of it is
ever logged, printed or written to a file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from shards.format import FormatError
from shards.labels import LabelTable, read_labels
from shards.manifest import LABELS_NAME, MANIFEST_NAME, REJECTS_NAME, SHARDS_DIR, Manifest
from shards.versions import (
    VersionNotFoundError,
    VersionRecord,
    VersionUnavailableError,
    labels_rel,
    record_rel,
    rejects_rel,
    split_version,
    with_version,
)

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http", "https", "s3")
"""URL schemes read through fsspec (``file://`` and plain paths are local folders)."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


class _RedactUserinfo(logging.Filter):
    """Blanks ``user:password@`` in URLs that third-party loggers print (fsspec and zarr at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "@" in text:
            record.msg, record.args = _USERINFO.sub(r"\1***@", text), None
        return True


for _name in ("fsspec", "fsspec.http", "fsspec.asyn", "fsspec.local", "s3fs", "aiohttp.client", "zarr",
              "zarr.group", "zarr.core.group", "zarr.core.array", "zarr.storage._fsspec", "zarr.core.sync"):
    logging.getLogger(_name).addFilter(_RedactUserinfo())


# botocore's DEBUG lines carry signed request headers (session tokens among them), and its INFO
# lines say where credentials were found on every client made: never let either reach a log.
for _name in ("botocore", "aiobotocore"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset root, or a file every dataset has, does not exist at the URL given."""


class RemoteReadError(OSError):
    """Reading from the server failed (connection refused or dropped, access denied...)."""


def redact_url(url: str | Path) -> str:
    """``url`` with any ``user:password@`` and query string replaced by ``***``.

    >>> redact_url("https://alice:s3cret@host/data?X-Amz-Signature=abc")
    'https://***@host/data?***'
    """
    text = str(url)
    if not _SCHEME.match(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", parts.fragment))


def scheme_of(location: str | Path) -> str | None:
    """The URL scheme of ``location`` in lower case (``s3``, ``https``...), None for a plain path."""
    m = _SCHEME.match(str(location)) if isinstance(location, str) else None
    return m.group(1).lower() if m else None


def normalize_location(location: str | Path) -> str | Path:
    """A plain path or ``file://`` URL as a :class:`Path`; a remote URL unchanged (a string).

    Raises:
        ValueError: An unsupported URL scheme.
    """
    scheme = scheme_of(location)
    if scheme is None:
        return Path(location)
    if scheme == "file":
        return Path(urlsplit(str(location)).path)
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{redact_url(location)}: unsupported URL scheme {scheme!r} "
                         f"(allowed: a path, file://, {', '.join(s + '://' for s in REMOTE_SCHEMES)})")
    return str(location).rstrip("/")


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is read over the network (``http(s)://``, ``s3://``)."""
    return isinstance(normalize_location(location), str)


T = TypeVar("T")

FETCH_ATTEMPTS = 4
"""Tries per remote read (a shard, the manifest, a labels chunk) before a fault is reported."""
BACKOFF_S = (0.5, 1.0, 2.0)
"""Waits between tries."""
CONNECT_TIMEOUT_S = 15.0
"""Seconds to open a connection to an HTTP(S) server."""
READ_TIMEOUT_S = 60.0
"""Seconds an HTTP(S) response may stay silent. aiohttp's own default is 5 minutes for the
whole request: a stalled connection (seen in CI on loopback) then costs 5 minutes and fails,
where a fresh try after a short timeout goes through."""

@dataclasses.dataclass(frozen=True)
class Store:
    """A dataset root: an fsspec filesystem and the root's path in it.

    Safe to pickle and to fork (DataLoader workers): the filesystem is looked up in each
    process (fsspec caches one instance per process, with the credentials it finds itself);
    an async filesystem made before a fork cannot be used after it.
    """

    location: str | Path
    """What the user gave (may hold credentials: never log it; use :attr:`display`)."""
    protocol: str
    """fsspec protocol: ``file``, ``http``, ``https`` or ``s3``."""
    root: str
    """The root in the filesystem's own path form (no trailing slash)."""
    version: int | None = None
    """The version named by ``@vN`` (None: the latest)."""

    @property
    def fs(self) -> Any:
        """This process's fsspec filesystem for :attr:`protocol`."""
        import fsspec

        try:
            if self.protocol in ("http", "https"):
                import aiohttp

                timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
                return fsspec.filesystem(self.protocol, client_kwargs={"timeout": timeout})
            return fsspec.filesystem(self.protocol)
        except ImportError as exc:
            raise RemoteReadError(f"{self.display}: reading {self.protocol}:// needs the `remote` extra "
                                  f"(pip install 'pneumo-hpc[remote]'): {exc}") from exc

    @property
    def display(self) -> str:
        """The location as it may be logged and stored."""
        return redact_url(self.location)

    @property
    def named(self) -> str:
        """The location and its ``@vN``, redacted, as a user names the dataset."""
        return with_version(self.display, self.version)

    @property
    def local(self) -> Path | None:
        """The root folder when the dataset is on a local (or shared) filesystem."""
        return self.location if isinstance(self.location, Path) else None

    def path(self, rel: str) -> str:
        """The fsspec path of ``rel`` under the root."""
        return f"{self.root}/{rel}"

    def url(self, rel: str) -> str:
        """``rel`` under the root, redacted, for messages."""
        return f"{self.display.rstrip('/')}/{rel}"

    def shard_url(self, name: str) -> str:
        """A shard's location, redacted, for messages."""
        return self.url(f"{SHARDS_DIR}/{name}")

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of ``rel``; :class:`DatasetNotFoundError` or :class:`RemoteReadError`."""

        def attempt() -> bytes:
            try:
                return self.fs.cat_file(self.path(rel))
            except FileNotFoundError as exc:
                raise DatasetNotFoundError(f"{self.url(rel)}: not found") from exc
            except PermissionError as exc:
                raise remote_error(self.url(rel), exc) from exc

        return retrying(self.url(rel), attempt, not_retried=(DatasetNotFoundError, RemoteReadError))

    def exists(self, rel: str) -> bool:
        try:
            return bool(self.fs.exists(self.path(rel)))
        except Exception as exc:  # noqa: BLE001
            raise remote_error(self.url(rel), exc) from exc

    def list_shards(self) -> list[str] | None:
        """File names under ``shards/``, or None when the server cannot list (HTTP without an index)."""
        try:
            entries = self.fs.ls(self.path(SHARDS_DIR), detail=False)
        except (FileNotFoundError, NotImplementedError, ValueError):
            return None
        except Exception as exc:  # noqa: BLE001
            raise remote_error(self.url(SHARDS_DIR), exc) from exc
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def zarr_store(self, rel: str) -> Any:
        """A read-only zarr store over ``rel`` (a folder path for local datasets)."""
        if self.local is not None:
            return self.local / rel
        from zarr.storage import FsspecStore

        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        # zarr drives the store from its own event loop; wrapping the blocking API (run in
        # threads) keeps one filesystem instance, its connections and its credentials.
        fs = AsyncFileSystemWrapper(self.fs, asynchronous=True)
        return FsspecStore(fs, path=self.path(rel), read_only=True)


def retrying(url: str, attempt: Callable[[], T], *, not_retried: tuple[type[BaseException], ...] = (),
             give_up: Callable[[BaseException], BaseException] | None = None) -> T:
    """``attempt()``, tried up to :data:`FETCH_ATTEMPTS` times with :data:`BACKOFF_S` between
    tries: the one retry policy of every remote read (a shard, a file, the metadata).

    Args:
        url: What is read (already redacted), for the log lines.
        attempt: One try; it cleans up after itself when it raises.
        not_retried: Raised at once: faults another try cannot mend (not found, access
            denied, a full disk).
        give_up: The error raised, from the last fault, after the last try (default
            :func:`remote_error`).
    """
    last: BaseException | None = None
    for n in range(1, FETCH_ATTEMPTS + 1):
        try:
            return attempt()
        except not_retried:
            raise
        except Exception as exc:  # noqa: BLE001 - aiohttp/botocore/OS errors have no common base
            last = exc
            log.warning("%s: try %d of %d failed: %s", url, n, FETCH_ATTEMPTS, remote_error(url, exc))
            if n < FETCH_ATTEMPTS:
                time.sleep(BACKOFF_S[min(n, len(BACKOFF_S)) - 1])
    assert last is not None
    raise (give_up or (lambda exc: remote_error(url, exc)))(last) from last


def remote_error(where: str, exc: BaseException) -> OSError:
    """One-line error for a failed read of ``where`` (already redacted)."""
    if isinstance(exc, PermissionError):
        return RemoteReadError(f"{where}: access denied ({exc}); check the credentials (AWS_PROFILE, "
                               "AWS_ACCESS_KEY_ID, ~/.aws/credentials)")
    reason = str(exc).strip() or type(exc).__name__
    return RemoteReadError(f"{where}: {redact_url(reason)}")


def open_store(location: str | Path) -> Store:
    """The :class:`Store` of a dataset root given as a path or a URL.

    Raises:
        ValueError: An unsupported URL scheme.
        RemoteReadError: The fsspec backend for the scheme is not installed.
    """
    base, version = split_version(location)
    where = normalize_location(base)
    if isinstance(where, Path):
        return Store(where, "file", str(where.resolve()), version)
    scheme = scheme_of(where)
    assert scheme is not None
    store = Store(where, scheme, where, version)
    if scheme not in ("http", "https"):
        store = dataclasses.replace(store, root=str(store.fs._strip_protocol(where)).rstrip("/"))
    return store


def read_manifest_from(store: Store) -> Manifest:
    """The manifest of the dataset at ``store``, of its version when it names one.

    Raises:
        DatasetNotFoundError: No manifest there (a wrong URL, or an unfinished ingest).
        RemoteReadError: The server could not be read.
        FormatError: Not a valid manifest.
        VersionNotFoundError, VersionUnavailableError: The version named cannot be read.
    """
    latest = read_latest_manifest(store)
    if store.version is None or store.version == latest.version:
        return latest
    return read_record_from(store, latest).manifest


def read_record_from(store: Store, latest: Manifest) -> VersionRecord:
    """The record of ``store``'s version (not the latest), checked to be readable."""
    assert store.version is not None
    if store.version > latest.version:
        raise VersionNotFoundError(f"{store.named}: no such version (the dataset has versions 1 to "
                                   f"{latest.version}; python -m shards versions {store.display} lists them)")
    try:
        record = VersionRecord.from_dict(json.loads(store.read_bytes(record_rel(store.version))))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{store.url(record_rel(store.version))}: not valid JSON ({exc})") from exc
    if record.unavailable is not None:
        raise VersionUnavailableError(f"{store.named}: cannot be read or checked: its shards were deleted on "
                                      f"{record.unavailable.date} ({record.unavailable.reason})")
    return record


def list_records_from(store: Store) -> list[VersionRecord]:
    """Every version record of the dataset at ``store``, unavailable ones included, the latest
    last. The latest manifest numbers them (a server need not list folders); a dataset made
    before versions existed is version 1 of itself."""
    from shards.versions import first_record

    latest = read_latest_manifest(store)
    records = []
    for n in range(1, latest.version + 1):
        try:
            data = store.read_bytes(record_rel(n))
        except DatasetNotFoundError:
            if n == latest.version == 1:
                records.append(first_record(latest, "-"))
                continue
            raise
        try:
            records.append(VersionRecord.from_dict(json.loads(data)))
        except json.JSONDecodeError as exc:
            raise FormatError(f"{store.url(record_rel(n))}: not valid JSON ({exc})") from exc
    return records


def version_rels(store: Store, latest: Manifest) -> tuple[str, str]:
    """``(labels store, rejects file)`` of ``store``'s version, relative to the root."""
    if store.version is None or store.version == latest.version:
        return LABELS_NAME, REJECTS_NAME
    return labels_rel(store.version), rejects_rel(store.version)


def read_latest_manifest(store: Store) -> Manifest:
    """``manifest.json`` of the dataset at ``store``: its latest version.

    Raises:
        DatasetNotFoundError: No manifest there (a wrong URL, or an unfinished ingest).
        RemoteReadError: The server could not be read.
        FormatError: Not a valid manifest.
    """
    try:
        text = store.read_bytes(MANIFEST_NAME)
    except DatasetNotFoundError as exc:
        raise DatasetNotFoundError(f"{store.url(MANIFEST_NAME)}: not found (no dataset at "
                                   f"{store.display}, or its ingest did not finish)") from exc
    try:
        return Manifest.from_dict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{store.url(MANIFEST_NAME)}: not valid JSON ({exc})") from exc


def read_labels_from(store: Store) -> LabelTable:
    """The label store of the dataset at ``store``, of its version when it names one (zarr v3,
    read over fsspec when remote)."""
    rel = LABELS_NAME
    if store.version is not None:
        latest = read_latest_manifest(store)
        if store.version != latest.version:
            read_record_from(store, latest)  # an unreadable version says why
        rel = version_rels(store, latest)[0]
    try:
        return read_labels(store.zarr_store(rel))
    except FormatError as exc:
        raise FormatError(f"{store.url(rel)}: {str(exc).split(': ', 1)[-1]}") from exc
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise remote_error(store.url(rel), exc) from exc
