"""Fault injection: damaged checkpoints, non-finite updates, a full disk, kill -9 during an
asynchronous save, bad configs. Each must cost no work beyond the damaged checkpoint and end
in one clear line."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import logged_losses, tiny_train_config
from mim_jax import checkpointing, train
from mim_jax.errors import CheckpointError, ConfigError

_ABSL = re.compile(r"^[IWEF]\d{4} ")  # an absl log record
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/mae.py:quickstart shrunk like conftest.tiny_train_config, on the command line.
TINY_ARGS = ["--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
             "--config.model.mlp_dim=64", "--config.objective.decoder_width=16",
             "--config.objective.decoder_heads=2", "--config.objective.decoder_depth=1",
             "--config.evaluators.reconstruction.num_images=2",
             "--config.evaluators.reconstruction.error_images=8",
             "--config.evaluators.reconstruction.every_steps=100",
             "--config.evaluators.knn.every_steps=1000",
             "--config.evaluators.linear_probe.every_steps=1000",
             "--config.batch_size=16", "--config.data.shuffle_buffer=256",
             "--config.log_every_steps=1", "--config.warmup_steps=2"]


@pytest.fixture(scope="module")
def finished_run(tfds_dir, tmp_path_factory):
    """8 steps, checkpoints at 4 and 8: the run every damage is applied to (a copy of)."""
    cfg = tiny_train_config(tfds_dir)
    workdir = str(tmp_path_factory.mktemp("faults") / "base")
    train.train_and_evaluate(cfg, workdir)
    return cfg, workdir


def _largest_file(directory):
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def _flip_one_bit(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0x10
        f.seek(0)
        f.write(data)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


def _write(path, content):
    with open(path, "wb") as f:
        f.write(content)


# What is done to checkpoints/8 of a finished run.
DAMAGES = {
    "truncated array file": lambda d: _truncate(_largest_file(os.path.join(d, "default"))),
    "deleted array file": lambda d: os.remove(_largest_file(os.path.join(d, "default"))),
    "one flipped bit": lambda d: _flip_one_bit(_largest_file(os.path.join(d, "default"))),
    "empty step dir": _empty,
    "garbage step metadata": lambda d: _write(os.path.join(d, "_CHECKPOINT_METADATA"),
                                              b"\x00garbage{"),
    "zero-byte step metadata": lambda d: _write(os.path.join(d, "_CHECKPOINT_METADATA"), b""),
    "garbage array metadata": lambda d: _write(os.path.join(d, "default", "_METADATA"),
                                               b"not json"),
    "missing manifest": lambda d: os.remove(os.path.join(d, "default", "manifest.ocdbt")),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latest_checkpoint_falls_back_to_previous(finished_run, tmp_path, damage):
    cfg, base = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    os.remove(os.path.join(workdir, "metrics.jsonl"))  # only what the rerun logs
    DAMAGES[damage](os.path.join(workdir, "checkpoints", "8"))

    train.train_and_evaluate(cfg, workdir)

    # Steps 5-8 were retrained from step 4, bit for bit as the first time.
    again, first = logged_losses(workdir), logged_losses(base)
    assert sorted(again) == [5, 6, 7, 8]
    assert [again[s] for s in again] == [first[s] for s in again]
    # The damaged step was moved aside (not deleted) and replaced by a good one.
    assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["8"]
    state, step = checkpointing.Checkpointer(workdir).restore(None)
    assert step == 8


def test_no_good_checkpoint_stops_and_never_starts_over(finished_run, tmp_path):
    cfg, base = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    for step in ("4", "8"):
        _flip_one_bit(_largest_file(os.path.join(workdir, "checkpoints", step, "default")))
    # The flipped byte lands in raw array bytes (a fingerprint mismatch, or a non-finite
    # value where it hits an exponent), in a compressed chunk (unreadable) or in the metadata,
    # depending on how orbax laid the files out and on the trained values; each must stop the
    # run with its reason.
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored \(step 8: "
                                              r"(integrity fingerprint mismatch|it cannot be "
                                              r"read|its (array )?metadata cannot be read|"
                                              r"non-finite values)"):
        train.train_and_evaluate(cfg, workdir)
    assert checkpointing.Checkpointer(workdir).all_steps() == []  # nothing new was trained
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints_damaged"))) == ["4", "8"]


def test_fingerprint_detects_every_single_bit_flip():
    state = {"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8),
             "n": np.arange(5, dtype=np.int32), "h": np.ones(4, jax.numpy.bfloat16)}
    reference = checkpointing.fingerprint(state)
    for name in state:
        flat = state[name].view(np.uint8).reshape(-1)
        for byte in range(0, flat.size, 3):
            for bit in range(8):
                damaged = dict(state)
                bits = flat.copy()
                bits[byte] ^= 1 << bit
                damaged[name] = bits.view(state[name].dtype).reshape(state[name].shape)
                if not np.all(np.isfinite(np.asarray(damaged[name], np.float32))):
                    continue  # a flip into NaN/inf is caught by the finiteness check instead
                assert checkpointing.fingerprint(damaged)[name] != reference[name], (name, byte)


@pytest.mark.parametrize("lr", [1e36, 1e30])
def test_exploding_update_stops_the_run_and_is_never_checkpointed(tfds_dir, tmp_path, lr):
    cfg = tiny_train_config(tfds_dir, log_every_steps=100)  # only the save checks the count
    cfg.optimizer.base_lr = lr
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="before step 4; the run stopped before saving"):
        train.train_and_evaluate(cfg, workdir)
    assert checkpointing.Checkpointer(workdir).all_steps() == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1e-3])
def test_non_finite_or_non_positive_lr_is_rejected(tfds_dir, tmp_path, value):
    cfg = tiny_train_config(tfds_dir)
    cfg.optimizer.base_lr = value
    with pytest.raises(ConfigError, match=r"optimizer.base_lr=.* must be a finite number > 0"):
        train.train_and_evaluate(cfg, str(tmp_path / "run"))


def test_state_with_non_finite_values_is_never_saved(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), asynchronous=False)
    with pytest.raises(CheckpointError, match="non-finite values"):
        ckpt.maybe_save(1, {"w": np.array([1.0, np.nan], np.float32)}, force=True)
    ckpt.close()
    assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == []


# ---- workdir identity -------------------------------------------------------------------

def test_changed_config_is_refused_with_every_changed_field(finished_run, tmp_path):
    cfg, base = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = f.read()
    changed = cfg.copy_and_resolve_references()
    changed.batch_size = 32
    changed.seed = 7
    changed.objective.mask_ratio = 0.6
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(changed, workdir)
    for text in ("batch_size: 16 -> 32", "seed: 0 -> 7", "objective.mask_ratio: 0.75 -> 0.6",
                 "--allow_config_change"):
        assert text in str(err.value)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == recorded  # never overwritten


def test_allowed_config_change_keeps_both_configs(finished_run, tmp_path):
    cfg, base = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    longer = cfg.copy_and_resolve_references()
    longer.total_steps = 12
    train.train_and_evaluate(longer, workdir, allow_config_change=True)
    assert checkpointing.Checkpointer(workdir).latest_step() == 12
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["total_steps"] == 8
    with open(os.path.join(workdir, "config.step8.json")) as f:
        assert json.load(f)["total_steps"] == 12
    # The accepted change is now the record: the same config resumes without the flag.
    train.train_and_evaluate(longer, workdir)


def test_rerunning_a_finished_run_changes_nothing(finished_run, tmp_path):
    cfg, base = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    before = {name: os.path.getmtime(os.path.join(workdir, name))
              for name in ("final_metrics.json", "config.json", "metrics.jsonl")}
    final = train.train_and_evaluate(cfg, workdir)
    assert "loss" in final
    after = {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}
    assert after == before
    assert checkpointing.Checkpointer(workdir).all_steps() == [4, 8]


# ---- whole runs through the command line ------------------------------------------------

def _main_cmd(workdir, tfds_dir, *overrides):
    return [sys.executable, "-m", "mim_jax.main", "--config", "configs/mae.py:quickstart",
            "--workdir", str(workdir), f"--config.data.data_dir={tfds_dir}", *TINY_ARGS,
            *overrides]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def _errors(stderr):
    """Lines that are not absl log records: what a user reads as the outcome."""
    return [line for line in stderr.splitlines() if line.strip() and not _ABSL.match(line)]


def _can_mount_tmpfs(path):
    os.makedirs(path, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
    return True


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tfds_dir, tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    if not _can_mount_tmpfs(ckpt_dir):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN) to fill a disk")
    # Size the disk from a real checkpoint: room for step 4 and not for step 8.
    probe = tmp_path / "probe"
    run = subprocess.run(_main_cmd(probe, tfds_dir, "--config.total_steps=4",
                                   "--config.checkpoint.every_steps=4"),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    size = sum(os.path.getsize(os.path.join(d, f))
               for d, _, names in os.walk(probe / "checkpoints" / "4") for f in names)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) + 8192}", "tmpfs",
                    str(ckpt_dir)], check=True, timeout=30)
    try:
        cmd = _main_cmd(tmp_path / "run", tfds_dir, "--config.total_steps=12",
                        "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=3")
        run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 1, run.stderr[-3000:]
        errors = _errors(run.stderr)
        assert len(errors) == 1, "\n".join(errors[:20])
        assert errors[0].startswith("mim_jax: error: saving the checkpoint of step 8 to "
                                    f"{ckpt_dir} failed:"), errors[0]
        assert "space" in errors[0] and "step 4 is intact" in errors[0]
        assert "Traceback" not in run.stderr
        # The run stopped at once: no step after the failed save's next one was trained.
        assert max(logged_losses(tmp_path / "run")) <= 9
        assert checkpointing.Checkpointer(str(tmp_path / "run")).all_steps() == [4]
        state, step = checkpointing.Checkpointer(str(tmp_path / "run")).restore(None)
        assert step == 4
    finally:
        subprocess.run(["umount", "-l", str(ckpt_dir)], capture_output=True, timeout=30)
    # With space again the same command resumes from step 4 and finishes.
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert checkpointing.Checkpointer(str(tmp_path / "run")).latest_step() == 12


@pytest.mark.slow
def test_kill_9_during_async_save_resumes_exactly(tfds_dir, tmp_path):
    overrides = ["--config.total_steps=12", "--config.checkpoint.every_steps=4",
                 "--config.checkpoint.asynchronous=true"]
    straight = subprocess.run(_main_cmd(tmp_path / "straight", tfds_dir, *overrides), cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_main_cmd(workdir, tfds_dir, *overrides), cwd=ROOT, env=_env(),
                            stderr=subprocess.PIPE, text=True)
    killed_at = None
    for line in proc.stderr:  # the save of step 8 starts right after its step
        if "step 8/12" in line:
            proc.send_signal(signal.SIGKILL)
            killed_at = time.time()
            break
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(_main_cmd(workdir, tfds_dir, *overrides), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = logged_losses(tmp_path / "straight"), logged_losses(workdir)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise, whichever checkpoint survived


# ---- bad configs: one line, exit status 2, before any data or compute --------------------

BAD_CONFIGS = [
    # (what, command-line arguments, text the one line must contain)
    ("unknown optimizer", ["--config.optimizer.name=sgd"], "optimizer.name='sgd'"),
    ("lr nan", ["--config.optimizer.base_lr=nan"], "optimizer.base_lr=nan"),
    ("lr inf", ["--config.optimizer.base_lr=inf"], "optimizer.base_lr=inf"),
    ("negative weight decay", ["--config.optimizer.weight_decay=-1"],
     "optimizer.weight_decay=-1"),
    ("b2 above 1", ["--config.optimizer.b2=1.5"], "optimizer.b2=1.5"),
    ("warmup longer than run", ["--config.warmup_steps=50", "--config.total_steps=10"],
     "warmup_steps=50"),
    ("checkpoint every 0", ["--config.checkpoint.every_steps=0"], "checkpoint.every_steps=0"),
    ("keep 0", ["--config.checkpoint.keep=0"], "checkpoint.keep=0"),
    ("no reconstruction images", ["--config.evaluators.reconstruction.num_images=0"],
     "reconstruction.num_images=0"),
    ("bad config argument", None, "epochs='abc'"),
    ("unknown field", ["--config.batch_sise=32"], "batch_sise"),
    ("mistyped value", ["--config.batch_size=abc"], "config.batch_size=abc"),
    ("zero batch", ["--config.batch_size=0"], "batch_size=0"),
    ("unknown objective", ["--config.objective.name=nope"], "objective.name='nope'"),
    ("unknown dataset", ["--config.data.name=no_such_dataset"], "data.name='no_such_dataset'"),
    ("missing split", ["--config.data.split=nope"], "data.split='nope'"),
    ("batch larger than the data", ["--config.batch_size=8192"], "batch_size=8192"),
    ("evaluator split missing", ["--config.evaluators.knn.eval_split=nope"],
     "evaluators.knn.eval_split: 'nope' is not a split of 'mnist5k' (splits: ['test', "
     "'train'])."),
    ("data_dir is a file", ["--config.data.data_dir=" + os.path.abspath(__file__)],
     "data.data_dir="),
]


@pytest.mark.parametrize("what,args,expect", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2(tfds_dir, tmp_path, what, args, expect):
    config = "configs/mae.py:quickstart" if args is not None else "configs/mae.py:epochs=abc"
    cmd = [sys.executable, "-m", "mim_jax.main", "--config", config, "--workdir",
           str(tmp_path / "run"), f"--config.data.data_dir={tfds_dir}", *(args or [])]
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    errors = _errors(run.stderr)
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("mim_jax: error: "), errors[:20]
    assert expect in errors[0], errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    print(f"{what}: {seconds:.1f}s: {errors[0]}")


@pytest.mark.slow
def test_read_only_checkpoint_dir_stops_with_one_line(tfds_dir, tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    if not _can_mount_tmpfs(ckpt_dir):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN) to make it read-only")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ckpt_dir)],
                   check=True, timeout=30)
    try:
        first = subprocess.run(
            _main_cmd(tmp_path / "run", tfds_dir, "--config.total_steps=4",
                      "--config.checkpoint.every_steps=4"),
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stderr[-2000:]
        subprocess.run(["mount", "-o", "remount,ro", str(ckpt_dir)], check=True, timeout=30)
        run = subprocess.run(
            _main_cmd(tmp_path / "run", tfds_dir, "--config.total_steps=12",
                      "--config.checkpoint.every_steps=4", "--allow_config_change"),
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        errors = _errors(run.stderr)
        assert run.returncode == 1 and len(errors) == 1, errors[:20]
        assert "Read-only file system" in errors[0] and "step 4 is intact" in errors[0]
        state, step = checkpointing.Checkpointer(str(tmp_path / "run")).restore(None)
        assert step == 4
    finally:
        subprocess.run(["umount", "-l", str(ckpt_dir)], capture_output=True, timeout=30)


@pytest.mark.parametrize("content", ["pickled module", "truncated"])
def test_unusable_pretrained_file_fails_before_the_data_with_one_line(tfds_dir, tmp_path,
                                                                       content):
    """finetune.pretrained pointing at a file mim_jax will not or cannot read: one line naming
    the field and the reason, exit 2, before the dataset is prepared or anything trains."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "weights.pth"
    if content == "pickled module":
        torch.save(torch.nn.Linear(2, 2), path)
        expect = "torch.nn.modules.linear.Linear"
    else:
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
        expect = "not a readable PyTorch checkpoint"
    empty_data = tmp_path / "no_data"  # nothing prepared here: a run reaching the data fails
    empty_data.mkdir()
    cmd = [sys.executable, "-m", "mim_jax.main", "--config",
           f"configs/finetune.py:quickstart,pretrained={path}", "--workdir",
           str(tmp_path / "ft"), f"--config.data.data_dir={empty_data}"]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    errors = _errors(run.stderr)
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("mim_jax: error: finetune.pretrained="), \
        errors[:20]
    assert expect in errors[0], errors[0]
    assert not any(empty_data.iterdir())  # the dataset was never prepared
    assert not list((tmp_path / "ft").glob("checkpoints/[0-9]*"))  # nothing trained or saved


# ---- one run per workdir --------------------------------------------------------------------

class _Process:
    """A background `python -m mim_jax.main` whose stderr is drained (so it never blocks on a
    full pipe) and can be waited on for a line."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.PIPE,
                                     text=True)
        self.lines = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not seen in {timeout} s")

    def stop(self, signum, timeout=300):
        self.proc.send_signal(signum)
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return self.proc.returncode, "".join(self.lines)


@pytest.mark.slow
def test_one_run_per_workdir_and_every_ending_releases_it(tfds_dir, tmp_path):
    workdir = tmp_path / "run"
    lock = workdir / "run.lock"
    cmd = _main_cmd(workdir, tfds_dir, "--config.total_steps=100000",
                    "--config.checkpoint.every_steps=1000")
    first = _Process(cmd)
    first.wait_for(r"step 3/")
    # The same command again while the first runs: refused at once, naming the holder.
    second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    errors = _errors(second.stderr)
    assert second.returncode == 2, second.stderr[-3000:]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"mim_jax: error: --workdir {workdir} is in use by another run "
                                f"(process {first.proc.pid} on host "), errors[0]
    assert "step 1/" not in second.stderr and "Taking over" not in second.stderr
    assert first.proc.poll() is None  # the first run goes on, untouched
    # SIGTERM and SIGINT stop a run with a checkpoint and release the workdir.
    for signum in (signal.SIGTERM, signal.SIGINT):
        code, err = first.stop(signum)
        assert code == 128 + signum, err[-3000:]
        assert not lock.exists()
        first = _Process(cmd)  # resumes; the lock is its own
        first.wait_for(r"Resuming from the checkpoint")
        first.wait_for(r"step \d+/100000")
    # kill -9 leaves the lock behind; the next run takes it over with one warning.
    code, _ = first.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL and lock.exists()
    successor = _Process(cmd)
    successor.wait_for(rf"Taking over {lock}: its holder \(process {first.proc.pid} on host "
                       r".*\) is gone: its process no longer exists")
    successor.wait_for(r"Resuming from the checkpoint")
    code, err = successor.stop(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and not lock.exists(), err[-3000:]


def test_a_run_that_ends_or_fails_releases_the_workdir(finished_run, tmp_path):
    cfg, base = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    train.train_and_evaluate(cfg, workdir)  # finished already: returns at once
    assert not os.path.exists(os.path.join(workdir, "run.lock"))
    changed = cfg.copy_and_resolve_references()
    changed.optimizer.base_lr *= 2
    with pytest.raises(ConfigError):
        train.train_and_evaluate(changed, workdir)
    assert not os.path.exists(os.path.join(workdir, "run.lock"))


# ---- data that cannot serve the run: one line before compute ---------------------------------

def _image_folder(path, good, bad=0, classes=None):
    """`good` decodable 28x28 gray PNGs (in class subfolders when `classes`) and `bad` files
    that only look like images."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(good):
        folder = path / classes[i % len(classes)] if classes else path
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    path.mkdir(parents=True, exist_ok=True)
    for i in range(bad):
        (path / f"broken{i:03d}.png").write_bytes(b"\x89PNG not really" + bytes([i]))
    return path


