"""One run per workdir: a lock file that names its holder and is kept fresh while it lives.

A run creates WORKDIR/run.lock holding its host, process id, process start time, a token of its
own and a refresh time that a background thread rewrites every REFRESH_SECONDS. A second run on
the same workdir - a second terminal, a requeued job while the first still runs, another host
on a shared filesystem or bucket - finds the file and stops with one line naming the holder. A
lock whose holder is gone is taken over with one warning:
  * same host: its process no longer exists (or the pid now belongs to a newer process);
  * another host: it has not been refreshed for STALE_SECONDS.
SIGTERM, SIGINT, the end of the run and an error release it; after kill -9 (or a lost host)
it stays behind, stale, for the next run to take over.

What creating the lock guarantees depends on the storage:
  * a filesystem: the file is created atomically (a hard link, or O_CREAT | O_EXCL), so of two
    runs starting at once exactly one gets it;
  * an object store (gs://), which has no exclusive create: a run writes its record, waits
    SETTLE_SECONDS and reads it back; the last writer wins, and a run that reads another's
    token stops. Two runs whose writes and read-backs interleave more than SETTLE_SECONDS
    apart can both start: the one whose record was overwritten sees the other's token at its
    next refresh (within REFRESH_SECONDS) and stops at its next checkpoint without saving it,
    but until then both write into the workdir. A run started while another live one holds
    the lock is always refused, as on a filesystem.

In a multi-process job only process 0 holds the file, for all processes of the job; the
others learn from it whether the job may go on.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from absl import logging
from etils import epath

from mim_jax import paths
from mim_jax.errors import RunError

LOCK_FILE = "run.lock"
REFRESH_SECONDS = 60.0
# A holder on another host counts as gone after this long without a refresh: ten refreshes
# missed, far longer than a filesystem hiccup, far shorter than a pretraining run.
STALE_SECONDS = 600.0
# Object stores: how long a run waits between writing its record and reading it back, far
# longer than the round trip of a write, so that a contender's write has landed by then.
SETTLE_SECONDS = 5.0


class WorkdirBusy(RunError):
    """Another live run holds the workdir."""
    exit_code = 2


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (Linux), which tells a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    now = _process_start(pid)
    return start is None or now is None or now == start


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"process {holder.get('pid')} on host {holder.get('host')!r}, started {started}, "
            f"refreshed {max(0, time.time() - holder.get('refreshed', 0)):.0f} s ago")


def holder_gone(holder: dict, now: Optional[float] = None) -> Optional[str]:
    """Why the lock's holder counts as gone, or None while it may still be running."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        if not _process_alive(int(holder.get("pid", -1)), holder.get("process_start")):
            return "its process no longer exists"
        return None
    age = now - float(holder.get("refreshed", 0))
    if age > STALE_SECONDS:
        return f"not refreshed for {age:.0f} s (> {STALE_SECONDS:.0f} s)"
    return None


