"""A workdir written by an earlier version of mim_jax still resumes, and continues as it would
have: tests/data/mae_run_step4 is an MAE run stopped after step 4 of 8 (see its README.txt),
with the losses of the uninterrupted run in reference_losses.json."""
import json
import os
import shutil

import numpy as np

from conftest import tiny_train_config
from mim_jax import optim, train

DATA = os.path.join(os.path.dirname(__file__), "data", "mae_run_step4")


def _records(workdir):
    """The loss records of metrics.jsonl, in the order they were written."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [rec for rec in map(json.loads, f) if "loss" in rec]


def test_a_checkpoint_of_an_earlier_version_resumes(tfds_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(DATA, workdir, ignore=shutil.ignore_patterns(
        "README.txt", "reference_losses.json"))
    with open(os.path.join(DATA, "reference_losses.json")) as f:
        reference = {int(step): loss for step, loss in json.load(f).items()}
    assert [r["step"] for r in _records(workdir)] == [1, 2, 3, 4]

    # The config that wrote it (its fields cpu_dots and model.matmul_precision no longer
    # exist; they were operational, so dropping them is no config change); data.data_dir, also
    # operational, is the test's.
    cfg = tiny_train_config(tfds_dir)
    # That version excluded the tokens from weight decay; the MAE configs now decay them, as
    # the reference does. The record has no optimizer.no_decay, which compares as that rule.
    cfg.optimizer.no_decay = optim.DEFAULT_NO_DECAY
    train.train_and_evaluate(cfg, workdir)

    records = _records(workdir)
    # Resumed after step 4: steps 1-4 are the old run's records, 5-8 were added once each
    # (a run started over would have logged steps 1-4 again).
    assert [r["step"] for r in records] == list(range(1, 9)), [r["step"] for r in records]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    losses = {r["step"]: r["loss"] for r in records}
    # Products may be summed in another order (or GELU written another way) than when the
    # reference was recorded: close, not bitwise.
    np.testing.assert_allclose([losses[s] for s in range(5, 9)],
                               [reference[s] for s in range(5, 9)], rtol=1e-4)
