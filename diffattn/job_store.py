"""The output folder of a batch job: each unit's files and manifest record as one transaction, recovery after a
crash, and the lock that keeps a second run out. The protocol is described in `diffattn.jobs`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .outputs import fsync_path, result_files


logger = logging.getLogger(__name__)

FAULT_ENV = "DIFFATTN_FAULT_POINT"  # tests only: "<point>[:<n>]" SIGKILLs this process the n-th time it gets there


class JobLockError(RuntimeError):
    """The output folder is being written by another run."""


# ------------------------------------------------------------------------------------------------ the transaction


def fault(point: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process at `point` when FAULT_ENV names it."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != point:
        return
    _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
    if _FAULT_COUNTS[point] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict[str, int] = {}
RANK_FILE = re.compile(r"^manifest-rank(?P<rank>\d+)\.jsonl$")
LOCK_FILE = re.compile(r"^\.lock-rank(?P<rank>\d+)$")
TEMP_FILE = re.compile(r"^\.(?P<stem>.+)\.tmp-rank(?P<rank>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")


def _temp_name(name: str, rank: int) -> str:
    """The hidden temporary of output `name` written by process `rank`; it keeps the file's extension last, so
    writers that pick a format by extension (imageio for MP4) see the real one."""
    stem, suffix = os.path.splitext(name)
    return f".{stem}.tmp-rank{rank}{suffix}"


def _manifest_lines(path: Path) -> list[dict[str, Any]]:
    """Complete records of one manifest (a line cut by a crash, with no newline, is not a record)."""
    records = []
    data = path.read_bytes()
    for raw in data.split(b"\n")[:-1] if not data.endswith(b"\n") else data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s: skipped a line that is not a record", path)
    return records


def _done(records: Iterable[dict[str, Any]], into: dict[str, dict[str, Any]] | None = None):
    """name -> record of the units `records` leave done: the last record of a name wins, a retraction undoes it."""
    done = {} if into is None else into
    for record in records:
        if record.get("retracted"):
            done.pop(record["name"], None)
        else:
            done[record["name"]] = record
    return done


def read_manifests(out: Path) -> dict[str, dict[str, Any]]:
    """Done units of earlier runs into `out`: name -> manifest record (from every process's manifest)."""
    done: dict[str, dict[str, Any]] = {}
    for manifest in sorted(Path(out).glob("manifest-rank*.jsonl")):
        _done(_manifest_lines(manifest), done)
    return done


def append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "ab+") as f:
        # a line cut by a crash has no newline; start after it, or the new record would be glued to it and lost
        f.seek(0, os.SEEK_END)
        cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
        f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _drop_cut_line(path: Path) -> None:
    """Truncate a manifest to its last complete line (a record cut by a crash never committed its unit)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        logger.warning("%s: dropped a record cut by a crash (%d bytes)", path, len(data) - keep)


def _link_unit(out: Path, files: list[str], rank: int) -> bool:
    """Link a committed unit's temporaries to their names, then remove them. False if a file and its temporary are
    both gone (the output was deleted by hand)."""
    complete = True
    for name in files:
        temp = out / _temp_name(name, rank)
        if not (out / name).exists():
            if not temp.exists():
                complete = False
                continue
            try:
                os.link(temp, out / name)
            except FileExistsError:
                pass
            fault("between-links")
    fsync_path(out)
    fault("after-links")
    for name in files:
        (out / _temp_name(name, rank)).unlink(missing_ok=True)
    fsync_path(out)
    return complete


def recover(out: Path, ranks: Iterable[int]) -> None:
    """Finish what a crash interrupted for the manifests and temporaries of `ranks` (see the module docstring)."""
    ranks = set(ranks)
    committed: dict[int, list[dict[str, Any]]] = {}
    for manifest in out.glob("manifest-rank*.jsonl"):
        match = RANK_FILE.match(manifest.name)
        if match and int(match.group("rank")) in ranks:
            _drop_cut_line(manifest)
            committed[int(match.group("rank"))] = _manifest_lines(manifest)
    for rank, records in committed.items():
        for record in _done(records).values():
            names = record.get("files", [])
            if all((out / n).exists() for n in names) and not any((out / _temp_name(n, rank)).exists() for n in names):
                continue
            if not _link_unit(out, names, rank):
                logger.warning("%s: files of %s are missing; it runs again", out, record["name"])
                append_record(out / f"manifest-rank{rank}.jsonl", {"name": record["name"], "retracted": True})
    named = {_temp_name(n, rank) for rank, records in committed.items() for r in records for n in r.get("files", [])}
    removed = False
    for path in out.iterdir():
        match = TEMP_FILE.match(path.name)
        if match and int(match.group("rank")) in ranks and path.name not in named:
            path.unlink(missing_ok=True)  # written before its unit committed: the unit runs again
            removed = True
    if removed:
        fsync_path(out)


def commit_unit(out: Path, rank: int, manifest: Path, record: dict[str, Any], result: Any, claimed: set[str]) -> None:
    """Write one unit's files and record as a transaction (temporaries, commit record, links)."""
    files = result_files(result, record["name"])
    names = [name for name, _ in files]
    taken = [n for n in names if (out / n).exists() or n in claimed]
    if taken:
        raise FileExistsError(
            f"{out / taken[0]} already exists and no manifest record names it; move it away and rerun (never "
            "overwritten)"
        )
    try:
        for name, write in files:
            temp = out / _temp_name(name, rank)
            temp.unlink(missing_ok=True)
            write(temp)
            fsync_path(temp)
            fault("temp-written")
        fsync_path(out)
        fault("before-commit")
    except BaseException:
        for name in names:
            (out / _temp_name(name, rank)).unlink(missing_ok=True)
        raise
    append_record(manifest, {**record, "files": names})
    fault("after-commit")
    _link_unit(out, names, rank)
    claimed.update(names)


# ------------------------------------------------------------------------------------------------------ the lock


class FolderLock:
    """`.lock-rank<r>` in the output folder, held with flock while the process runs; holds JSON {pid, host, time}.

    flock is released by the kernel when its process dies, so the lock of a killed run is free; a lock file naming
    another host is refused even when free here (flock need not reach across machines): delete it when that run is
    gone.
    """

    def __init__(self, out: Path, rank: int):
        self.path = out / f".lock-rank{rank}"
        self.fd: int | None = None

    @staticmethod
    def _holder(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = self._holder(self.path)
                raise JobLockError(
                    f"{self.path.parent} is being written by another run (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, lock {self.path}); wait for it to finish or use another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and flock: try the new one
                os.close(fd)
                continue
            holder = self._holder(self.path)
            if holder.get("host") not in (None, host):
                os.close(fd)
                raise JobLockError(
                    f"{self.path.parent} is locked by pid {holder.get('pid', '?')} on host {holder['host']} "
                    f"({self.path}); if that run is gone, delete the lock file"
                )
            if holder.get("pid"):
                logger.warning("%s: taking over the lock of pid %s, which is gone", self.path, holder["pid"])
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "time": time.time()}).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def locked_by_live_process(out: Path, rank: int) -> bool:
    """Whether another process holds `.lock-rank<rank>` now (probed without waiting)."""
    path = out / f".lock-rank{rank}"
    if not path.exists():
        return False
    probe = FolderLock(out, rank)
    try:
        probe.acquire()
    except JobLockError:
        return True
    probe.release()
    return False


def all_ranks_agree(ok: bool, state: Any) -> bool:
    """True when every process of the launch is `ok` (one collective; one process: `ok` itself)."""
    if state is None or state.num_processes == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1], device=state.device if state.device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0