class WorkdirLock:
    """Context manager holding WORKDIR/run.lock for this process; see the module docstring."""

    def __init__(self, workdir, *, refresh_seconds: float = REFRESH_SECONDS,
                 settle_seconds: float = SETTLE_SECONDS):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.local = paths.is_local(self.path)
        self.refresh_seconds = refresh_seconds
        self.settle_seconds = settle_seconds
        self.token = uuid.uuid4().hex  # tells our file from a successor's
        self.lost: Optional[str] = None  # set when another run took the lock from us
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        pid = os.getpid()
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": pid,
                       "process_start": _process_start(pid), "started": now,
                       "refreshed": now, "token": self.token}

    def _read(self) -> Optional[dict]:
        return self._read_file(self.path)

    @staticmethod
    def _read_file(path) -> Optional[dict]:
        try:
            return json.loads(epath.Path(path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or damaged: judged by its age below

    def _create(self) -> bool:
        """Creates the lock file whole, or returns False when one exists: the record is written
        to a file of our own first and then hard-linked into place (a link never overwrites),
        so no reader ever sees a half-written lock. Filesystems without hard links get an
        exclusive create instead; object stores, _claim."""
        if not self.local:
            return not self.path.exists() and self._claim()
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            return True
        finally:
            os.remove(tmp)

    def _claim(self) -> bool:
        """Object stores: writes our record (over whatever is there), lets the writes of
        contenders land and reads it back: ours only if our token is still there."""
        self._write_record()
        time.sleep(self.settle_seconds)
        current = self._read()
        return bool(current) and current.get("token") == self.token

    def _write_record(self) -> None:
        if not self.local:
            self.path.write_text(json.dumps(self.record))  # an object is replaced whole
            return
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f)
        os.replace(tmp, self.path)

    def acquire(self) -> None:
        """Takes the lock (or raises WorkdirBusy) and starts refreshing it."""
        self._take()
        self._thread = threading.Thread(target=self._refresh_loop, name="workdir-lock",
                                        daemon=True)
        self._thread.start()

    def _take(self) -> None:
        for _ in range(3):  # a holder may release or another run take over between checks
            if self._create():
                return
            holder = self._read()
            if holder is None:
                continue
            if holder == {}:
                age = time.time() - (os.path.getmtime(self.path) if self.local
                                     else self.path.stat().mtime)
                reason = (f"unreadable and {age:.0f} s old" if age > STALE_SECONDS else None)
            else:
                reason = holder_gone(holder)
            if reason is None:
                raise WorkdirBusy(
                    f"--workdir {self.path.parent} is in use by another run "
                    f"({describe(holder) if holder else 'its lock file is being written'}); "
                    f"wait for it to end or stop it, or use another --workdir. If that run is "
                    f"gone, delete {self.path}.")
            if not self.local:
                # No rename to take it by: claim it like a free one. Of several contenders
                # the last writer wins; the others read back its fresh record and are refused.
                if self._claim():
                    self._took_over(holder, reason)
                    return
                continue
            # Take over: move the stale file aside, then make sure it was the one judged
            # stale. Another contender may have replaced it with its own fresh lock in the
            # meantime; that one is put back (os.link never overwrites) and we are refused.
            aside = f"{self.path}.stale.{self.token}"
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                continue
            moved = self._read_file(aside)
            if moved != holder and moved.get("token") is not None:
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.remove(aside)
                continue
            os.remove(aside)
            self._took_over(holder, reason)
        if not self._create():
            raise WorkdirBusy(f"--workdir {self.path.parent}: another run took "
                              f"{self.path} at the same time; use another --workdir.")

    def _took_over(self, holder: dict, reason: str) -> None:
        logging.warning("Taking over %s: its holder (%s) is gone: %s.", self.path,
                        describe(holder) if holder else "unknown", reason)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            current = self._read()
            if current is None and self._create():
                continue  # moved away by a contender that then put nothing back: ours again
            current = self._read()
            if current and current.get("token") != self.token:
                self.lost = describe(current)
                logging.error("%s now belongs to another run (%s); this run stops at its next "
                              "checkpoint.", self.path, self.lost)
                return
            self.record["refreshed"] = time.time()
            try:
                self._write_record()
            except OSError as e:  # a full disk must not kill the run; the next refresh retries
                logging.warning("Could not refresh %s: %s", self.path, e)

    def check(self) -> None:
        """Raises if another run has taken the workdir over (called before each save)."""
        if self.lost:
            raise WorkdirBusy(f"another run took over --workdir {self.path.parent} "
                              f"({self.lost}) while this one was not refreshing its lock; "
                              "this run stopped without saving.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current and current.get("token") == self.token:
            self.path.unlink()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False



class _CoveredByProcess0:
    """The other processes of a multi-process job: process 0's lock covers them."""

    def check(self) -> None:
        pass


@contextlib.contextmanager
def hold(workdir, *, is_main: bool = True, agree=lambda ok: ok):
    """The job's hold on `workdir`. Process 0 (`is_main`) takes the lock; every process then
    calls `agree(ok)`, which returns process 0's `ok` (a broadcast in a multi-process job), so
    all processes stop together when the workdir is busy. Yields an object with check()."""
    lock, error = (WorkdirLock(workdir) if is_main else None), None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirBusy as e:
            error = e
    if not agree(error is None):
        raise error or WorkdirBusy(f"--workdir {workdir} is in use by another run; the log "
                                   "of process 0 of this job names it.")
    try:
        yield lock or _CoveredByProcess0()
    finally:
        if lock is not None:
            lock.release()
