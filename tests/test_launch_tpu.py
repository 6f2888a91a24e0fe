"""launch/tpu_pod.sh against a fake `gcloud` (first on PATH): it logs every call and answers
`describe` from a state file the test writes, stepping through a list of states (the last one
repeats), so that the script's reaction to each queued-resource and TPU VM state shows in the
calls it makes. The commands the script sends to the workers are also run here, with a unique
module name in place of mim_jax.main, to check which processes they stop."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")
ENV_OPTIONS = ("NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "SPOT", "QUEUED",
               "REPO_URL", "REPO_REF", "PYTHON_VERSION", "SKIP_INSTALL", "BUCKET_CHECK", "DELETE",
               "STOP", "DRY_RUN", "POLL_INTERVAL", "READY_TIMEOUT", "QUEUE_TIMEOUT", "STOP_TIMEOUT",
               "REMOTE_DIR", "LOG_DIR")

FAKE_GCLOUD = r'''#!PYTHON
import fcntl, json, os, shutil, sys, time

path = os.environ["FAKE_GCLOUD_STATE"]
args = sys.argv[1:]


def update(fn):
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as f:
            st = json.load(f)
        out = fn(st)
        with open(path, "w") as f:
            json.dump(st, f)
    return out


def handle(st):
    st["calls"].append(args)
    if args[:2] == ["storage", "cp"]:
        if st.get("bucket_error"):
            return 1, "", "Copying file://x to " + args[3] + "\n" + st["bucket_error"] + "\n"
        return 0, "", ""
    if args[:2] == ["storage", "rm"]:
        return 0, "", ""
    kind, verb = args[2], args[3]
    key = "qr" if kind == "queued-resources" else "node"
    if verb == "describe":
        seq = st.get(key) or []
        if not seq:
            return 1, "", "ERROR: NOT_FOUND\n"
        state = seq.pop(0) if len(seq) > 1 else seq[0]
        return 0, state + "\n", ""
    if verb == "create":
        if key == "qr":
            st["qr"] = list(st.get("qr_after_create", ["ACCEPTED", "WAITING_FOR_RESOURCES",
                                                       "PROVISIONING", "ACTIVE"]))
            st["node"] = list(st.get("node_after_qr", ["CREATING", "READY"]))
        else:
            st["node"] = list(st.get("node_after_create", ["READY"]))
        return 0, "", ""
    if verb == "delete":
        if key == "qr":
            st["qr"] = []
        st["node"] = []
        return 0, "", ""
    if verb == "scp":
        shutil.copy(args[4], os.path.join(os.path.dirname(path), "copied.tgz"))
        return 0, "", ""
    if verb == "ssh":
        command = args[args.index("--command") + 1]
        if "pkill -TERM" in command and "pkill -KILL" not in command:
            st["released"] = True
            return st.get("stop_rc", 0), "[worker 0] SIGTERM sent to mim_jax\n", ""
        if "nohup" in command:
            return None  # the training session: answered below, outside the lock
        return 0, "", ""
    return 0, "", ""


result = update(handle)
if result is None:  # training: runs until a stop command releases it, or train_seconds pass
    sys.stdout.write("[worker 0] training\n")
    sys.stdout.flush()
    deadline = time.time() + update(lambda st: st.get("train_seconds", 0))
    while time.time() < deadline and not update(lambda st: st.get("released", False)):
        time.sleep(0.05)
    result = (update(lambda st: st.get("train_rc", 0)), "[worker 0] done\n", "")
rc, out, err = result
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(rc)
'''


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Fake:
    def __init__(self, tmp_path, **state):
        self.dir = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir(exist_ok=True)
        gcloud = self.bin / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable, 1))
        gcloud.chmod(0o755)
        curl = self.bin / "curl"  # the metadata server, when worker commands run here
        curl.write_text("#!/bin/sh\necho 7\n")
        curl.chmod(0o755)
        self.state_path = tmp_path / "state.json"
        state.setdefault("calls", [])
        self.state_path.write_text(json.dumps(state))

    @property
    def state(self):
        with open(str(self.state_path) + ".lock", "w") as lock:  # as the fake gcloud writes it
            fcntl.flock(lock, fcntl.LOCK_EX)
            return json.loads(self.state_path.read_text())

    @property
    def calls(self):
        return [" ".join(c) for c in self.state["calls"]]

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if k not in ENV_OPTIONS}
        env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                   FAKE_GCLOUD_STATE=str(self.state_path), POLL_INTERVAL="0.05",
                   TMPDIR=str(self.dir), LOG_DIR=str(self.dir / "logs"))
        env.update(extra)
        return env

    def run(self, *args, **env):
        return subprocess.run([SCRIPT, *args], env=self.env(**env), capture_output=True,
                              text=True, timeout=60)

    def start(self, *args, **env):
        # Ctrl-C as a terminal sends it: a test run started in the background (`cmd &`) has
        # SIGINT ignored, and bash cannot trap a signal that was ignored when it started.
        return subprocess.Popen([SCRIPT, *args], env=self.env(**env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)

    def wait_for(self, predicate, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate(self.calls):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out; calls: {self.calls}")

    def count(self, *words):
        return sum(all(w in c for w in words) for c in self.calls)

    def index(self, *words):
        return next(i for i, c in enumerate(self.calls) if all(w in c for w in words))

    def commands(self):
        """The --command of each ssh call, in order."""
        return [c[c.index("--command") + 1] for c in self.state["calls"] if "ssh" in c]


WORKDIR = "gs://my-bucket/runs/mae"
POD = ["--name", "pod1", "--zone", "us-central2-b"]
LAUNCH = [*POD, "--skip-install", "configs/mae.py:quickstart", WORKDIR, "--config.seed=3"]
V5E = ["--accelerator-type", "v5litepod-16"]
QR_CREATE = ("queued-resources create pod1", "--node-id pod1")
QR_DELETE = ("queued-resources delete pod1", "--force")


def _one_line_error(proc, *words):
    assert proc.returncode == 1, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith(SCRIPT + ": ")]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _trained(fake):
    return fake.count("tpu-vm ssh pod1", "--worker=all", "nohup") == 1


# ------------------------------------------------------------------ queued resources


def test_queued_spot_created_waits_through_the_queue_then_runs(tmp_path):
    fake = Fake(tmp_path)
    proc = fake.run("--queued", "--spot", *V5E, *LAUNCH)
    assert proc.returncode == 0, proc.stderr
    create = [c for c in fake.calls if "queued-resources create" in c]
    assert len(create) == 1
    for part in ("--node-id pod1", "--zone us-central2-b", "--accelerator-type v5litepod-16",
                 "--runtime-version v2-alpha-tpuv5-lite", "--spot"):
        assert part in create[0]
    # It polled through ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING to ACTIVE, then the TPU VM
    # through CREATING to READY, and only then used the slice.
    assert fake.count("queued-resources describe pod1") >= 5
    assert fake.count("tpu-vm describe pod1") >= 2
    for state in ("WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING"):
        assert f"is {state}" in proc.stderr
    first_ssh = fake.index("tpu-vm ssh")
    assert first_ssh > max(i for i, c in enumerate(fake.calls) if "describe" in c)
    assert fake.index("storage cp") < fake.index(*QR_CREATE)
    assert _trained(fake) and not fake.count("delete")


@pytest.mark.parametrize("state", ["SUSPENDED", "FAILED"])
def test_suspended_or_failed_request_is_deleted_and_requested_again(tmp_path, state):
    fake = Fake(tmp_path, qr=[state], node=[])
    proc = fake.run("--queued", "--spot", *V5E, *LAUNCH)
    assert proc.returncode == 0, proc.stderr
    assert fake.count(*QR_DELETE) == 1 and fake.count(*QR_CREATE) == 1
    assert fake.index(*QR_DELETE) < fake.index(*QR_CREATE)
    assert _trained(fake)


def test_active_request_with_a_ready_slice_is_reused(tmp_path):
    fake = Fake(tmp_path, qr=["ACTIVE"], node=["READY"])
    proc = fake.run("--queued", *LAUNCH)  # no --accelerator-type needed to reuse
    assert proc.returncode == 0, proc.stderr
    assert not fake.count("create") and not fake.count("delete")
    assert "Reusing TPU pod1 (READY)" in proc.stderr and _trained(fake)


def test_active_request_with_a_preempted_slice_is_requested_again(tmp_path):
    fake = Fake(tmp_path, qr=["ACTIVE"], node=["PREEMPTED"])
    proc = fake.run("--queued", "--spot", *V5E, *LAUNCH)
    assert proc.returncode == 0, proc.stderr
    assert fake.index(*QR_DELETE) < fake.index(*QR_CREATE) and _trained(fake)


def test_a_request_already_in_the_queue_is_waited_for_not_created(tmp_path):
    fake = Fake(tmp_path, qr=["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING",
                              "ACTIVE"], node=["READY"])
    proc = fake.run("--queued", *V5E, *LAUNCH)
    assert proc.returncode == 0, proc.stderr
    assert not fake.count("create") and not fake.count("delete") and _trained(fake)


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED"])
def test_own_request_that_fails_in_the_queue_is_reported_in_one_line_and_deleted(tmp_path, state):
    fake = Fake(tmp_path, qr_after_create=["ACCEPTED", state])
    proc = fake.run("--queued", *V5E, *LAUNCH)
    _one_line_error(proc, f"became {state}", "run the same command again")
    assert fake.count(*QR_CREATE) == 1  # not requested again in a loop
    assert fake.index(*QR_CREATE) < fake.index(*QR_DELETE)
    assert not fake.count("tpu-vm ssh")


def test_queue_timeout_gives_up_in_one_line_and_deletes_own_request(tmp_path):
    fake = Fake(tmp_path, qr_after_create=["WAITING_FOR_RESOURCES"])
    proc = fake.run("--queued", *V5E, *LAUNCH, QUEUE_TIMEOUT="1")
    _one_line_error(proc, "gave up after 1 s (QUEUE_TIMEOUT)", "WAITING_FOR_RESOURCES")
    assert fake.count(*QR_DELETE) == 1 and not fake.count("tpu-vm ssh")


@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_queued_deletes_the_request_this_run_made(tmp_path, sig, rc):
    fake = Fake(tmp_path, qr_after_create=["ACCEPTED", "WAITING_FOR_RESOURCES"])
    proc = fake.start("--queued", "--spot", *V5E, *LAUNCH, POLL_INTERVAL="0.2")
    fake.wait_for(lambda calls: sum("queued-resources describe" in c for c in calls) >= 4)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == rc, err
    assert fake.count(*QR_DELETE) == 1
    assert fake.index(*QR_CREATE) < fake.index(*QR_DELETE)
    assert not fake.count("tpu-vm ssh")


def test_signal_while_waiting_for_someone_elses_request_keeps_it(tmp_path):
    fake = Fake(tmp_path, qr=["WAITING_FOR_RESOURCES"])
    proc = fake.start("--queued", *V5E, *LAUNCH, POLL_INTERVAL="0.2")
    fake.wait_for(lambda calls: sum("queued-resources describe" in c for c in calls) >= 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert not fake.count("delete") and "stays; delete it with" in err


# ------------------------------------------------------------------ TPU VMs created directly


def test_missing_slice_is_created(tmp_path):
    fake = Fake(tmp_path, node=[])
    proc = fake.run("--accelerator-type", "v4-32", *LAUNCH)
    assert proc.returncode == 0, proc.stderr
    create = [c for c in fake.calls if "tpu-vm create pod1" in c]
    assert len(create) == 1 and "--version tpu-ubuntu2204-base" in create[0]
    assert not fake.count("queued-resources") and _trained(fake)


def test_ready_slice_is_reused(tmp_path):
    fake = Fake(tmp_path, node=["READY"])
    proc = fake.run(*LAUNCH)
    assert proc.returncode == 0, proc.stderr
    assert not fake.count("create") and not fake.count("delete") and _trained(fake)


@pytest.mark.parametrize("state", ["CREATING", "REPAIRING", "STARTING"])
def test_transient_state_is_waited_out_then_reused(tmp_path, state):
    fake = Fake(tmp_path, node=[state, state, "READY"])
    proc = fake.run(*LAUNCH)
    assert proc.returncode == 0, proc.stderr
    assert fake.count("tpu-vm describe") == 3 and f"is {state}" in proc.stderr
    assert not fake.count("create") and not fake.count("delete") and _trained(fake)


def test_transient_state_that_lasts_fails_in_one_line_after_the_timeout(tmp_path):
    fake = Fake(tmp_path, node=["REPAIRING"])
    start = time.time()
    proc = fake.run(*LAUNCH, READY_TIMEOUT="1")
    _one_line_error(proc, "gave up after 1 s (READY_TIMEOUT)", "REPAIRING")
    assert time.time() - start < 15
    assert not fake.count("create") and not fake.count("delete") and not fake.count("ssh")


@pytest.mark.parametrize("state", ["STOPPED", "STOPPING"])
def test_stopped_slice_fails_in_one_line_at_once(tmp_path, state):
    fake = Fake(tmp_path, node=[state])
    proc = fake.run(*LAUNCH)
    _one_line_error(proc, f"TPU pod1 is {state}")
    assert fake.count("tpu-vm describe") == 1  # no waiting
    assert not fake.count("create") and not fake.count("delete") and not fake.count("ssh")


@pytest.mark.parametrize("state", ["PREEMPTED", "TERMINATED"])
def test_preempted_slice_is_deleted_and_created_again(tmp_path, state):
    fake = Fake(tmp_path, node=[state])
    proc = fake.run("--accelerator-type", "v5p-64", "--spot", *LAUNCH)
    assert proc.returncode == 0, proc.stderr
    assert fake.index("tpu-vm delete pod1") < fake.index("tpu-vm create pod1")
    create = fake.calls[fake.index("tpu-vm create pod1")]
    assert "--version v2-alpha-tpuv5" in create and "--spot" in create and _trained(fake)


def test_missing_slice_without_accelerator_type_is_a_usage_error(tmp_path):
    fake = Fake(tmp_path, node=[])
    proc = fake.run(*LAUNCH)
    assert proc.returncode == 2 and "set --accelerator-type" in proc.stderr
    assert not fake.count("create")


# ------------------------------------------------------------------ bucket, types, stop


def test_unwritable_bucket_fails_in_one_line_before_any_tpu_call(tmp_path):
    fake = Fake(tmp_path, node=[],
                bucket_error="ERROR: (gcloud.storage.cp) gs://my-bucket not found: 404.")
    proc = fake.run("--queued", *V5E, *LAUNCH)
    line = _one_line_error(proc, WORKDIR, "404")
    assert "Copying" not in line
    assert fake.calls and all(c.startswith("storage ") for c in fake.calls)


def test_bucket_check_can_be_skipped_and_a_path_workdir_is_not_checked(tmp_path):
    fake = Fake(tmp_path, node=["READY"], bucket_error="ERROR: denied")
    assert fake.run("--no-bucket-check", *LAUNCH).returncode == 0
    args = [a if a != WORKDIR else "/mnt/shared/runs/mae" for a in LAUNCH]
    assert fake.run(*args).returncode == 0
    assert not fake.count("storage")


def test_gs_workdir_is_passed_to_mim_jax_unchanged(tmp_path):
    fake = Fake(tmp_path, node=["READY"])
    assert fake.run(*LAUNCH).returncode == 0
    train = fake.commands()[-1]
    assert (f"/.venv/bin/python -m mim_jax.main --config configs/mae.py:quickstart "
            f"--workdir {WORKDIR} --distributed --config.seed=3") in train


@pytest.mark.parametrize("given, gcloud_name, runtime", [
    ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v5p-64", "v2-alpha-tpuv5"),
    ("v6e-32", "v6e-32", "v2-alpha-tpuv6e"),
])
def test_accelerator_names_and_runtime_versions(tmp_path, given, gcloud_name, runtime):
    fake = Fake(tmp_path, node=[])
    proc = fake.run("--accelerator-type", given, *LAUNCH)
    assert proc.returncode == 0, proc.stderr
    create = fake.calls[fake.index("tpu-vm create pod1")]
    assert f"--accelerator-type {gcloud_name} " in create + " "
    assert f"--version {runtime}" in create
    assert ("v5litepod-16" in proc.stderr) == (given == "v5e-16")  # the translation is said


@pytest.mark.parametrize("given", ["v5e", "v5lite-16", "tpu-v5-lite-podslice", "v6-8"])
def test_unknown_accelerator_type_is_refused_in_one_line(tmp_path, given):
    fake = Fake(tmp_path, node=[])
    proc = fake.run("--accelerator-type", given, *LAUNCH)
    assert proc.returncode == 2 and not fake.calls
    assert proc.stderr.count("\n") == 1 and "v5litepod-N" in proc.stderr


def test_copy_outside_a_git_checkout_fails_before_any_tpu_call(tmp_path):
    fake = Fake(tmp_path, node=[])
    copy = tmp_path / "checkout" / "launch" / "tpu_pod.sh"
    copy.parent.mkdir(parents=True)
    copy.write_text(open(SCRIPT).read())
    copy.chmod(0o755)
    args = [a for a in LAUNCH if a != "--skip-install"]
    proc = subprocess.run([str(copy), "--accelerator-type", "v4-8", *args], env=fake.env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "is not a git checkout" in proc.stderr
    assert not any("compute tpus" in c for c in fake.calls)


def test_stop_sends_sigterm_to_every_worker(tmp_path):
    fake = Fake(tmp_path, node=["READY"])
    proc = fake.run("--stop", *POD)
    assert proc.returncode == 0, proc.stderr
    assert fake.calls == [c for c in fake.calls if "tpu-vm ssh pod1" in c] and len(fake.calls) == 1
    assert "--worker=all" in fake.calls[0]
    command = fake.commands()[0]
    assert "pkill -TERM" in command and "pkill -KILL" not in command


def test_stop_with_delete_deletes_the_queued_resource_after_stopping(tmp_path):
    fake = Fake(tmp_path, qr=["ACTIVE"], node=["READY"])
    proc = fake.run("--stop", "--delete", *POD)
    assert proc.returncode == 0, proc.stderr
    assert fake.index("tpu-vm ssh") < fake.index(*QR_DELETE)


def test_launch_clears_stale_jobs_and_the_lock_before_installing_and_training(tmp_path):
    fake = Fake(tmp_path, node=["READY"])
    assert fake.run(*[a for a in LAUNCH if a != "--skip-install"]).returncode == 0
    commands = fake.commands()
    assert len(commands) == 3
    clear, install, train = commands
    assert "pkill -TERM" in clear and "pkill -KILL" in clear and "/tmp/libtpu_lockfile" in clear
    assert "uv venv" in install and "--python 3.12" in install and "-e '.[tpu]'" in install
    assert "nohup" in train
    # The package holds exactly the files git tracks (that exist in the working tree).
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split("\n")
    tracked = {f for f in tracked if f and os.path.lexists(os.path.join(ROOT, f))}
    with tarfile.open(tmp_path / "copied.tgz") as tar:
        names = {n[2:] if n.startswith("./") else n for n in tar.getnames()}
    assert names == tracked
    assert not list(tmp_path.glob("mim_jax.*.tgz"))  # the local package is removed


def test_interrupt_while_training_stops_the_job_on_every_worker_then_deletes(tmp_path):
    fake = Fake(tmp_path, node=["READY"], train_seconds=30, train_rc=143)
    proc = fake.start("--delete", *LAUNCH)
    fake.wait_for(lambda calls: any("nohup" in c for c in calls))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    stop = [i for i, c in enumerate(fake.commands()) if "pkill -TERM" in c and "pkill -KILL" not in c]
    assert len(stop) == 1
    # The slice is deleted last, after the job has stopped.
    assert "tpu-vm delete pod1" in fake.calls[-1] and fake.count("delete") == 1
    assert "[worker 0] done" in out  # the stream went on until the job had stopped
    logs = list((tmp_path / "logs").glob("pod1-*.log"))  # and is kept here too
    assert len(logs) == 1 and "[worker 0] done" in logs[0].read_text()


# ------------------------------------------------------------------ worker commands, run here


def _worker_commands(tmp_path, module):
    """The stale-job clearing, --stop and training commands, with `module` in place of
    mim_jax.main and a lock file under tmp_path."""
    fake = Fake(tmp_path, node=["READY"])
    assert fake.run(*LAUNCH, STOP_TIMEOUT="1").returncode == 0
    clear, train = fake.commands()
    assert fake.run("--stop", *POD, STOP_TIMEOUT="1").returncode == 0
    stop = fake.commands()[-1]
    lock = tmp_path / "libtpu_lockfile"
    fix = lambda c: c.replace("mim_jax[.]main", module.replace(".", "[.]")).replace(
        "/tmp/libtpu_lockfile", str(lock))
    return fake, fix(clear), fix(stop), train, lock


def _decoy(cmdline, ignore_term=False):
    trap = 'trap "" TERM; ' if ignore_term else ""
    return subprocess.Popen(["bash", "-c", f'{trap}exec -a "{cmdline}" sleep 60'])


def _gone(proc, timeout=10):
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_stop_command_terminates_the_job_and_not_shells_that_name_it(tmp_path):
    module = f"mimjaxtest_{uuid.uuid4().hex[:8]}.main"
    fake, _, stop, _, _ = _worker_commands(tmp_path, module)
    job = _decoy(f"/home/u/mim_jax/.venv/bin/python -m {module} --config c --workdir w")
    shell = _decoy(f"bash -c cd x; nohup python -m {module} --config c")
    try:
        time.sleep(0.2)
        proc = subprocess.run(["bash", "-c", stop], env=fake.env(), capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "[worker 7] SIGTERM sent" in proc.stdout and "[worker 7] mim_jax exited" in proc.stdout
        assert _gone(job) and job.returncode == -signal.SIGTERM
        assert shell.poll() is None
        again = subprocess.run(["bash", "-c", stop], env=fake.env(), capture_output=True,
                               text=True, timeout=30)
        assert again.returncode == 0 and "no mim_jax job running" in again.stdout
    finally:
        for p in (job, shell):
            p.kill()
            p.wait()


def test_clear_command_kills_a_job_that_ignores_sigterm_and_removes_the_lock(tmp_path):
    module = f"mimjaxtest_{uuid.uuid4().hex[:8]}.main"
    fake, clear, stop, _, lock = _worker_commands(tmp_path, module)
    job = _decoy(f"python3 -m {module} --config c", ignore_term=True)
    lock.write_text("")
    try:
        time.sleep(0.2)
        # --stop reports a job that outlives STOP_TIMEOUT and fails, without killing it.
        proc = subprocess.run(["bash", "-c", stop], env=fake.env(), capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 1 and "still running 1 s after SIGTERM" in proc.stdout
        assert job.poll() is None
        proc = subprocess.run(["bash", "-c", clear], env=fake.env(), capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "killed" in proc.stdout
        assert _gone(job) and job.returncode == -signal.SIGKILL
        assert not lock.exists()
    finally:
        job.kill()
        job.wait()


def test_training_command_streams_prefixed_lines_and_returns_the_job_status(tmp_path):
    _, _, _, train, _ = _worker_commands(tmp_path, "unused.main")
    home = tmp_path / "home"
    python = home / "mim_jax" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "args: $*"\necho "to stderr" >&2\nexit 3\n')
    python.chmod(0o755)
    fake = Fake(tmp_path)
    proc = subprocess.run(["bash", "-c", train], env=fake.env(HOME=str(home)),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert (f"[worker 7] args: -m mim_jax.main --config configs/mae.py:quickstart --workdir "
            f"{WORKDIR} --distributed --config.seed=3") in lines
    assert "[worker 7] to stderr" in lines
    logs = list((home / "mim_jax_logs").glob("pod1-*.log"))
    assert len(logs) == 1 and "to stderr" in logs[0].read_text()