FOLDER_ARGS = ["--config.data.name=folder", "--config.total_steps=4",
               "--config.checkpoint.every_steps=4"]


def test_unlabelled_folder_with_label_evaluators_is_one_line_before_compute(tfds_dir, tmp_path):
    folder = _image_folder(tmp_path / "images", good=40)
    run = subprocess.run(_main_cmd(tmp_path / "run", tfds_dir, *FOLDER_ARGS,
                                   f"--config.data.folder={folder}"),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    errors = _errors(run.stderr)
    assert run.returncode == 2, run.stderr[-3000:]
    assert errors == [f"mim_jax: error: evaluators.knn (knn) needs labels, but "
                      f"data.folder='{folder}' has no class subfolders (labels come from "
                      "FOLDER/CLASS_NAME/IMAGE). Turn it off with "
                      "--config.evaluators.knn.every_steps=0."], errors
    assert not (tmp_path / "run").exists()  # refused before the workdir was even made


@pytest.mark.slow
def test_unlabelled_folder_pretrains_with_label_evaluators_off(tfds_dir, tmp_path):
    folder = _image_folder(tmp_path / "images", good=40)
    run = subprocess.run(_main_cmd(tmp_path / "run", tfds_dir, *FOLDER_ARGS,
                                   f"--config.data.folder={folder}",
                                   "--config.evaluators.knn.every_steps=0",
                                   "--config.evaluators.linear_probe.every_steps=0"),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(logged_losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert os.listdir(tmp_path / "run" / "reconstructions") == ["step_0000004.png"]


@pytest.mark.parametrize("good,bad", [(0, 28), (10, 18)], ids=["none decodable", "too few"])
def test_folder_that_cannot_fill_a_batch_is_one_line_before_the_step_compiles(
        tfds_dir, tmp_path, good, bad):
    folder = _image_folder(tmp_path / "images", good=good, bad=bad)
    run = subprocess.run(_main_cmd(tmp_path / "run", tfds_dir, *FOLDER_ARGS,
                                   f"--config.data.folder={folder}",
                                   "--config.evaluators.knn.every_steps=0",
                                   "--config.evaluators.linear_probe.every_steps=0"),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    errors = _errors(run.stderr)
    assert run.returncode == 1, run.stderr[-3000:]
    assert len(errors) == 1, errors
    assert errors[0] == (
        f"mim_jax: error: data.folder='{folder}' cannot fill one batch: epoch 0 of this "
        f"process's 28 images gave {good} decodable and {bad} undecodable (skipped), fewer "
        "than the 16 a batch needs on each of 1 process(es). Replace or remove the "
        "undecodable files, or lower batch_size."), errors[0]
    assert "Traceback" not in run.stderr
    # Nothing was built or compiled: the train state's sizes are written after the first batch.
    assert not (tmp_path / "run" / "parameters.txt").exists()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_pixel_evaluator_on_a_token_objective_is_refused(tfds_dir):
    from mim_jax import evaluators
    cfg = tiny_train_config(tfds_dir)
    objective = train.validate_config(cfg)
    evaluators.check_needs(cfg, objective)  # MAE predicts pixels: fine
    token_objective = dataclasses.replace(objective, name="beit", predicts_pixels=False)
    with pytest.raises(ConfigError, match=r"^evaluators.reconstruction \(reconstruction\) needs "
                                          r"pixels, but objective 'beit' does not predict "
                                          r"pixels. Turn it off with --config.evaluators."
                                          r"reconstruction.every_steps=0.$"):
        evaluators.check_needs(cfg, token_objective)


def test_split_and_label_checks_read_the_prepared_dataset(tfds_dir):
    from mim_jax import data
    from mim_jax.data import sources
    cfg = tiny_train_config(tfds_dir).data
    data.prepare(cfg)  # before that the splits are unknown, and nothing is refused
    assert sources.missing_split(cfg, "test") is None
    assert sources.missing_split(cfg, "train[:10%]") is None
    assert sources.missing_split(cfg, "nope") == ("'nope' is not a split of 'mnist5k' "
                                                  "(splits: ['test', 'train'])")
    assert sources.missing_labels(cfg) is None
    with cfg.unlocked():
        cfg.label_key = "digit"
    assert sources.missing_labels(cfg).startswith("data.label_key='digit' is not a feature of "
                                                  "TFDS dataset 'mnist5k'")


def test_filesystem_error_is_one_line(tfds_dir, tmp_path):
    """A workdir that cannot be created (here: below a regular file) ends as one line naming
    the path, exit 1, no traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = subprocess.run(_main_cmd(blocker / "run", tfds_dir), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    errors = _errors(run.stderr)
    assert run.returncode == 1, run.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("mim_jax: error: [Errno 20] Not a "
                                                     "directory"), errors
    assert str(blocker) in errors[0] and "Traceback" not in run.stderr
