"""Indented JSON text, byte for byte ``json.dumps(obj, indent=..., sort_keys=True)``, made faster.

The manifest, the version records and the source index are written indented with sorted keys,
and a manifest's SHA-256 is that of its text (:func:`shards.manifest.manifest_sha256`), so their
bytes are part of the format. ``json.dumps`` encodes indented text in pure Python, one generator
step per token; a manifest lists two digests per sample, so at 30,000 samples that is about
0.1 s a call, and an append writes the manifest in three places. :func:`indented` builds the
same text with one string join per container. :class:`Raw` inserts text encoded earlier (a
manifest inside its version record) without encoding it again.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

_INFINITY = float("inf")


class Raw:
    """JSON text encoded earlier by :func:`indented` at the top level, to be placed as a value:
    nested, its lines after the first take the indentation of where it goes."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text.rstrip("\n")


class _Unhandled(Exception):
    """A value :func:`_encode` leaves to ``json.dumps`` (a subclass, a key that is not a string)."""


def indented(obj: Any, indent: int = 2) -> str:
    """``json.dumps(obj, indent=indent, sort_keys=True)`` (no trailing newline).

    Dicts with string keys, lists, tuples, strings, ints, floats, booleans and None take the fast
    path; anything else (a subclass, another key type) is encoded by ``json.dumps`` itself, so the
    result and the errors raised are always ``json.dumps``'s. A :class:`Raw` value is placed as
    its text.
    """
    try:
        return _encode(obj, "", " " * indent)
    except _Unhandled:
        return json.dumps(_unraw(obj), indent=indent, sort_keys=True)


def _encode(o: Any, here: str, step: str) -> str:
    t = type(o)
    if t is str:
        return encode_basestring_ascii(o)
    if t is dict:
        if not o:
            return "{}"
        inner = here + step
        keys = sorted(o)  # a non-string key raises TypeError here as in json.dumps, or is left to it
        if any(type(k) is not str for k in keys):
            raise _Unhandled
        body = ",\n".join(f"{inner}{encode_basestring_ascii(k)}: {_encode(o[k], inner, step)}" for k in keys)
        return f"{{\n{body}\n{here}}}"
    if t is list or t is tuple:
        if not o:
            return "[]"
        inner = here + step
        try:  # strings only (a manifest's digest pairs): encoded in one call
            body = inner + f",\n{inner}".join(map(encode_basestring_ascii, o))
        except TypeError:
            body = ",\n".join(inner + _encode(v, inner, step) for v in o)
        return f"[\n{body}\n{here}]"
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if t is int:
        return int.__repr__(o)
    if t is float:
        if o != o:
            return "NaN"
        if o == _INFINITY:
            return "Infinity"
        if o == -_INFINITY:
            return "-Infinity"
        return float.__repr__(o)
    if t is Raw:
        return o.text.replace("\n", "\n" + here) if here else o.text
    raise _Unhandled


def _unraw(o: Any) -> Any:
    """``o`` with each :class:`Raw` parsed back, for ``json.dumps``."""
    if isinstance(o, Raw):
        return json.loads(o.text)
    if isinstance(o, dict):
        return {k: _unraw(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_unraw(v) for v in o]
    return o
