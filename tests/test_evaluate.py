"""python -m mim_jax.evaluate, run as a user would: the frozen-feature table of a finished run."""
import json
import os
import subprocess
import sys

import pytest

from mim_jax.evaluators import probe
from mim_jax.evaluators.table import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scores(base: float, cls: bool) -> dict:
    out = {"knn": base, "linear_probe": base + 0.1, "linear_probe_l2": 1e-3}
    if cls:
        out.update(knn_cls=base + 0.01, linear_probe_cls=base + 0.11, linear_probe_cls_l2=1e-3)
    return out


@pytest.mark.parametrize("cls", [True, False])
def test_table_has_a_row_per_encoder_and_pooling(cls):
    frozen = {"pretrained": _scores(0.5, cls), "random_init": _scores(0.3, cls),
              "random_init_runs": [_scores(0.3, cls)] * 3,
              "raw_pixels": {"knn": 0.9, "linear_probe": 0.88, "linear_probe_l2": 1e-2}}
    table = markdown_table({"frozen": frozen, "finetune": {"pretrained": {"top1": 0.8},
                                                             "scratch": {"top1": 0.2}}})
    rows = table.splitlines()[2:]
    assert len(rows) == (5 if cls else 3)
    assert rows[0].startswith("| pretrained encoder, mean") and rows[0].endswith(
        "| 50.0 | 60.0 | 80.0 |")
    assert rows[1].endswith("| 30.0 | 40.0 | 20.0 |") and "mean of 3" in rows[1]
    if cls:  # fine-tuning has one row per encoder, not per pooling
        assert "CLS" in rows[2] and rows[2].endswith("| 51.0 | 61.0 | n/a |")
    assert rows[-1] == "| raw pixels | 90.0 | 88.0 | n/a |"


@pytest.mark.slow
def test_evaluate_reports_mean_and_cls_features_random_init_and_raw_pixels(tfds_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    tiny = ["--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
            "--config.model.mlp_dim=64", "--config.objective.decoder_width=16",
            "--config.objective.decoder_heads=2", "--config.objective.decoder_depth=1",
            f"--config.data.data_dir={tfds_dir}", "--config.total_steps=4",
            "--config.batch_size=16", "--config.checkpoint.asynchronous=False",
            "--config.evaluators.knn.every_steps=0",
            "--config.evaluators.linear_probe.every_steps=0",
            "--config.evaluators.reconstruction.every_steps=0"]
    run = subprocess.run(
        [sys.executable, "-m", "mim_jax.evaluate", "--config", "configs/mae.py:quickstart",
         "--workdir", str(tmp_path / "w"), "--skip_finetune", "--random_seeds=2", *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "w" / "evaluation.json").read_text())["frozen"]
    for row in ("pretrained", "random_init"):
        assert set(result[row]) >= {"knn", "linear_probe", "knn_cls", "linear_probe_cls"}
    assert len(result["random_init_runs"]) == 2
    for run_scores in (result["pretrained"], *result["random_init_runs"], result["raw_pixels"]):
        assert run_scores["linear_probe_l2"] in probe.DEFAULT_L2_GRID
        assert 0.1 < run_scores["linear_probe"] <= 1.0  # 10 classes: above chance
    assert "| raw pixels |" in (tmp_path / "w" / "evaluation.md").read_text()


def test_table_of_a_beit3_run_adds_retrieval_and_masked_tokens():
    frozen = {"pretrained": _scores(0.5, True), "random_init": _scores(0.3, True),
              "random_init_runs": [_scores(0.3, True)] * 2,
              "raw_pixels": {"knn": 0.9, "linear_probe": 0.88, "linear_probe_l2": 1e-2}}
    recall = lambda base: {"i2t_r1": base, "i2t_r5": base + 10, "t2i_r1": base + 1,
                           "t2i_r5": base + 11, "zero_shot/i2t_r1": 1.0,
                           "zero_shot/i2t_r5": 2.0, "zero_shot/t2i_r1": 3.0,
                           "zero_shot/t2i_r5": 4.0}
    result = {"frozen": frozen,
              "retrieval": {"pretrained": recall(60.0), "random_init": recall(20.0)},
              "masked_tokens": {"text": {"what": "texts (token ids)", "accuracy": 0.125,
                                         "most_frequent_token": 0.05}}}
    lines = markdown_table(result).splitlines()
    assert all(line.endswith("| n/a |") for line in lines[2:7])  # run with --skip_finetune
    start = lines.index("| retrieval (%) | image->text R@1 | R@5 | text->image R@1 | R@5 |")
    assert lines[start + 2] == ("| pretrained encoder, after the contrastive fine-tune | 60.0 | "
                                "70.0 | 61.0 | 71.0 |")
    assert lines[start + 3] == ("| pretrained encoder, raw features, no fine-tune | 1.0 | 2.0 | "
                                "3.0 | 4.0 |")
    assert lines[start + 4].startswith("| same encoder at random init (mean of 2), after")
    assert lines[start + 4].endswith("| 20.0 | 30.0 | 21.0 | 31.0 |")
    assert lines[-1] == "| texts (token ids) | 12.5 | 5.0 |"
