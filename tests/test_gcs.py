"""A gs:// workdir end to end: training, resume, a damaged checkpoint, SIGTERM, the workdir lock,
metrics, evaluation and fine-tuning from a bucket. The bucket is the local stand-in of
tests/gcs_fake.py (its docstring says what that covers and what only real GCS can show)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from etils import epath

import gcs_fake
from conftest import logged_losses, tiny_train_config, wait_until
from mim_jax import checkpointing, paths, pretrained, reporting, train
from mim_jax.workdir_lock import WorkdirBusy, WorkdirLock
from test_faults import ROOT, TINY_ARGS, _env, _errors, _flip_one_bit, _largest_file, _Process

BUCKET = "gs://mim-jax-test"


def _local(root, url):
    """Where the fake keeps the object or folder `url`."""
    return root / url[len("gs://"):]


@pytest.fixture(scope="module")
def bucket_root(tmp_path_factory):
    return tmp_path_factory.mktemp("gcs")


@pytest.fixture
def gcs(bucket_root):
    with gcs_fake.install(bucket_root):
        yield bucket_root


@pytest.fixture(scope="module")
def gs_run(tfds_dir, bucket_root):
    """8 steps in gs://.../run, checkpoints at 4 and 8."""
    cfg, url = tiny_train_config(tfds_dir), f"{BUCKET}/run"
    with gcs_fake.install(bucket_root):
        train.train_and_evaluate(cfg, url)
    return cfg, url


def _copy_run(root, url, name):
    shutil.copytree(_local(root, url), _local(root, f"{BUCKET}/{name}"))
    return f"{BUCKET}/{name}"


def test_only_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("runs/a") == epath.Path(tmp_path / "runs" / "a")
    assert str(paths.resolve("gs://b/runs/a")) == "gs://b/runs/a"
    assert paths.is_local("runs/a") and not paths.is_local("gs://b/runs/a")


@pytest.mark.slow
def test_a_run_writes_its_workdir_into_the_bucket(gs_run, gcs):
    cfg, url = gs_run
    run = _local(gcs, url)
    for name in ("config.json", "metrics.jsonl", "parameters.txt", "final_metrics.json",
                 "reconstructions/step_0000008.png"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))  # TensorBoard, through TensorFlow
    # Orbax's GCS path: a step is committed by a marker file, never renamed into place.
    assert sorted(os.listdir(run / "checkpoints")) == ["4", "8"]
    assert all((run / "checkpoints" / s / "commit_success.txt").is_file() for s in ("4", "8"))
    assert not (run / "run.lock").exists()  # released
    assert sorted(logged_losses(run)) == list(range(1, 9))
    assert not os.path.exists("gs:")  # nothing went to a local ./gs:/... folder
    state, step = checkpointing.Checkpointer(url).restore(None)
    assert step == 8
    # Rerunning the finished run reads it back from the bucket and changes nothing.
    assert train.train_and_evaluate(cfg, url)["loss"] == json.loads(
        (run / "final_metrics.json").read_text())["loss"]


@pytest.mark.slow
def test_resume_from_the_bucket_keeps_the_metrics_so_far(gs_run, gcs):
    cfg, url = gs_run
    resumed = _copy_run(gcs, url, "resumed")
    shutil.rmtree(_local(gcs, resumed) / "checkpoints" / "8")  # the run "stopped" after step 4
    train.train_and_evaluate(cfg, resumed)
    assert checkpointing.Checkpointer(resumed).all_steps() == [4, 8]
    # metrics.jsonl was rewritten whole (the fake refuses appends): the first run's rows are
    # still there, and steps 5-8 again, bit for bit as the first time.
    rows = [json.loads(line) for line in open(_local(gcs, resumed) / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9)) + [5, 6, 7, 8]
    assert logged_losses(_local(gcs, resumed)) == logged_losses(_local(gcs, url))


@pytest.mark.slow
def test_a_damaged_checkpoint_in_the_bucket_is_moved_aside(gs_run, gcs):
    cfg, url = gs_run
    damaged = _copy_run(gcs, url, "damaged")
    run = _local(gcs, damaged)
    os.remove(run / "metrics.jsonl")  # only what the rerun logs
    _flip_one_bit(_largest_file(run / "checkpoints" / "8" / "default"))
    train.train_and_evaluate(cfg, damaged)
    again, first = logged_losses(run), logged_losses(_local(gcs, url))
    assert sorted(again) == [5, 6, 7, 8]
    assert [again[s] for s in again] == [first[s] for s in again]
    assert os.listdir(run / "checkpoints_damaged") == ["8"]
    assert checkpointing.Checkpointer(damaged).all_steps() == [4, 8]


def test_metrics_in_a_bucket_are_rewritten_whole(gcs):
    url = f"{BUCKET}/metrics/metrics.jsonl"
    _local(gcs, url).parent.mkdir(parents=True)
    _local(gcs, url).write_text('{"step": 1, "loss": 1.0}\n')
    writer = reporting.jsonl_writer(url)
    assert isinstance(writer, reporting.RewritingJsonlWriter)
    writer.write_scalars(2, {"loss": 0.5})
    assert _local(gcs, url).read_text() == '{"step": 1, "loss": 1.0}\n'  # not yet due
    writer.close()
    assert [json.loads(line) for line in open(_local(gcs, url))] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    assert isinstance(reporting.jsonl_writer(str(gcs / "m.jsonl")), reporting.JsonlWriter)


# ---- the workdir lock on an object store -----------------------------------------------------

def test_a_bucket_lock_refuses_a_second_run_and_is_released(gcs):
    url = f"{BUCKET}/locked"
    lock_file = _local(gcs, url) / "run.lock"
    with WorkdirLock(url, settle_seconds=0.1) as lock:
        assert json.loads(lock_file.read_text())["token"] == lock.token
        with pytest.raises(WorkdirBusy, match=rf"--workdir {url} is in use by another run "
                                              rf"\(process {os.getpid()} on host"):
            WorkdirLock(url, settle_seconds=0.1).acquire()
        assert json.loads(lock_file.read_text())["token"] == lock.token
    assert not lock_file.exists()


