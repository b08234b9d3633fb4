"""``jobs/*.sbatch``: their text and the commands they render from their settings (no Slurm
needed: ``srun``, ``scontrol`` and the venv's python are stubs that record their arguments),
and, marked ``slurm``, the scripts submitted with ``sbatch`` and run to completion on the
synthetic data set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.fault_injection import fault_env

if TYPE_CHECKING:
    from tests.slurm_fixture import SlurmInfo

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
SCRIPTS = ("ingest.sbatch", "train.sbatch", "verify.sbatch")
JOB_TIMEOUT_S = 150
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "PREEMPTED", "DEADLINE"}


def _lines(name: str) -> list[str]:
    return (JOBS / name).read_text().splitlines()


def _settings(name: str) -> list[str]:
    """The lines of the settings block a user edits."""
    lines = _lines(name)
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# ---- settings: edit here"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("# ---- end of settings"))
    return [ln for ln in lines[start + 1 : end] if ln.strip()]


# ---------------------------------------------------------------- text, no Slurm


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash(name: str) -> None:
    proc = subprocess.run(["bash", "-n", str(JOBS / name)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_sbatch_directives_all_come_before_the_first_command(name: str) -> None:
    # sbatch stops reading #SBATCH lines at the first line that is not a comment.
    lines = _lines(name)
    assert lines[0] == "#!/usr/bin/env bash"
    first_command = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#"))
    directives = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    options = {ln.split()[1].split("=")[0] for ln in lines if ln.startswith("#SBATCH")}
    assert {"--job-name", "--output", "--time", "--cpus-per-task", "--mem"} <= options
    assert f"sbatch jobs/{name}" in "\n".join(lines[:30]), "the header says how to submit it"


def _setting_names(name: str) -> list[str]:
    return [re.match(r"[A-Z_]+", line).group(0) for line in _settings(name)]  # type: ignore[union-attr]


def _setting_values(name: str, env: dict[str, str]) -> dict[str, str]:
    """Each setting's value as the script's own settings block computes it under ``env``."""
    names = _setting_names(name)
    script = "\n".join(_settings(name)) + f'\nfor v in {" ".join(names)}; do printf "%s=%s\\0" "$v" "${{!v}}"; done'
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=True)
    return dict(item.split("=", 1) for item in proc.stdout.split("\0")[:-1])


def test_train_script_requests_one_task_per_node_with_gpus() -> None:
    directives = {ln.split()[1] for ln in _lines("train.sbatch") if ln.startswith("#SBATCH")}
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4"} <= directives


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, Any]:
    """A fake venv python, srun and scontrol that record their arguments (NUL-separated)."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    record = ('printf "%s\\0" "$@" > "$STUB_DIR/$(basename "$0").args"; env > "$STUB_DIR/$(basename "$0").env"; '
              'printf "%s" "$0" > "$STUB_DIR/$(basename "$0").path"\n')
    for path in (venv / "bin" / "python", bin_dir / "srun"):
        path.write_text("#!/usr/bin/env bash\n" + record)
        path.chmod(0o755)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && printf "node01\\nnode02\\n"\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_DIR=str(tmp_path), REPO=str(REPO), VENV=str(venv),
               SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="32",
               SLURM_JOB_NODELIST="node[01-02]")
    return {"env": env, "dir": tmp_path, "python": str(venv / "bin" / "python")}


def _render(stubs: dict[str, Any], name: str, settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(JOBS / name)], env={**stubs["env"], **settings},
                          capture_output=True, text=True, timeout=30, check=False)


def _recorded(stubs: dict[str, Any], program: str) -> tuple[list[str], dict[str, str]]:
    args = (stubs["dir"] / f"{program}.args").read_text().split("\0")[:-1]
    env = dict(line.split("=", 1) for line in (stubs["dir"] / f"{program}.env").read_text().splitlines() if "=" in line)
    return args, env


def _fill(template: list[str], values: dict[str, str]) -> list[str]:
    """``template`` with ``{NAME}`` replaced by a setting's value and ``{*NAME}`` by its words."""
    out: list[str] = []
    for token in template:
        star = re.fullmatch(r"\{\*(\w+)\}", token)
        out += values[star.group(1)].split() if star else [token.format_map(values)]
    return out


# The commands as the scripts build them from their settings: the values come from each
# script's own settings block (its defaults, or what the case sets), never copied here.
INGEST = ["-m", "ingest", "--dicom-dir", "{DICOM_DIR}", "--out", "{OUT}", "--cluster", "slurm", "--jobs", "{JOBS}",
          "--worker-timeout", "{WORKER_TIMEOUT_S}", "--labels", "{LABELS}", "--class-info", "{CLASS_INFO}"]
VERIFY = ["-m", "shards", "verify", "{OUT}", "--deep", "--workers", "{WORKERS}", "--json", "{REPORT}"]
TRAIN = ["-m", "{TRAIN_MODULE}", "--data", "{DATA}", "--task", "{TASK}", "--out", "{RUN}", "{*TRAIN_ARGS}", "--resume"]


@pytest.mark.parametrize(
    ("name", "settings", "program", "expected", "env_expected"),
    [
        ("ingest.sbatch", {}, "python", INGEST, {"TQDM_MININTERVAL": "{PROGRESS_EVERY_S}"}),
        (
            "ingest.sbatch",
            {"LABELS": "", "CLASS_INFO": "", "DICOM_DIR": "/d", "OUT": "/o", "JOBS": "3", "WORKER_QUEUE": "cpu",
             "WORKER_ACCOUNT": "rad", "WORKER_WALLTIME": "02:00:00", "WORKER_TIMEOUT_S": "60",
             "INGEST_ARGS": "--shard-size 64 --size 512", "PROGRESS_EVERY_S": "5"},
            "python",
            ["-m", "ingest", "--dicom-dir", "/d", "--out", "/o", "--cluster", "slurm", "--jobs", "3",
             "--worker-timeout", "60", "--queue", "cpu", "--account", "rad", "--walltime", "02:00:00",
             "--shard-size", "64", "--size", "512"],
            {"TQDM_MININTERVAL": "5"},
        ),
        ("verify.sbatch", {}, "python", VERIFY, {}),
        ("verify.sbatch", {"OUT": "/o", "SOURCE": "/d", "LABELS": "/l.csv", "WORKERS": "4", "REPORT": "/r.json"}, "python",
         ["-m", "shards", "verify", "/o", "--deep", "--workers", "4", "--json", "/r.json", "--source", "/d", "--labels", "/l.csv"],
         {}),
        (
            "train.sbatch", {}, "srun",
            ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=1",
             "{python}", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node={PROCS_PER_NODE}",
             "--rdzv-backend=c10d", "--rdzv-endpoint=node01:11234", "--rdzv-id=1234",
             "--max-restarts={MAX_RESTARTS}", *TRAIN],
            {"OMP_NUM_THREADS": "8", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
        ),
        (
            "train.sbatch", {"LAUNCH": "srun", "TASK": "detect", "TRAIN_ARGS": "--strategy fsdp"}, "srun",
            ["--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8", "--kill-on-bad-exit=1",
             "{python}", *TRAIN],
            {"OMP_NUM_THREADS": "8"},
        ),
    ],
)
def test_script_renders_its_settings_into_the_command(
    stubs: dict[str, Any], name: str, settings: dict[str, str], program: str,
    expected: list[str], env_expected: dict[str, str],
) -> None:
    proc = _render(stubs, name, settings)
    assert proc.returncode == 0, proc.stderr
    args, env = _recorded(stubs, program)
    values = {**_setting_values(name, {**stubs["env"], **settings}), "python": stubs["python"]}
    assert args == _fill(expected, values)
    for key, value in env_expected.items():
        assert env.get(key) == value.format_map(values), key


def test_the_defaults_are_rsnas_layout_on_a_shared_filesystem(stubs: dict[str, Any]) -> None:
    ingest = _setting_values("ingest.sbatch", stubs["env"])
    assert Path(ingest["LABELS"]).parent == Path(ingest["DICOM_DIR"]).parent == Path(ingest["CLASS_INFO"]).parent
    assert (Path(ingest["DICOM_DIR"]).name, Path(ingest["LABELS"]).name) == (
        "stage_2_train_images", "stage_2_train_labels.csv")
    train = _setting_values("train.sbatch", stubs["env"])
    verify = _setting_values("verify.sbatch", stubs["env"])
    assert ingest["OUT"] == train["DATA"] == verify["OUT"], "the three scripts chain on the same dataset"
    assert train["RUN"] == f"runs/{train['TASK']}-1234" and verify["REPORT"] == "verify-1234.json"


# Each setting set to a value of its own, and where the rendered command shows it: "args"
# (its words, in a row, or as the value of an --option=), "args:WORD" (WORD among them),
# "env:NAME" (a variable of the program's environment), "cwd" (the folder it runs in),
# "program" (the python it runs).
MARKERS = {
    "ingest.sbatch": {
        "REPO": ("{tmp}", "cwd"), "VENV": ("{tmp}/venv2", "program"), "DICOM_DIR": ("/m/dicom", "args"),
        "LABELS": ("/m/l.csv", "args"), "CLASS_INFO": ("/m/c.csv", "args"), "OUT": ("/m/out", "args"),
        "JOBS": ("5", "args"), "WORKER_QUEUE": ("q-m", "args"), "WORKER_ACCOUNT": ("acct-m", "args"),
        "WORKER_WALLTIME": ("07:07:07", "args"), "WORKER_TIMEOUT_S": ("77", "args"),
        "INGEST_ARGS": ("--size 96 --shard-size 7", "args"), "PROGRESS_EVERY_S": ("7", "env:TQDM_MININTERVAL"),
    },
    "train.sbatch": {
        "REPO": ("{tmp}", "cwd"), "VENV": ("{tmp}/venv2", "program"), "DATA": ("/m/data", "args"),
        "TASK": ("detect", "args"), "RUN": ("/m/run", "args"), "LAUNCH": ("srun", "args:--ntasks=8"),
        "PROCS_PER_NODE": ("6", "args"), "TRAIN_ARGS": ("--lr 0.7", "args"), "TRAIN_MODULE": ("probe_m", "args"),
        "MAX_RESTARTS": ("5", "args"),
    },
    "verify.sbatch": {
        "REPO": ("{tmp}", "cwd"), "VENV": ("{tmp}/venv2", "program"), "OUT": ("/m/out", "args"),
        "SOURCE": ("/m/src", "args"), "LABELS": ("/m/l.csv", "args"), "WORKERS": ("3", "args"),
        "REPORT": ("/m/r.json", "args"), "VERIFY_ARGS": ("--no-progress", "args"),
    },
}


def _shows(value: str, where: str, stubs: dict[str, Any], program: str) -> bool:
    args, env = _recorded(stubs, program)
    if where == "cwd":
        return env.get("PWD") == value
    if where == "program":  # the python run directly, or the one srun is told to run
        python = f"{value}/bin/python"
        return (stubs["dir"] / f"{program}.path").read_text() == python if program == "python" else python in args
    if where.startswith("env:"):
        return env.get(where[4:]) == value
    if where.startswith("args:"):
        return where[5:] in args
    words = value.split()
    runs = [args[i : i + len(words)] for i in range(len(args))]
    return words in runs or any(a.endswith(f"={value}") for a in args)


@pytest.mark.parametrize(("name", "setting"), [(n, s) for n in SCRIPTS for s in _setting_names(n)])
def test_every_setting_reaches_the_command(stubs: dict[str, Any], name: str, setting: str) -> None:
    assert setting in MARKERS[name], f"{name}: no marker for the setting {setting}: add one to MARKERS"
    value, where = MARKERS[name][setting]
    value = value.format(tmp=stubs["dir"])
    if where == "program":
        (Path(value) / "bin").mkdir(parents=True)
        os.symlink(stubs["python"], Path(value) / "bin" / "python")
    program = "srun" if name == "train.sbatch" else "python"
    default = _render(stubs, name, {})
    assert default.returncode == 0, default.stderr
    assert not _shows(value, where, stubs, program), f"{setting}={value!r} already shows without being set"
    proc = _render(stubs, name, {setting: value})
    assert proc.returncode == 0, proc.stderr
    assert _shows(value, where, stubs, program), f"{name}: {setting}={value!r} does not reach the command"


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("train.sbatch", {"LAUNCH": "mpirun"}, "allowed: torchrun, srun"),
        ("ingest.sbatch", {"VENV": "/nonexistent"}, "make the venv first"),
        ("verify.sbatch", {"VENV": "/nonexistent"}, "make the venv first"),
    ],
)
def test_script_refuses_bad_settings_with_exit_2(stubs: dict[str, Any], name: str, settings: dict[str, str], message: str) -> None:
    proc = _render(stubs, name, settings)
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize(
    ("exits", "max_restarts", "status", "calls"),
    [
        ([137, 0], "3", 0, 2),  # a rank SIGKILLed: the step runs again and finishes
        ([143, 137, 0], "3", 0, 3),
        ([137, 137], "1", 137, 2),  # out of restarts
        ([1], "3", 1, 1),  # a non-finite loss would come back: not retried
        ([2], "3", 2, 1),  # bad settings: not retried
    ],
)
def test_train_srun_launch_restarts_a_failed_step(
    stubs: dict[str, Any], exits: list[int], max_restarts: str, status: int, calls: int
) -> None:
    srun = stubs["dir"] / "bin" / "srun"  # exits with the next of ``exits`` at each call
    srun.write_text('#!/usr/bin/env bash\necho "$*" >> "$STUB_DIR/srun.calls"\n'
                    'n=$(wc -l < "$STUB_DIR/srun.calls"); codes=($STUB_EXITS); exit "${codes[n-1]}"\n')
    proc = _render(stubs, "train.sbatch", {"LAUNCH": "srun", "MAX_RESTARTS": max_restarts,
                                          "STUB_EXITS": " ".join(map(str, exits))})
    assert proc.returncode == status, proc.stderr
    lines = (stubs["dir"] / "srun.calls").read_text().splitlines()
    assert len(lines) == calls and all(line.endswith("--resume") for line in lines)
    assert proc.stdout.count("from the last checkpoint") == calls - 1


# ---------------------------------------------------------------- real Slurm


def _job_state(job_id: str) -> str:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30, check=False)
    m = re.search(r"\bJobState=(\S+)", proc.stdout)
    return m.group(1) if m else "GONE"


def _wait_for(job_ids: list[str], logs: list[Path], timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Poll until every job ended; return their final states (fail with the logs on a timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {j: _job_state(j) for j in job_ids}
        if all(s in ENDED or s == "GONE" for s in states.values()):
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids], check=False, timeout=30)
            pytest.fail(f"jobs not done after {timeout_s} s: {states}\n{_show(logs)}")
        time.sleep(1)


def _show(logs: list[Path]) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:] if p.exists() else '(missing)'}" for p in logs)


def _sbatch(script: str, options: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *options, str(JOBS / script)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _submit_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    return {**env, "REPO": str(REPO), "VENV": str(Path(sys.executable).parent.parent), "PNEUMO_DASHBOARD": ":0", **settings}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jobs_named(name: str) -> set[str]:
    proc = subprocess.run(["squeue", "--noheader", f"--name={name}", "--format=%i"],
                          capture_output=True, text=True, timeout=30, check=True)
    return set(proc.stdout.split())


@pytest.mark.slurm
def test_ingest_sbatch_cancelled_resubmitted_then_verify_sbatch(
    slurm_cluster: SlurmInfo, synth_small: Any, ingested_small: Path, tmp_path: Path
) -> None:
    """The user's chain on a cluster: the driver job is cancelled mid-run (its worker jobs go
    with it), the same script is submitted again and resumes, and verify.sbatch runs after it
    (afterok). The result is byte-identical to the LocalCluster run."""
    import yaml

    workers = f"pneumo-w-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    dask_dir = tmp_path / "dask"
    dask_dir.mkdir()
    (dask_dir / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"slurm": {
        "name": workers, "cores": 1, "memory": "1GB", "queue": slurm_cluster.partition, "walltime": "00:10:00",
        "interface": "lo", "log-directory": str(tmp_path / "worker-logs"), "local-directory": str(tmp_path / "local"),
    }}}))
    out = tmp_path / "ds"
    env = _submit_env(
        DASK_CONFIG=str(dask_dir), DICOM_DIR=str(synth_small.images_dir), LABELS=str(synth_small.labels_csv),
        CLASS_INFO=str(synth_small.class_info_csv), OUT=str(out), JOBS="2",
        INGEST_ARGS="--size 64 --shard-size 4 --val-fraction 0.25", WORKER_TIMEOUT_S="60",
    )
    small = ["-p", slurm_cluster.partition, "-c", "1", "--mem=2G", "-t", "00:05:00"]
    logs = [tmp_path / "ingest-1.out", tmp_path / "ingest-2.out", tmp_path / "verify.out"]

    first = _sbatch("ingest.sbatch", [*small, "-o", str(logs[0])], fault_env("*.dcm=sleep:0.5", env))
    done_dir = out / ".ingest" / "done"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (done_dir.is_dir() and any(done_dir.iterdir())):
        assert time.monotonic() < deadline and _job_state(first) not in ENDED, _show(logs[:1])
        time.sleep(0.3)
    subprocess.run(["scancel", first], check=True, timeout=30)
    assert _wait_for([first], logs[:1]) == {first: "CANCELLED"}
    deadline = time.monotonic() + 20  # SIGTERM -> the driver closes its cluster (not death-timeout's 60 s)
    while _jobs_named(workers):
        assert time.monotonic() < deadline, f"worker jobs outlived their cancelled driver: {_jobs_named(workers)}"
        time.sleep(0.5)
    assert not (out / "manifest.json").exists()

    second = _sbatch("ingest.sbatch", [*small, "-o", str(logs[1])], env)
    verify = _sbatch("verify.sbatch", [*small, "-o", str(logs[2]), f"--dependency=afterok:{second}"],
                     {**env, "SOURCE": str(synth_small.images_dir), "WORKERS": "1",
                      "REPORT": str(tmp_path / "verify.json")})
    states = _wait_for([second, verify], logs[1:])
    assert states == {second: "COMPLETED", verify: "COMPLETED"}, _show(logs)
    assert re.search(r"shards: \d built, [1-6] reused", logs[1].read_text()), _show(logs[1:2])
    assert _tree(out) == _tree(ingested_small), "the sbatch ingest differs from the LocalCluster run"
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report.get("ok") is True, report


