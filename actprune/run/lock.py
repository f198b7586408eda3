"""One process at a time in a job's folder: a lock file that names its holder and stays fresh.

Two sweeps started into one folder (or a sweep launched twice) would otherwise run the same job
twice, the second record replacing the first. The holder touches the lock while it runs; a lock
is stale when its holder is gone (same host, no such process), when it is this very SLURM job's
own earlier attempt (a requeue), or when nobody touched it for `STALE` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK = ".lock"
HEARTBEAT = 30  # seconds between touches of a held lock
STALE = 600  # a lock untouched this long belongs to a process that died


def _slurm_id() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


class Busy(Exception):
    """Another live process holds the job's folder (`holder`: its pid and host, where known)."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(path: Path, holder: dict) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if age > STALE:
        return True
    if holder.get("host") == socket.gethostname():
        return holder.get("pid") == os.getpid() or not _alive(int(holder.get("pid", -1)))
    return holder.get("slurm") is not None and holder.get("slurm") == _slurm_id()


class JobLock:
    """`with JobLock(job_dir):` holds the folder, or raises Busy naming who does."""

    def __init__(self, job_dir: Path):
        self.path = Path(job_dir) / LOCK
        self._stop = threading.Event()
        self._beat = None

    def __enter__(self) -> JobLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.me = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "slurm": _slurm_id(), "since": time.time()}
        )
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(handle, "w") as file:
                file.write(self.me)
            self._beat = threading.Thread(target=self._touch, daemon=True)
            self._beat.start()
            return self
        raise Busy(f"{self.path}: could not take the lock (other processes kept taking it)")

    def _take_over_if_stale(self) -> None:
        """Move a stale lock out of the way (raise Busy for a live one). The move is a rename, so of
        two processes that judged it stale only one moves it; a lock renewed meanwhile is put back."""
        try:
            judged = self.path.read_text()
            holder = json.loads(judged)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            judged, holder = None, {}  # half-written or unreadable: judged by its age alone
        if not _stale(self.path, holder):
            raise Busy(
                f"{self.path.parent} is being run by pid {holder.get('pid')} on {holder.get('host')} "
                f"(lock {self.path}): skipped here; if that process is gone, delete the lock",
                holder,
            )
        moved = self.path.with_name(f"{LOCK}.stale.{os.getpid()}.{time.time_ns()}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another process moved it first
        if judged is not None and moved.read_text() != judged:  # not the lock judged stale: give it back
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
        moved.unlink(missing_ok=True)

    def _touch(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            if self.path.read_text() == self.me:  # ours still, not one a takeover put there
                self.path.unlink()
        except FileNotFoundError:
            pass
