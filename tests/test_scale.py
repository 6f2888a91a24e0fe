"""Scale-out on CPU: FSDP, several processes, resharding restores and preemption, each run
through `python -m mim_jax.main` as on a cluster (simulated devices, gloo collectives)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import logged_losses
from test_main import ROOT, TINY

STEPS = ["--config.total_steps=8", "--config.batch_size=16", "--config.warmup_steps=2",
         "--config.log_every_steps=1", "--config.checkpoint.every_steps=4",
         "--config.checkpoint.asynchronous=False",
         "--config.evaluators.reconstruction.every_steps=100"]
# The synthetic source gives the same global batch whatever the process count.
SYNTHETIC = ["--config.data.name=synthetic", "--config.data.image_size=16"]


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _cmd(workdir, tfds_dir, *overrides):
    return [sys.executable, "-m", "mim_jax.main", "--config", "configs/mae.py:quickstart",
            "--workdir", str(workdir), f"--config.data.data_dir={tfds_dir}", *TINY, *STEPS,
            *overrides]


def _run(workdir, tfds_dir, *overrides, devices=4):
    run = subprocess.run(_cmd(workdir, tfds_dir, *overrides), cwd=ROOT, env=_env(devices),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _run_processes(workdir, tfds_dir, *overrides, processes=2, devices=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        _cmd(workdir, tfds_dir, *overrides, "--distributed",
             f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
             f"--process_id={pid}"),
        cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(processes)]
    return procs


def _state_bytes(workdir):
    """(bytes in all, bytes on one device) from the line the trainer writes in parameters.txt."""
    with open(os.path.join(workdir, "parameters.txt")) as f:
        match = re.search(r"train state bytes: (\d+) in all, (\d+) per device", f.read())
    return int(match.group(1)), int(match.group(2))


def _resume_copy(source, target, from_step):
    """`source` as if it had been stopped after the checkpoint of `from_step`."""
    shutil.copytree(source, target)
    for step in os.listdir(os.path.join(target, "checkpoints")):
        if int(step) > from_step:
            shutil.rmtree(os.path.join(target, "checkpoints", step))
    os.remove(os.path.join(target, "final_metrics.json"))


def _assert_same_losses(a, b, rtol):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=rtol)


@pytest.mark.slow
def test_fsdp_quarters_the_state_per_device_and_trains_like_data_parallel(tfds_dir, tmp_path):
    """fsdp=4 on 4 devices: each device holds ~1/4 of the parameter and optimizer bytes, the
    losses equal the data-parallel run's, and a data-parallel checkpoint resumes under FSDP."""
    dp, fsdp = tmp_path / "dp", tmp_path / "fsdp"
    _run(dp, tfds_dir, *SYNTHETIC, "--config.fsdp_min_size=0")
    _run(fsdp, tfds_dir, *SYNTHETIC, "--config.mesh.data=1", "--config.mesh.fsdp=4",
         "--config.fsdp_min_size=0")
    total_dp, per_device_dp = _state_bytes(dp)
    total_fsdp, per_device_fsdp = _state_bytes(fsdp)
    assert total_dp == total_fsdp == per_device_dp
    # Not exactly 1/4: scalars (step, counters) and odd-sized tensors stay replicated.
    assert 0.24 < per_device_fsdp / total_fsdp < 0.3, (per_device_fsdp, total_fsdp)
    _assert_same_losses(logged_losses(dp), logged_losses(fsdp), rtol=1e-6)

    # data -> fsdp: the data-parallel run's step-4 checkpoint, resumed on the FSDP mesh.
    _resume_copy(dp, tmp_path / "dp_to_fsdp", from_step=4)
    _run(tmp_path / "dp_to_fsdp", tfds_dir, *SYNTHETIC, "--config.mesh.data=1",
         "--config.mesh.fsdp=4", "--config.fsdp_min_size=0")
    _assert_same_losses(logged_losses(dp), logged_losses(tmp_path / "dp_to_fsdp"), rtol=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_and_checkpoints_reshard(tfds_dir, tmp_path):
    """2 processes x 2 devices give the losses of 1 process x 4 devices (same global batch and
    seed); their checkpoint resumes on 1 x 4 with fsdp and on 1 x 1 with the same losses."""
    multi = tmp_path / "2x2"
    t0 = time.perf_counter()
    procs = _run_processes(multi, tfds_dir, *SYNTHETIC)
    outs = [p.communicate(timeout=600) for p in procs]
    multi_seconds = time.perf_counter() - t0
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "[process 0/2] JAX" in outs[0][1] and "2 process(es), 4 devices" in outs[0][1]
    assert "[process 1/2] " in outs[1][1]  # each line says where it comes from
    print(f"2 processes x 2 devices, 8 steps through main: {multi_seconds:.1f} s")
    with open(multi / "metrics.jsonl") as f:  # written by process 0 only
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert sorted(os.listdir(multi / "checkpoints")) == ["4", "8"]
    # The evaluators ran over both processes' shares of the labelled set.
    assert any("knn/top1" in r for r in records)
    assert not (multi / "run.lock").exists()  # process 0 held the workdir for both, then let go

    single = tmp_path / "1x4"
    _run(single, tfds_dir, *SYNTHETIC)
    _assert_same_losses(logged_losses(multi), logged_losses(single), rtol=1e-6)

    _resume_copy(multi, tmp_path / "2x2_to_1x4_fsdp", from_step=4)
    _run(tmp_path / "2x2_to_1x4_fsdp", tfds_dir, *SYNTHETIC, "--config.mesh.data=1",
         "--config.mesh.fsdp=4", "--config.fsdp_min_size=0")
    _assert_same_losses(logged_losses(multi), logged_losses(tmp_path / "2x2_to_1x4_fsdp"),
                        rtol=1e-6)

    _resume_copy(multi, tmp_path / "2x2_to_1x1", from_step=4)
    _run(tmp_path / "2x2_to_1x1", tfds_dir, *SYNTHETIC, devices=1)
    # One device sums the batch in another order than four: equal up to float rounding.
    _assert_same_losses(logged_losses(multi), logged_losses(tmp_path / "2x2_to_1x1"),
                        rtol=1e-5)


def _wait_for_step(workdir, step, procs, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and logged_losses(workdir) and \
                max(logged_losses(workdir)) >= step:
            return
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"step {step} was not reached in {timeout} s")


LONG = ["--config.total_steps=200", "--config.checkpoint.every_steps=1000",
        "--config.evaluators.reconstruction.every_steps=1000"]


def _stopped_step(err, signame, total=200):
    last = err.strip().splitlines()[-1]
    assert re.match(rf"mim_jax: stopped by {signame} after step \d+ of {total}; its checkpoint "
                    "is in ", last), last
    assert "Traceback" not in err
    return int(re.search(r"after step (\d+)", last).group(1))


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_the_run_resumes_exactly(tfds_dir, tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.Popen(_cmd(workdir, tfds_dir, *SYNTHETIC, *LONG), cwd=ROOT,
                            env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_step(workdir, 3, [proc])
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a second signal while stopping changes nothing
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = _stopped_step(err, "SIGTERM")
    assert 3 <= stopped < 200
    assert os.listdir(workdir / "checkpoints") == [str(stopped)]
    assert max(logged_losses(workdir)) <= stopped  # nothing logged past the saved step

    _run(workdir, tfds_dir, *SYNTHETIC, *LONG, devices=1)  # the same command resumes
    straight = tmp_path / "straight"
    _run(straight, tfds_dir, *SYNTHETIC, *LONG, devices=1)
    a, b = logged_losses(workdir), logged_losses(straight)
    assert sorted(a) == sorted(b) == list(range(1, 201))
    assert [a[s] for s in range(1, 201)] == [b[s] for s in range(1, 201)]  # bitwise


@pytest.mark.slow
def test_sigint_to_one_process_stops_every_process_at_the_same_step(tfds_dir, tmp_path):
    workdir = tmp_path / "w"
    procs = _run_processes(workdir, tfds_dir, *SYNTHETIC, *LONG)
    _wait_for_step(workdir, 3, procs)
    procs[1].send_signal(signal.SIGINT)  # Ctrl-C on one host only
    outs = [p.communicate(timeout=300) for p in procs]
    steps = []
    for p, (_, err) in zip(procs, outs):
        assert p.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), err[-3000:]
        steps.append(_stopped_step(err, "SIG(INT|TERM)"))
    assert procs[1].returncode == 128 + signal.SIGINT
    assert steps[0] == steps[1] < 200
    assert os.listdir(workdir / "checkpoints") == [str(steps[0])]
    # The saved state is whole: one process with 4 devices resumes it to the end.
    _run(workdir, tfds_dir, *SYNTHETIC, *LONG)
    assert sorted(logged_losses(workdir)) == list(range(1, 201))


@pytest.mark.slow
def test_every_process_of_a_job_stops_on_a_busy_workdir(tfds_dir, tmp_path):
    from mim_jax.workdir_lock import WorkdirLock
    workdir = tmp_path / "w"
    workdir.mkdir()
    with WorkdirLock(str(workdir)):  # a live run (this test) holds the workdir
        procs = _run_processes(workdir, tfds_dir, *SYNTHETIC)
        outs = [p.communicate(timeout=300) for p in procs]
    last = [err.strip().splitlines()[-1] for _, err in outs]
    assert [p.returncode for p in procs] == [2, 2], [err[-2000:] for _, err in outs]
    assert last[0].startswith(f"mim_jax: error: --workdir {workdir} is in use by another run "
                              f"(process {os.getpid()} on host "), last[0]
    assert last[1] == (f"mim_jax: error: --workdir {workdir} is in use by another run; the log "
                       "of process 0 of this job names it."), last[1]
    assert not any("Traceback" in err for _, err in outs)
    assert sorted(os.listdir(workdir)) == []  # nothing written: not even a config record
