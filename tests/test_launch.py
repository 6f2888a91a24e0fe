"""launch/ scripts: syntax, the gcloud commands tpu_pod.sh would run (--dry-run), and what
slurm_gpu.sbatch hands srun (run with bash, a fake srun and a fake python3 on PATH)."""
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"]


def _fake_bin(tmp_path, name, body):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_executable(script):
    path = os.path.join(LAUNCH, script)
    subprocess.run(["bash", "-n", path], check=True)
    assert os.access(path, os.X_OK)
    assert "set -euo pipefail" in open(path).read()


def _tpu(tmp_path, *args, env=None):
    # A gcloud that must never run: --dry-run only prints.
    marker = tmp_path / "gcloud_ran"
    _fake_bin(tmp_path, "gcloud", f'touch "{marker}"; exit 99\n')
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("NAME", "ZONE", "ACCELERATOR_TYPE", "PROJECT", "SPOT", "QUEUED",
                             "DELETE", "REPO_URL", "SKIP_INSTALL", "RUNTIME_VERSION")}
    full_env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    full_env.update(env or {})
    proc = subprocess.run([os.path.join(LAUNCH, "tpu_pod.sh"), *args], env=full_env,
                          capture_output=True, text=True, timeout=30)
    assert not marker.exists(), "--dry-run ran gcloud"
    return proc


BASE = ["--dry-run", "--name", "pod1", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
        "configs/mae.py:variant=B/16,epochs=800", "/mnt/shared/runs/mae",
        "--config.data.data_dir=/mnt/shared/tfds", "--config.batch_size=1024"]


def _lines(out, *words):
    return [line for line in out.splitlines() if all(w in line for w in words)]


def test_tpu_dry_run_create_copy_and_run(tmp_path):
    proc = _tpu(tmp_path, *BASE)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    create = _lines(out, "gcloud compute tpus tpu-vm create pod1")
    assert len(create) == 1
    assert "--zone us-central2-b" in create[0] and "--accelerator-type v4-32" in create[0]
    assert "--version tpu-ubuntu2204-base" in create[0] and "--spot" not in create[0]
    assert not _lines(out, "queued-resources")
    scp = _lines(out, "gcloud compute tpus tpu-vm scp")
    assert len(scp) == 1 and "--worker=all" in scp[0] and "pod1:" in scp[0]
    ssh = _lines(out, "gcloud compute tpus tpu-vm ssh pod1", "--worker=all")
    assert len(ssh) == 2
    assert 'pip install -q -e ".[tpu]"' in ssh[0]
    train = ssh[1]
    assert ("python3 -m mim_jax.main --config configs/mae.py:variant=B/16,epochs=800 "
            "--workdir /mnt/shared/runs/mae --distributed "
            "--config.data.data_dir=/mnt/shared/tfds --config.batch_size=1024") in train
    assert "[worker" in train
    assert not _lines(out, "delete")


def test_tpu_dry_run_spot_queued_delete(tmp_path):
    proc = _tpu(tmp_path, "--spot", "--queued", "--delete", *BASE)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not _lines(out, "tpu-vm create")
    create = _lines(out, "gcloud compute tpus queued-resources create pod1")
    assert len(create) == 1
    assert "--node-id pod1" in create[0] and "--spot" in create[0]
    assert "--runtime-version tpu-ubuntu2204-base" in create[0]
    assert _lines(out, "gcloud compute tpus queued-resources delete pod1", "--force")
    assert _lines(out, "--worker=all", "--distributed")


def test_tpu_dry_run_env_vars_and_git_clone(tmp_path):
    proc = _tpu(tmp_path, "--dry-run", "configs/mae.py:quickstart", "/mnt/shared/q",
                env=dict(NAME="pod2", ZONE="europe-west4-a", ACCELERATOR_TYPE="v5litepod-16",
                         PROJECT="my-proj", SPOT="1", REPO_URL="https://example.com/mim_jax.git"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    create = _lines(out, "tpu-vm create pod2")
    assert len(create) == 1 and "--spot" in create[0]
    assert "--version v2-alpha-tpuv5-lite" in create[0] and "--project my-proj" in create[0]
    assert not _lines(out, "tpu-vm scp")
    assert _lines(out, "--worker=all", "git clone -q https://example.com/mim_jax.git")
    assert _lines(out, "--worker=all", "--config configs/mae.py:quickstart --workdir /mnt/shared/q "
                  "--distributed")


@pytest.mark.parametrize("args", [[], ["only_config"], ["--bogus", "c", "w"]])
def test_tpu_usage_errors(tmp_path, args):
    proc = _tpu(tmp_path, "--dry-run", "--zone", "z", *args)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_tpu_refuses_gcs_workdir(tmp_path):
    proc = _tpu(tmp_path, "--dry-run", "--zone", "z", "--accelerator-type", "v4-8", "c", "gs://b/w")
    assert proc.returncode == 2 and "gcsfuse" in proc.stderr


def test_sbatch_directives():
    text = open(os.path.join(LAUNCH, "slurm_gpu.sbatch")).read()
    for line in ["#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=TERM@120", "#SBATCH --requeue"]:
        assert line + "\n" in text
    assert "srun " in text and "--distributed" in text


def test_sbatch_runs_srun_with_forwarded_args(tmp_path):
    # A srun that drops its own options and runs the task; a python3 that prints what it got.
    _fake_bin(tmp_path, "srun", 'while [[ $1 == -* ]]; do echo "srun-opt $1"; shift; done\n'
                               'exec "$@"\n')
    _fake_bin(tmp_path, "python3", 'echo "ids=$JAX_LOCAL_DEVICE_IDS xla=$XLA_FLAGS"\n'
                                  'printf "arg %s\\n" "$@"\n')
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=ROOT, CUDA_VISIBLE_DEVICES="0,1,2,3")
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "configs/mae.py",
                           "/shared/runs/mae", "--config.batch_size=512", "--config.seed=3"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "srun-opt --kill-on-bad-exit=1" in lines
    args = [l[4:] for l in lines if l.startswith("arg ")]
    assert args == ["-m", "mim_jax.main", "--config", "configs/mae.py", "--workdir",
                    "/shared/runs/mae", "--distributed", "--config.batch_size=512",
                    "--config.seed=3"]
    ids = [l for l in lines if l.startswith("ids=")]
    assert ids and ids[0].startswith("ids=0,1,2,3 ")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in ids[0]


def test_sbatch_usage_error():
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "only_config"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr
