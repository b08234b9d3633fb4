"""shards.jsontext: indented JSON text byte for byte as json.dumps writes it, faster."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from shards.jsontext import Raw, indented


class _Int(int):
    pass


@pytest.mark.parametrize("obj", [
    pytest.param({}, id="empty-dict"),
    pytest.param([], id="empty-list"),
    pytest.param((), id="empty-tuple"),
    pytest.param("plain", id="top-level-string"),
    pytest.param(None, id="top-level-null"),
    pytest.param({"b": 1, "a": [True, False, None], "c": {}}, id="keys-sorted"),
    pytest.param({"x": [[], {}, [[]]]}, id="empty-containers-nested"),
    pytest.param({"é": "naïve ✓", "q": 'quote " and \\ and \n newline \t tab \x00'}, id="escapes-and-non-ascii"),
    pytest.param({"f": [0.1, 1e300, -0.0, 1.0, 2.5e-8, float("nan"), float("inf"), -float("inf")]},
                 id="floats-and-non-finite"),
    pytest.param({"i": [0, -1, 2**70, True]}, id="big-ints-and-bools"),
    pytest.param({"xxh3": (("a" * 32, "b" * 32), ("c" * 32, "d" * 32))}, id="digest-pairs-as-tuples"),
    pytest.param({"sub": _Int(3)}, id="int-subclass-left-to-json"),
    pytest.param({"np": np.float64(1.5)}, id="numpy-float-left-to-json"),
    pytest.param({1: "a", 2: "b"}, id="int-keys-left-to-json"),
    pytest.param(OrderedDict(b=1, a=2), id="dict-subclass-left-to-json"),
])
@pytest.mark.parametrize("indent", [1, 2])
def test_indented_is_json_dumps_sorted_byte_for_byte(obj, indent):
    assert indented(obj, indent=indent) == json.dumps(obj, indent=indent, sort_keys=True)


@pytest.mark.parametrize("where", ["top", "nested", "in-list", "beside-a-subclass"])
def test_raw_text_is_placed_as_the_value_it_encodes(where):
    inner = {"shards": [{"name": "train-000000.tar", "xxh3": [["a", "b"]]}], "version": 2}
    raw = Raw(indented(inner) + "\n")
    obj = {"top": raw, "nested": {"created": "t", "manifest": raw}, "in-list": [1, raw],
           "beside-a-subclass": {"m": raw, "n": _Int(1)}}[where]
    plain = json.loads(json.dumps(obj, default=lambda r: inner, sort_keys=True))
    assert indented(obj) == json.dumps(plain, indent=2, sort_keys=True)


@pytest.mark.parametrize("obj, error", [
    ({"a": object()}, TypeError),
    ({1: "a", "b": 2}, TypeError),
])
def test_what_json_dumps_refuses_is_refused_alike(obj, error):
    with pytest.raises(error):
        json.dumps(obj, indent=2, sort_keys=True)
    with pytest.raises(error):
        indented(obj)
