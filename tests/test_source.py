"""Finding the inputs (shards.source.discover): by suffix, never opening a ``*.dcm`` file."""

from __future__ import annotations

import builtins
import io
from pathlib import Path

import pytest

from shards.source import discover, patient_id_of

PREAMBLE_FILE = b"\0" * 128 + b"DICM" + b"rest"


def test_discover_opens_only_files_without_the_dcm_suffix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    files = {
        "a.dcm": b"not even DICOM",  # an input by its suffix: its worker rejects it (not_dicom)
        "sub/B.DCM": PREAMBLE_FILE,
        "sub/deeper/1.2.826.0.1.3680043.8.498.1": PREAMBLE_FILE,  # UID-named: found by its preamble
        "README.txt": b"notes",
        "short": b"DICM",
        ".hidden/c.dcm": PREAMBLE_FILE,
        ".d.dcm": PREAMBLE_FILE,
    }
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    opened: list[str] = []
    real_open = io.open

    def spy(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    found = discover(tmp_path)
    monkeypatch.undo()

    assert found.inputs == sorted([("a.dcm", 14), ("sub/B.DCM", 136), ("sub/deeper/1.2.826.0.1.3680043.8.498.1", 136)])
    assert found[0] == found.inputs and found.ignored == 2  # README.txt, short
    assert sorted(opened) == sorted(["1.2.826.0.1.3680043.8.498.1", "README.txt", "short"])
    assert [patient_id_of(r) for r, _ in found.inputs] == ["a", "B", "1.2.826.0.1.3680043.8.498.1"]