def test_of_two_runs_claiming_a_bucket_lock_at_once_the_last_writer_wins(gcs):
    url = f"{BUCKET}/raced"
    locks = [WorkdirLock(url, settle_seconds=0.5) for _ in range(2)]
    start, outcome = threading.Barrier(2), {}

    def contend(lock):
        start.wait()
        try:
            lock.acquire()
            outcome[lock.token] = "held"
        except WorkdirBusy:
            outcome[lock.token] = "busy"
    threads = [threading.Thread(target=contend, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcome.values()) == ["busy", "held"]
    holder = json.loads((_local(gcs, url) / "run.lock").read_text())
    assert outcome[holder["token"]] == "held"
    for lock in locks:
        lock.release()  # only the holder's removes the file
    assert not (_local(gcs, url) / "run.lock").exists()


def test_a_stale_bucket_lock_is_taken_over_and_a_takeover_is_noticed(gcs, caplog):
    url = f"{BUCKET}/stale"
    lock_file = _local(gcs, url) / "run.lock"
    lock_file.parent.mkdir(parents=True)
    old = time.time() - 3600
    record = {"host": "other-host", "pid": 1, "started": old, "refreshed": old, "token": "x"}
    lock_file.write_text(json.dumps(record))
    lock = WorkdirLock(url, settle_seconds=0.1, refresh_seconds=0.05)
    lock.acquire()
    try:
        assert "not refreshed for" in caplog.text
        assert json.loads(lock_file.read_text())["token"] == lock.token
        lock_file.write_text(json.dumps(dict(record, refreshed=time.time(), token="successor")))
        wait_until(lambda: lock.lost is not None)
        with pytest.raises(WorkdirBusy, match="another run took over"):
            lock.check()
    finally:
        lock.release()
    assert json.loads(lock_file.read_text())["token"] == "successor"  # not ours to remove


# ---- through the command line ----------------------------------------------------------------

def _fake_cmd(root, module, *args):
    return [sys.executable, os.path.join(ROOT, "tests", "gcs_fake.py"), str(root), module,
            *args]


@pytest.mark.slow
def test_sigterm_saves_into_the_bucket_and_a_second_run_is_refused(tfds_dir, bucket_root):
    url = f"{BUCKET}/signalled"
    cmd = _fake_cmd(bucket_root, "mim_jax.main", "--config", "configs/mae.py:quickstart",
                    "--workdir", url, f"--config.data.data_dir={tfds_dir}", *TINY_ARGS,
                    "--config.total_steps=100000", "--config.checkpoint.every_steps=1000")
    first = _Process(cmd)
    first.wait_for(r"step 3/")
    second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    # (The fake's import of TensorFlow, before absl's logging starts, adds its own warnings.)
    errors = [line for line in _errors(second.stderr) if line.startswith("mim_jax:")]
    assert second.returncode == 2, second.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"mim_jax: error: --workdir {url} is in use by another run "
                                f"(process {first.proc.pid} on host "), errors
    code, err = first.stop(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    stopped = [line for line in _errors(err) if line.startswith("mim_jax: stopped by SIGTERM")]
    assert stopped and f"its checkpoint is in {url}/checkpoints." in stopped[0], stopped
    run = _local(bucket_root, url)
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert os.listdir(run / "checkpoints") == [str(step)]
    assert (run / "checkpoints" / str(step) / "commit_success.txt").is_file()
    assert max(logged_losses(run)) == step  # the metrics were written out before the exit
    assert not (run / "run.lock").exists()


@pytest.mark.slow
def test_evaluate_writes_its_tables_into_the_bucket(gs_run, bucket_root, tfds_dir):
    _, url = gs_run
    run = subprocess.run(
        _fake_cmd(bucket_root, "mim_jax.evaluate", "--config", "configs/mae.py:quickstart",
                  "--workdir", url, f"--config.data.data_dir={tfds_dir}", *TINY_ARGS,
                  "--skip_finetune", "--random_seeds=1"),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((_local(bucket_root, url) / "evaluation.json").read_text())
    assert result["workdir"] == url
    assert 0.0 <= result["frozen"]["pretrained"]["knn"] <= 1.0
    assert "| pretrained encoder, mean of patches |" in (
        _local(bucket_root, url) / "evaluation.md").read_text()


@pytest.mark.slow
def test_finetune_from_a_run_in_the_bucket(gs_run, gcs, tfds_dir):
    from test_finetune import tiny_finetune_config
    _, url = gs_run
    cfg = tiny_finetune_config(tfds_dir, url, total_steps=1, warmup_steps=1,
                               optimizer=dict(base_lr=1e-30))  # effectively no update
    workdir = f"{BUCKET}/finetuned"
    train.train_and_evaluate(cfg, workdir)
    params = checkpointing.restore_raw(f"{workdir}/checkpoints", 1)
    encoder = pretrained.load_encoder(url).params
    np.testing.assert_allclose(params["encoder"]["patch_embed"]["kernel"],
                               encoder["patch_embed"]["kernel"], atol=1e-6)
    best = _local(gcs, workdir)
    assert json.loads((best / "best.json").read_text())["step"] == 1
    assert (best / "best" / "1" / "commit_success.txt").is_file()


def test_weights_file_and_image_folder_in_the_bucket(gcs, tmp_path):
    from mim_jax.data import sources
    from test_faults import _image_folder
    images = _image_folder(_local(gcs, f"{BUCKET}/images"), good=6, classes=["a", "b"])
    files, labels, classes = sources.list_image_files(f"{BUCKET}/images")
    assert files == [f"{BUCKET}/images/{c}/img{i:03d}.png"
                     for c, i in (("a", 0), ("a", 2), ("a", 4), ("b", 1), ("b", 3), ("b", 5))]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and classes == ["a", "b"]
    torch = pytest.importorskip("torch")
    from mim_jax import convert
    torch.save({"model": {"w": torch.arange(3.0)}}, _local(gcs, f"{BUCKET}/weights.pth"))
    state = convert.load_torch_state_dict(f"{BUCKET}/weights.pth")
    assert state["w"].tolist() == [0.0, 1.0, 2.0]
