"""The documentation says what the code does: generated pages are current, every flag has a
help text, the site builds without a broken link or anchor, the getting-started page runs as
written, and the README quotes only figures that stand in ``docs/performance.md``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO))  # this checkout's tools/, whichever checkout the environment installed

from tools import gendocs  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NO_MKDOCS_2_WARNING": "1",
            **extra}


@pytest.mark.parametrize("module", [m for m, _ in gendocs.CLI_MODULES])
def test_every_argument_has_a_help_text(module: str) -> None:
    parser = next(p for m, _, p in gendocs.parsers() if m == module)
    assert gendocs.missing_help(parser) == []


@pytest.mark.parametrize("page", [gendocs.CLI_PAGE, gendocs.CONFIG_PAGE], ids=lambda p: p.name)
def test_generated_page_is_current(page: Path) -> None:
    text = gendocs.pages()[page]
    committed = page.read_text() if page.is_file() else ""
    assert committed == text, (f"{page.relative_to(REPO)} differs from what the code gives: "
                               f"run `{gendocs.REGENERATE}` and commit the result")


def test_missing_help_names_the_flag() -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m x")
    p.add_argument("--documented", help="says what it does")
    p.add_argument("--bare")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("run")
    s.add_argument("path")
    assert gendocs.missing_help(p) == ["python -m x --bare BARE", "python -m x run", "python -m x run PATH"]


def test_config_reference_lists_every_field() -> None:
    import dataclasses

    from train import config

    page = gendocs.config_page()
    for name, cls in config._SECTIONS.items():  # noqa: SLF001
        assert f"## `[{name}]`" in page
        for field in dataclasses.fields(cls):
            assert gendocs.field_docs(cls).get(field.name), f"[{name}] {field.name} has no docstring"
            assert f"| `{field.name}` |" in page


@pytest.mark.slow
def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---------------------------------------------------------------- the README's figures

UNITS = r"(?:ms|s|x|%|GB|MB|KB|GB/s|MB/s|images/s|samples/s|core-minutes|core-hours)"


def _numbers(text: str) -> set[str]:
    """Measured figures as written: a number or a range with a unit, or a number with a
    thousands separator (commands and code spans aside)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    number = r"\d[\d,]*(?:\.\d+)?"
    found = {m.group(1) for m in re.finditer(
        rf"(?<![\w.,-])({number}(?:-{number})?)\s?{UNITS}(?![\w/])", text)}
    found |= set(re.findall(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\w.])", text))
    return found


def test_numbers_finds_the_figures() -> None:
    text = "took 12.5 s, 2,000 images/s and 0.2-0.3 GB; Python 3.11, `--n 512`, 4 core-minutes"
    assert _numbers(text) == {"12.5", "2,000", "0.2-0.3", "4"}


def test_readme_quotes_only_figures_that_stand_in_performance_md() -> None:
    readme = (REPO / "README.md").read_text()
    perf = (DOCS / "performance.md").read_text() + (DOCS / "slurm.md").read_text()
    missing = sorted(n for n in _numbers(readme) if n not in perf)
    assert not missing, f"README.md quotes figures not in docs/performance.md (or slurm.md's cost model): {missing}"


def test_performance_tables_are_dated_and_reproducible() -> None:
    text = (DOCS / "performance.md").read_text()
    sections = re.split(r"\n## ", text)[1:]
    assert sections
    for section in sections:
        title = section.splitlines()[0]
        if "|---" not in section:
            continue
        assert re.search(r"\b20\d\d-\d\d\b", section), f"performance.md '{title}': no date"
        assert re.search(r"(?i)machine|VM|CPU|GPU", section), f"performance.md '{title}': no machine"
        assert "python -m " in section, f"performance.md '{title}': no command that reproduces it"


# ---------------------------------------------------------------- getting-started, run as written

# What the test changes in the page's blocks so that they run in seconds on 2 cores. Each
# must match exactly once: a change of the page that breaks one fails here.
SUBSTITUTIONS: dict[str, str] = {
    "--out dataset": "--out dataset --size 128 --shard-size 8 --workers 2 --no-progress",
    "--out new-dataset": "--out new-dataset --size 128 --workers 1 --no-progress",
    "--source hospital-export --labels labels.csv": "--source hospital-export --labels labels.csv "
                                                    "--workers 1 --no-progress",
    "--epochs 30 --batch-size 16": "--epochs 1 --max-steps 2 --batch-size 4 --image-size 64 --workers 0 "
                                   "--amp none --log-every 1",
    "--out predictions.csv": "--out predictions.csv --workers 0",
}


def getting_started_blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash and python block, in page order."""
    text = (DOCS / "getting-started.md").read_text()
    return re.findall(r"```(bash|python)\n(.*?)```", text, re.S)


def test_getting_started_substitutions_each_apply_once() -> None:
    text = "".join(code for _, code in getting_started_blocks())
    for old in SUBSTITUTIONS:
        assert text.count(old) == 1, f"getting-started.md: {old!r} appears {text.count(old)} times"


@pytest.fixture
def hospital_export(synth_small, tmp_path: Path) -> Path:
    """``synth_small`` laid out like a PACS export: nested folders, no suffix, names that are
    not patient ids; plus ``new-export``, a few of the same images in another tree."""
    files = sorted(synth_small.images_dir.glob("*.dcm"))
    for i, src in enumerate(files):
        dest = tmp_path / "hospital-export" / f"202{4 + i % 2}" / f"ward-{i % 3}" / f"study-{i:04d}" / "IM00001"
        dest.parent.mkdir(parents=True)
        shutil.copyfile(src, dest)
    for i, src in enumerate(files[:6]):
        dest = tmp_path / "new-export" / f"batch-{i % 2}" / f"IMG{i:05d}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    shutil.copyfile(synth_small.labels_csv, tmp_path / "labels.csv")
    return tmp_path


@pytest.mark.slow
def test_getting_started_runs_as_written(hospital_export: Path) -> None:
    bindir = hospital_export / ".bin"
    bindir.mkdir()
    # A script, not a link: a venv's interpreter finds its pyvenv.cfg through the path it is run by.
    (bindir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python").chmod(0o755)
    env = _env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PNEUMO_DASHBOARD=":0", MPLBACKEND="Agg")
    outputs = []
    for n, (lang, code) in enumerate(getting_started_blocks()):
        for old, new in SUBSTITUTIONS.items():
            code = code.replace(old, new)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        proc = subprocess.run(cmd, cwd=hospital_export, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 0, f"block {n} ({lang}) failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    all_out = "\n".join(outputs)
    assert "OK: no problems found" in all_out
    assert (hospital_export / "runs/first/model.pt").is_file()
    assert (hospital_export / "runs/first/curves.png").is_file()
    rows = (hospital_export / "predictions.csv").read_text().splitlines()
    assert rows[0] == "patientId,PredictionString" and len(rows) == 1 + 6
    assert "boxes" in outputs[-2] and "[[" in outputs[-1]  # the predictions, a box in source pixels
