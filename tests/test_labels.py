"""Label file parsing: every problem reported with a reason, unusable files refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.label_csv import LabelFileError, read_label_csv

HEADER = "patientId,x,y,width,height,Target\n"


@pytest.mark.parametrize(
    "rows, reason, patient",
    [
        ("a,,,,,1\n", "positive_without_box", "a"),
        ("a,1,2,-3,4,1\n", "bad_box", "a"),
        ("a,1,2,x,4,1\n", "bad_box", "a"),
        ("a,1,2,,4,1\n", "bad_box", "a"),
        ("a,1,2,3,4,0\n", "negative_with_box", "a"),
        ("a,,,,,2\n", "bad_target", "a"),
        (",,,,,0\n", "missing_patient_id", None),
        ("a,,,,,0\na,1,2,3,4,1\n", "conflicting_target", "a"),
    ],
)
def test_row_problems_are_reported(tmp_path: Path, rows: str, reason: str, patient: str | None) -> None:
    f = tmp_path / "labels.csv"
    f.write_text(HEADER + rows)
    _, problems = read_label_csv(f)
    assert [(p.reason, p.patient_id) for p in problems] == [(reason, patient)]
    assert problems[0].line is not None and problems[0].path == str(f)


def test_rsna_rows_parse(tmp_path: Path) -> None:
    f = tmp_path / "labels.csv"
    f.write_text(HEADER + "p1,264.0,152.0,213.0,379.0,1\np1,562.0,152.0,256.0,453.0,1\np2,,,,,0\n")
    c = tmp_path / "class.csv"
    c.write_text("patientId,class\np1,Lung Opacity\np1,Lung Opacity\np2,Normal\n")
    labels, problems = read_label_csv(f, c)
    assert problems == []
    assert labels["p1"].target == 1 and labels["p1"].boxes == [(264, 152, 213, 379), (562, 152, 256, 453)]
    assert labels["p1"].class_name == "Lung Opacity"
    assert labels["p2"].target == 0 and labels["p2"].boxes == [] and labels["p2"].class_name == "Normal"


@pytest.mark.parametrize(
    "klass, reason",
    [("Weird", "bad_class"), ("Normal", "class_target_mismatch")],
)
def test_class_problems(tmp_path: Path, klass: str, reason: str) -> None:
    f = tmp_path / "labels.csv"
    f.write_text(HEADER + "p1,1,2,3,4,1\n")
    c = tmp_path / "class.csv"
    c.write_text(f"patientId,class\np1,{klass}\nzz,Normal\n")
    _, problems = read_label_csv(f, c)
    assert {p.reason for p in problems} == {reason, "class_without_label"}


@pytest.mark.parametrize("content", ["a;b;c\n1;2;3\n", "", "patientId,x,y\n"])
def test_unusable_file_raises(tmp_path: Path, content: str) -> None:
    f = tmp_path / "labels.csv"
    f.write_text(content)
    with pytest.raises(LabelFileError, match="lacks column"):
        read_label_csv(f)
