"""tools/plot_run.py: the docs pictures come from a run's metrics.jsonl and reconstructions."""
import json
import os

import numpy as np
from PIL import Image

from tools import plot_run


def _fake_run(workdir):
    os.makedirs(workdir / "reconstructions")
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(10, 210, 10)]
    rows += [{"step": 100, "masked_error": 0.5, "masked_error_constant": 0.8},
             {"step": 200, "masked_error": 0.4, "masked_error_constant": 0.8},
             {"step": 200, "knn/top1": 0.8, "knn/best_top1": 0.8, "linear_probe/top1": 0.9}]
    rows.append({"step": 200, "loss": 0.123})  # logged again after a resume: this one counts
    with open(workdir / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + '\n{"step": 210, "lo')  # killed
    noise = np.random.default_rng(0).integers(0, 256, (896, 448, 3), dtype=np.uint8)
    for step in (100, 200):
        Image.fromarray(noise).save(workdir / "reconstructions" / f"step_{step:07d}.png")
    with open(workdir / "evaluation.json", "w") as f:
        json.dump({"frozen": {"random_init": {"knn": 0.4, "linear_probe": 0.6}}}, f)


def test_metrics_are_read_with_later_rows_winning(tmp_path):
    _fake_run(tmp_path)
    series = plot_run.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert series["loss"][200] == 0.123 and len(series["loss"]) == 20
    assert plot_run.accuracy_keys(series) == ["knn/top1", "linear_probe/top1"]
    assert plot_run.random_init_accuracy(str(tmp_path)) == {"knn": 0.4, "linear_probe": 0.6}


def test_pictures_are_written_and_small(tmp_path, capsys):
    _fake_run(tmp_path)
    out = tmp_path / "pictures" / "run"
    plot_run.main([str(tmp_path), "--out", str(out)])
    curves, grid = f"{out}_curves.png", f"{out}_reconstructions.png"
    assert Image.open(curves).size[0] > 3 * Image.open(curves).size[1]  # three panels
    # The newest grid, halved until it fits: random noise does not compress.
    assert os.path.getsize(grid) <= plot_run._MAX_BYTES
    assert Image.open(grid).size[0] < 448
    assert "step_0000200.png" in capsys.readouterr().out


def test_token_objectives_get_their_accuracy_panel(tmp_path):
    rows = [{"step": s, "loss": 5.0 - s / 100, "mim_accuracy": s / 1000,
             "mim_accuracy_most_frequent_token": 0.02} for s in range(10, 110, 10)]
    rows.append({"step": 100, "knn/top1": 0.5})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    plot_run.main([str(tmp_path), "--out", str(tmp_path / "beit")])
    curves = Image.open(tmp_path / "beit_curves.png")
    assert curves.size[0] > 3 * curves.size[1]  # loss, token accuracy, probes
    assert not (tmp_path / "beit_reconstructions.png").exists()