PROBE = '''\
"""Stands in for ``python -m train``: joins the process group the way the trainer does."""
import json
import sys
from pathlib import Path

import torch

from train.distributed import all_reduce_sum, destroy, init_distributed

out = Path(sys.argv[sys.argv.index("--out") + 1])
env = init_distributed(timeout_s=60)
try:
    total = all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
              "launcher": env.launcher, "sum": total.item()}
    (out / f"rank{env.rank}.json").write_text(json.dumps(record))
finally:
    destroy()
'''

TRAIN_CPU = ["-N", "1", "-c", "2", "--gpus-per-node=0", "--mem=4G", "-t", "00:05:00"]


@pytest.mark.slurm
@pytest.mark.parametrize(("launch", "launcher"), [("torchrun", "torchrun"), ("srun", "slurm")])
def test_train_sbatch_starts_two_ranks_in_one_process_group(
    slurm_cluster: SlurmInfo, ingested_small: Path, tmp_path: Path, launch: str, launcher: str
) -> None:
    pytest.importorskip("torch")
    (tmp_path / "pneumo_rank_probe.py").write_text(PROBE)
    run, log = tmp_path / "run", tmp_path / "train.out"
    env = _submit_env(DATA=str(ingested_small), RUN=str(run), LAUNCH=launch, PROCS_PER_NODE="2",
                      TRAIN_MODULE="pneumo_rank_probe", TRAIN_ARGS="", PYTHONPATH=str(tmp_path))
    job = _sbatch("train.sbatch", ["-p", slurm_cluster.partition, *TRAIN_CPU, "-o", str(log)], env)
    assert _wait_for([job], [log]) == {job: "COMPLETED"}, _show([log])
    records = sorted((json.loads(p.read_text()) for p in run.glob("rank*.json")), key=lambda r: r["rank"])
    assert records == [
        {"rank": r, "world_size": 2, "local_rank": r, "launcher": launcher, "sum": 3.0} for r in (0, 1)
    ], _show([log])


@pytest.mark.slurm
def test_train_sbatch_runs_a_few_cpu_steps_to_completion_despite_a_killed_rank(
    slurm_cluster: SlurmInfo, ingested_small: Path, tmp_path: Path
) -> None:
    # rank 1 is SIGKILLed in step 3 (tests/inject/rank_killer.py); torchrun restarts the ranks, which
    # resume from the step-2 checkpoint: the script's defaults, nothing added
    run, log, mark = tmp_path / "run", tmp_path / "train.out", tmp_path / "killed"
    env = _submit_env(DATA=str(ingested_small), RUN=str(run), LAUNCH="torchrun", PROCS_PER_NODE="2", TASK="classify",
                      TRAIN_ARGS="--strategy ddp --amp none --max-steps 3 --batch-size 4 --image-size 64 --workers 0 "
                      "--ckpt-every 2", PYTHONPATH=f"{REPO / 'tests' / 'inject'}{os.pathsep}{REPO}",
                      PNEUMO_KILL="1/0/train.loop:train_step:3", PNEUMO_KILL_MARK=str(mark))
    job = _sbatch("train.sbatch", ["-p", slurm_cluster.partition, *TRAIN_CPU, "-o", str(log)], env)
    assert _wait_for([job], [log]) == {job: "COMPLETED"}, _show([log])
    assert mark.is_file(), f"rank 1 was not killed\n{_show([log])}"
    assert re.search(r"resumed from \S+/step-00000002 \(step 2\)", log.read_text()), _show([log])
    metrics = run / "metrics.jsonl"
    assert metrics.exists(), f"no {metrics}\n{_show([log])}"
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines() if line.strip()]
    assert max(s for s in steps if s is not None) == 3, steps
