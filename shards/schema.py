"""The JSON Schemas that ``python -m shards verify`` checks a manifest's field types and values
against (its processing parameters and shard entries), reporting every problem at once.

The types are those of the JSON as Python reads it, and stricter than JSON Schema's own: an
``integer`` is an ``int`` (not ``true``, not ``3.0``). Each subschema that a problem is reported against has
a ``description``: the expected value, as a report line states it (and a ``title``, the name
the line gives the value, where that is not the field's own name).

A sample's JSON is checked by hand (:func:`shards.scan.check_meta`): it is checked once per
sample, where jsonschema costs 20 times as much (150 us a sample against 7.5 us).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator, validators

from shards.format import SPLITS


def _is_integer(_checker: Any, x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)

HEX64_PATTERN = "^[0-9a-f]{64}$"
PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "params",
    "required": ["size", "clahe_clip", "clahe_grid"],
    "properties": {"size": {"type": "integer", "minimum": 1, "title": "params.size",
                            "description": "a positive integer"}},
}
"""A manifest's processing parameters, as far as verify reads them."""

SHARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "title": "shard name", "description": "a file name"},
        "split": {"enum": list(SPLITS), "description": f"one of {list(SPLITS)}"},
        "samples": {"type": "integer", "minimum": 0, "description": "a non-negative integer"},
        "bytes": {"type": "integer", "minimum": 0, "description": "a non-negative integer"},
        "sha256": {"type": "string", "pattern": HEX64_PATTERN, "description": "64 lowercase hex digits"},
    },
}
"""A manifest's shard entry."""

SHARD_TYPES_SCHEMA: dict[str, Any] = {
    **SHARD_SCHEMA, "properties": {**SHARD_SCHEMA["properties"], "sha256": {"type": "string"}},
}
"""What a scan and the manifest's sums need of a shard entry: :data:`SHARD_SCHEMA` less the
digest's form (a digest of another form is reported, and the scan still shows what the file holds)."""


@dataclasses.dataclass(frozen=True)
class FieldProblem:
    """One field that breaks a schema, as a report line states it."""

    what: str
    """The field's name and value (``split 'tr'``), or what it lacks (``params lack 'size'``)."""
    expected: str | None
    """The field's ``description``: what it should hold."""
    field: str | int | None
    """The document's own field the problem is in; None for the document itself (its type, or
    fields it lacks)."""


class Schema:
    """A compiled schema that lists every problem of a document at once, one per described
    field (several broken parts of one field make one problem)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        _StrictValidator.check_schema(schema)
        self.schema = schema
        self._validator = _StrictValidator(schema)

    def is_valid(self, doc: Any) -> bool:
        return self._validator.is_valid(doc)

    def problems(self, doc: Any) -> list[FieldProblem]:
        """Every problem of ``doc``, in the order the validator meets them."""
        found: dict[tuple, FieldProblem] = {}
        for error in self._validator.iter_errors(doc):
            path, sub = self._described(list(error.absolute_path))
            value = doc
            for step in path:
                value = value[step]
            name = sub.get("title") or (str(path[-1]) if path else "document")
            field = path[0] if path else None
            if error.validator == "required" and error.instance is value:
                missing = [f for f in error.validator_value if f not in value]
                shown = repr(missing[0]) if len(missing) == 1 else repr(missing)
                found.setdefault((*path, "required"), FieldProblem(f"{name} lack {shown}", None, field))
            else:
                found.setdefault(tuple(path), FieldProblem(f"{name} {value!r}", sub.get("description"), field))
        return list(found.values())

    def _described(self, path: list[str | int]) -> tuple[list[str | int], Mapping[str, Any]]:
        """The longest prefix of ``path`` whose subschema has a description or a title, and that
        subschema (the whole document and schema when none has)."""
        best: tuple[list[str | int], Mapping[str, Any]] = ([], self.schema)
        sub: Mapping[str, Any] | None = self.schema
        for i, step in enumerate(path):
            if isinstance(step, int):
                items = sub.get("items")
                sub = items if isinstance(items, Mapping) else None
            else:
                sub = sub.get("properties", {}).get(step)
            if sub is None:
                break
            if "description" in sub or "title" in sub:
                best = (path[: i + 1], sub)
        return best


PARAMS = Schema(PARAMS_SCHEMA)
SHARD = Schema(SHARD_SCHEMA)
SHARD_TYPES = Schema(SHARD_TYPES_SCHEMA)
