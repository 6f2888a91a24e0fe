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
    assert not _lines(out, "gcloud storage")  # a filesystem WORKDIR has no bucket to check
    pack = _lines(out, "git ls-files -z | tar czf")
    assert len(pack) == 1
    scp = _lines(out, "gcloud compute tpus tpu-vm scp")
    assert len(scp) == 1 and "--worker=all" in scp[0] and "pod1:" in scp[0]
    ssh = _lines(out, "gcloud compute tpus tpu-vm ssh pod1", "--worker=all")
    assert len(ssh) == 3
    clear, install, train = ssh
    assert "pkill -TERM" in clear and "libtpu_lockfile" in clear
    assert "uv venv -q --python 3.12 .venv" in install
    assert "uv pip install -q --python .venv/bin/python -e" in install
    assert ("/.venv/bin/python -m mim_jax.main --config configs/mae.py:variant=B/16,epochs=800 "
            "--workdir /mnt/shared/runs/mae --distributed "
            "--config.data.data_dir=/mnt/shared/tfds --config.batch_size=1024") in train
    assert "[worker" in train
    order = out.splitlines()
    assert (order.index(create[0]) < order.index(clear) < order.index(pack[0])
            < order.index(install) < order.index(train))
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
    assert _lines(out, "--worker=all", "git clone -q https://example.com/mim_jax.git", "uv venv")
    assert _lines(out, "--worker=all", "--config configs/mae.py:quickstart --workdir /mnt/shared/q "
                  "--distributed")


@pytest.mark.parametrize("args", [[], ["only_config"], ["--bogus", "c", "w"]])
def test_tpu_usage_errors(tmp_path, args):
    proc = _tpu(tmp_path, "--dry-run", "--zone", "z", *args)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_tpu_gcs_workdir_is_checked_first_and_passed_on(tmp_path):
    proc = _tpu(tmp_path, "--dry-run", "--zone", "z", "--accelerator-type", "v4-8",
                "--python-version", "3.11", "c", "gs://b/w")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("+ gcloud storage cp ") and " gs://b/w/" in lines[0]
    assert _lines(proc.stdout, "--python 3.11 .venv")
    assert _lines(proc.stdout, "-m mim_jax.main --config c --workdir gs://b/w --distributed")


def test_tpu_stop_dry_run(tmp_path):
    proc = _tpu(tmp_path, "--dry-run", "--stop", "--name", "pod3", "--zone", "z")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "tpu-vm ssh pod3 --zone z --worker=all" in lines[0]
    assert "pkill -TERM" in lines[0]
    proc = _tpu(tmp_path, "--dry-run", "--stop", "--zone", "z", "c", "w")
    assert proc.returncode == 2 and "takes no CONFIG" in proc.stderr


def test_python_requires_covers_the_dependencies():
    """setup.py's python_requires is at least what the installed jax, jaxlib, flax, optax,
    orbax-checkpoint and chex releases declare (pip would otherwise reach them late)."""
    import importlib.metadata as md
    import re
    text = open(os.path.join(ROOT, "setup.py")).read()
    floor = re.search(r'python_requires=">=3\.(\d+)"', text)
    assert floor, "python_requires must be a >=3.N floor"
    needed = {}
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex"):
        try:
            spec = md.metadata(dist)["Requires-Python"] or ""
        except md.PackageNotFoundError:
            continue
        m = re.search(r">=\s*3\.(\d+)", spec)
        if m:
            needed[dist] = int(m.group(1))
    assert needed, "none of the dependencies is installed"
    assert int(floor.group(1)) >= max(needed.values()), needed


def test_sbatch_directives():
    text = open(os.path.join(LAUNCH, "slurm_gpu.sbatch")).read()
    for line in ["#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --mem=0",
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


@pytest.mark.parametrize("env, expected", [
    (dict(SLURM_JOB_CPUS_PER_NODE="128(x2),96", SLURM_CPUS_PER_TASK="32"), "--cpus-per-task=96"),
    (dict(SLURM_JOB_CPUS_PER_NODE="224(x4)"), "--cpus-per-task=224"),
    (dict(SLURM_CPUS_PER_TASK="32"), "--cpus-per-task=32"),
    ({}, None),
])
def test_sbatch_gives_the_task_every_cpu_of_its_node(tmp_path, env, expected):
    _fake_bin(tmp_path, "srun", 'while [[ $1 == -* ]]; do echo "srun-opt $1"; shift; done\n')
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "c", "w"],
                          env=dict(clean, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                                   SLURM_SUBMIT_DIR=ROOT, **env),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    cpus = [l for l in proc.stdout.splitlines() if l.startswith("srun-opt --cpus-per-task")]
    assert cpus == ([f"srun-opt {expected}"] if expected else [])


def test_sbatch_usage_error():
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "only_config"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr
