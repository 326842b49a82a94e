"""Batch jobs under kill -9: the real `diffattn batch` process is killed at each named moment of the output
transaction (through the test-only fault hook) and at random moments, then rerun; every output must end up present
exactly once under its own name, readable, with one manifest record, and no file that existed after the kill may
change."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from diffattn.job_store import FAULT_ENV, FolderLock, JobLockError
from diffattn.jobs import JobDefaults, read_job, run_job


NAMES = [f"u{i}-seed0" for i in range(3)]


def _job(tmp_path: Path, count: int = 3) -> Path:
    path = tmp_path / "job.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"a red cat {i}", "name": f"u{i}"}) + "\n" for i in range(count)))
    return path


def _batch(job: Path, out: Path, fault: str | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    command = [sys.executable, "-m", "diffattn", "batch", str(job), "--out", str(out), "-m", "tiny-sd",
               "--steps", "1", "--maps"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every visible output file's bytes (manifests and failure logs are appended to by design)."""
    if not out.exists():
        return {}
    return {
        p.name: p.read_bytes()
        for p in out.iterdir()
        if not p.name.startswith(".") and not p.name.endswith(".jsonl") and p.is_file()
    }


def _check_exactly_once(out: Path, names: list[str], after_kill: dict[str, bytes]) -> None:
    records: list[dict] = []
    for manifest in out.glob("manifest-rank*.jsonl"):
        text = manifest.read_text()
        assert text.endswith("\n")
        records.extend(json.loads(line) for line in text.splitlines())  # every line is a whole record
    assert sorted(r["name"] for r in records) == sorted(names)  # one record per output
    named = [f for r in records for f in r["files"]]
    assert len(named) == len(set(named))
    for record in records:
        assert record["files"] == [f"{record['name']}.png", f"{record['name']}-attention.png"]
    visible = {p.name for p in out.iterdir() if not p.name.endswith(".jsonl")}
    assert visible == set(named)  # no orphan, no temporary, no lock left
    for name in named:
        with Image.open(out / name) as image:
            image.load()  # readable to the last byte
    for name, data in after_kill.items():  # nothing that existed after the kill was replaced or changed
        assert (out / name).read_bytes() == data, name


POINTS = [
    "temp-written:1",  # between the two files of a unit (the first written, the second not)
    "temp-written:2",  # every file of the unit written, not yet fsynced as a whole / committed
    "before-commit",  # files durable, record not written
    "after-commit",  # record durable, no file linked yet
    "between-links",  # one file of the unit linked, the other not
    "after-links",  # every file linked, temporaries not removed
    "unit-done:2",  # between units
]


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory):
    """For each moment: a run killed there, what it left, and a rerun to the end. Each moment has its own folder
    and the runs are one-thread processes, so two moments run side by side (the machine's two cores)."""

    def kill_then_rerun(point: str) -> dict:
        root = tmp_path_factory.mktemp(point.replace(":", "-"))
        job, out = _job(root), root / "out"
        first = _batch(job, out, fault=point)
        first.communicate(timeout=300)
        after_kill = _snapshot(out)
        second = _batch(job, out)
        stdout, stderr = second.communicate(timeout=300)
        return {"killed": first.returncode, "after_kill": after_kill, "out": out, "rerun": second.returncode,
                "stdout": stdout, "stderr": stderr}  # fmt: skip

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(POINTS, pool.map(kill_then_rerun, POINTS)))


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_moment_then_rerun_gives_every_output_once(point, killed_then_rerun):
    run = killed_then_rerun[point]
    assert run["killed"] == -signal.SIGKILL
    assert run["rerun"] == 0, run["stderr"][-2000:]
    assert f"{run['out']}: 3 of 3 outputs done" in run["stdout"]
    _check_exactly_once(run["out"], NAMES, run["after_kill"])


def _wait_for_lock(out: Path, proc: subprocess.Popen) -> None:
    """Until the process holds the folder (start-up done: what follows is loading, generating and writing)."""
    deadline = time.monotonic() + 120
    while not (out / ".lock-rank0").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_kill_at_random_moments_across_runs(tmp_path):
    job = _job(tmp_path, count=6)
    names = [f"u{i}-seed0" for i in range(6)]
    from diffattn.presets import preset_path

    preset_path("tiny-sd")  # built before timing, so the warm-up measures what every later run does
    warm_up = _batch(job, tmp_path / "warm-up")  # a whole run after start-up
    _wait_for_lock(tmp_path / "warm-up", warm_up)
    start = time.monotonic()
    warm_up.communicate(timeout=300)
    whole = time.monotonic() - start

    def trial(seed: int) -> int:
        """Up to two kills at random moments, then a run to the end; returns the number of kills."""
        rng, kills = random.Random(seed), 0
        out = tmp_path / f"out{seed}"
        for attempt in range(2):
            proc = _batch(job, out)
            _wait_for_lock(out, proc)
            # the first kill lands within the first half of a whole run, the second anywhere in what is left
            time.sleep(rng.uniform(0.0, 0.5 * whole if attempt == 0 else whole))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode in (0, -signal.SIGKILL), stderr[-2000:]
        after_kill = _snapshot(out)
        final = _batch(job, out)
        _, stderr = final.communicate(timeout=300)
        assert final.returncode == 0, stderr[-2000:]
        _check_exactly_once(out, names, after_kill)
        return kills

    with ThreadPoolExecutor(max_workers=2) as pool:  # two folders, one-thread processes: the machine's two cores
        kills = sum(pool.map(trial, (1234, 1235)))
    assert kills >= 2


def test_a_second_run_on_a_folder_being_written_is_refused_at_once(tmp_path):
    job, out = _job(tmp_path, count=6), tmp_path / "out"
    running = _batch(job, out)
    lock = out / ".lock-rank0"
    _wait_for_lock(out, running)
    holder = json.loads(lock.read_text() or "{}")
    units = read_job(job, JobDefaults(model="tiny-sd", steps=1, maps=True))
    start = time.monotonic()
    with pytest.raises(JobLockError, match=f"pid {running.pid} on {socket.gethostname()}"):
        run_job(units, out, process_index=0, num_processes=1)
    assert time.monotonic() - start < 2  # refused at once, not after waiting
    assert holder.get("pid") in (None, running.pid)
    stdout, stderr = running.communicate(timeout=300)
    assert running.returncode == 0, stderr[-2000:]
    _check_exactly_once(out, [f"u{i}-seed0" for i in range(6)], {})


def test_the_command_line_refuses_a_locked_folder_in_one_line(tmp_path, capsys):
    from diffattn.cli import main

    job, out = _job(tmp_path, count=1), tmp_path / "out"
    out.mkdir()
    with FolderLock(out, 0):
        code = main(["batch", str(job), "--out", str(out), "-m", "tiny-sd", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"is being written by another run (pid {os.getpid()} on {socket.gethostname()}" in err
    assert not list(out.glob("*.png"))


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_another_hosts_lock_is_refused(tmp_path):
    job, out = _job(tmp_path, count=1), tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = out / ".lock-rank0"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    units = read_job(job, JobDefaults(model="tiny-sd", steps=1))
    report = run_job(units, out, process_index=0, num_processes=1)
    assert report.generated == ["u0-seed0"] and not lock.exists()

    lock.write_text(json.dumps({"pid": 1, "host": "another-machine", "time": 0}))
    with pytest.raises(JobLockError, match="locked by pid 1 on host another-machine"):
        run_job(units, out, process_index=0, num_processes=1)
    assert lock.exists()  # left for its owner


def test_stale_temporaries_of_the_folder_are_cleaned_at_start(tmp_path):
    job, out = _job(tmp_path, count=1), tmp_path / "out"
    out.mkdir()
    (out / ".u0-seed0.tmp-rank0.png").write_bytes(b"")  # a kill during a write, before the unit committed
    (out / ".u7-seed0.tmp-rank3.png").write_bytes(b"\x89PNG")  # left by a wider earlier launch
    units = read_job(job, JobDefaults(model="tiny-sd", steps=1))
    run_job(units, out, process_index=0, num_processes=1)
    assert sorted(p.name for p in out.iterdir()) == ["manifest-rank0.jsonl", "u0-seed0.png"]
