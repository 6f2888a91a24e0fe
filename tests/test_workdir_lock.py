"""One run per workdir (mim_jax.workdir_lock): the holder is named, a gone holder is taken
over, a live one never is, and a lock is only ever removed by the run that holds it."""
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import wait_until
from mim_jax import workdir_lock
from mim_jax.workdir_lock import WorkdirBusy, WorkdirLock


def _write_lock(workdir, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "process_start": workdir_lock._process_start(os.getpid()),
              "started": time.time(), "refreshed": time.time(), "token": "someone-else"}
    record.update(fields)
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
        json.dump(record, f)
    return record


def _holder(workdir):
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
        return json.load(f)


def _finished_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_its_holder_and_is_released(tmp_path):
    with WorkdirLock(str(tmp_path)) as lock:
        held = _holder(tmp_path)
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        assert held["token"] == lock.token
        with pytest.raises(WorkdirBusy, match=rf"is in use by another run \(process "
                                              rf"{os.getpid()} on host '{socket.gethostname()}'"):
            WorkdirLock(str(tmp_path)).acquire()
    assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)


def test_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with WorkdirLock(str(tmp_path)):
            raise RuntimeError("a failing run")
    assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)


def test_lock_of_a_process_that_is_gone_is_taken_over(tmp_path, caplog):
    _write_lock(tmp_path, pid=_finished_pid())
    with WorkdirLock(str(tmp_path)) as lock:
        assert _holder(tmp_path)["token"] == lock.token
    assert "its process no longer exists" in caplog.text


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    # Our own pid, but a start time that is not ours: the pid was reused after a kill -9.
    _write_lock(tmp_path, process_start="1")
    with WorkdirLock(str(tmp_path)) as lock:
        assert _holder(tmp_path)["token"] == lock.token


def test_live_holder_on_another_host_is_refused_until_it_goes_stale(tmp_path, caplog):
    _write_lock(tmp_path, host="other-host", pid=1,
                refreshed=time.time() - workdir_lock.STALE_SECONDS + 60)
    with pytest.raises(WorkdirBusy, match="process 1 on host 'other-host'"):
        WorkdirLock(str(tmp_path)).acquire()
    _write_lock(tmp_path, host="other-host", pid=1,
                refreshed=time.time() - workdir_lock.STALE_SECONDS - 60)
    with WorkdirLock(str(tmp_path)) as lock:
        assert _holder(tmp_path)["token"] == lock.token
    assert "not refreshed for" in caplog.text


def test_unreadable_lock_file_is_refused_while_recent(tmp_path):
    path = tmp_path / workdir_lock.LOCK_FILE
    path.write_text("{half a rec")
    with pytest.raises(WorkdirBusy, match="is in use by another run"):
        WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - workdir_lock.STALE_SECONDS - 60
    os.utime(path, (old, old))
    with WorkdirLock(str(tmp_path)) as lock:
        assert _holder(tmp_path)["token"] == lock.token


def test_holder_refreshes_and_notices_a_takeover(tmp_path):
    lock = WorkdirLock(str(tmp_path), refresh_seconds=0.05)
    lock.acquire()
    try:
        first = _holder(tmp_path)["refreshed"]
        time.sleep(0.3)
        assert _holder(tmp_path)["refreshed"] > first
        lock.check()  # still ours
        _write_lock(tmp_path, pid=12345, token="successor")  # another run took it over
        wait_until(lambda: lock.lost is not None)
        with pytest.raises(WorkdirBusy, match="another run took over --workdir"):
            lock.check()
    finally:
        lock.release()
    assert _holder(tmp_path)["token"] == "successor"  # not ours to remove


def test_other_processes_of_a_job_follow_process_0(tmp_path):
    with workdir_lock.hold(str(tmp_path), is_main=False, agree=lambda ok: True) as held:
        held.check()
        assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)  # process 0 holds it
    with pytest.raises(WorkdirBusy, match="the log of process 0 of this job names it"):
        with workdir_lock.hold(str(tmp_path), is_main=False, agree=lambda ok: False):
            pass
    # Process 0 that finds the workdir busy tells the others (agree(False)) and raises.
    told = []
    _write_lock(tmp_path)
    with pytest.raises(WorkdirBusy, match="is in use by another run"):
        with workdir_lock.hold(str(tmp_path), is_main=True,
                               agree=lambda ok: told.append(ok) or ok):
            pass
    assert told == [False]


def _contend(workdir, start, results):
    while time.time() < start:
        pass
    try:
        lock = WorkdirLock(workdir)
        lock.acquire()
        results.put(("held", os.getpid()))
        time.sleep(1.0)  # hold it while the other contender decides
        lock.release()
    except WorkdirBusy as e:
        results.put(("busy", str(e)))


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_two_processes_at_once_one_wins(tmp_path, stale):
    if stale:
        _write_lock(tmp_path, pid=_finished_pid())
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = time.time() + 2.0  # both past their imports, then at the same moment
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), start, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [o[0] for o in outcomes] == ["busy", "held"], outcomes
    assert f"process {outcomes[1][1]} on host" in outcomes[0][1]
    assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)
