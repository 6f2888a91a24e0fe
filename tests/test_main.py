"""The command line: python -m mim_jax.main, run as a user would, on 4 simulated CPU devices."""
import json
import os
import subprocess
import sys

import pytest

from conftest import SMALL_PROBES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.objective.decoder_width=16",
        "--config.objective.decoder_heads=2", "--config.objective.decoder_depth=1",
        *SMALL_PROBES]


def _main(workdir, tfds_dir, *overrides, devices=4):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "mim_jax.main", "--config", "configs/mae.py:quickstart",
           "--workdir", str(workdir), f"--config.data.data_dir={tfds_dir}", *TINY, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_main_trains_data_parallel_on_4_devices(tfds_dir, tmp_path):
    run = _main(tmp_path / "w", tfds_dir, "--config.total_steps=6", "--config.batch_size=32",
                "--config.log_every_steps=2", "--config.checkpoint.every_steps=3",
                "--config.evaluators.reconstruction.every_steps=6")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 devices" in run.stderr
    assert "step 6/6 (100.0%) loss" in run.stderr  # progress line with ETA/throughput
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["3", "6"]
    assert os.listdir(tmp_path / "w" / "reconstructions") == ["step_0000006.png"]
    with open(tmp_path / "w" / "final_metrics.json") as f:
        assert json.load(f)["step"] == 6


def test_batch_not_divisible_by_devices_fails_before_compute(tfds_dir, tmp_path):
    run = _main(tmp_path / "w", tfds_dir, "--config.batch_size=6")
    assert run.returncode != 0
    assert "batch_size=6" in run.stderr and "device count 4" in run.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_typo_in_override_fails_with_the_field_name(tfds_dir, tmp_path):
    run = _main(tmp_path / "w", tfds_dir, "--config.batch_sise=32", devices=1)
    assert run.returncode != 0
    assert "batch_sise" in run.stderr


@pytest.mark.slow
def test_simmim_quickstart_through_main_learns_and_writes_png(tfds_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "mim_jax.main", "--config",
           "configs/simmim.py:quickstart,model=swin", "--workdir", str(tmp_path / "w"), f"--config.data.data_dir={tfds_dir}",
           "--config.model.embed_dim=16", "--config.model.num_heads=(2, 4)",
           "--config.total_steps=40", "--config.batch_size=32", "--config.log_every_steps=1",
           "--config.evaluators.reconstruction.every_steps=40", *SMALL_PROBES]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5]), losses
    assert os.listdir(tmp_path / "w" / "reconstructions") == ["step_0000040.png"]
