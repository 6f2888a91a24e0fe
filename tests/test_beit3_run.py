"""BEiT-3 run as a user would: `python -m mim_jax.evaluate` on the quickstart config (a tiny
model, a few steps) pretrains through the trainer on the mixed stream, then reports image
probes, fine-tuning on labels (pretrained and from scratch), retrieval and masked-token
accuracy."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import mae as mae_config
from configs import vqkd as vqkd_config
from mim_jax import checkpointing, pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokenizer_run(tmp_path):
    """A VQ-KD run with random weights (the quickstart tokenizer's sizes, smaller): what
    objective.tokenizer.checkpoint names."""
    c = vqkd_config.get_config("quickstart")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(mae_config.get_config("quickstart").to_json())
    c.objective.teacher.checkpoint = str(teacher)
    c.objective.tokenizer.update(width=32, depth=1, num_heads=2, mlp_dim=64, decoder_width=32,
                                 decoder_heads=2, decoder_mlp_dim=64, n_codes=64)
    run = tmp_path / "tokenizer_run"
    run.mkdir()
    (run / "config.json").write_text(c.to_json())
    params, state = jax.jit(pretrained.build_objective(c).init_variables)(jax.random.key(0))
    # A tokenizer is read only once its codebook was initialised (a first training step).
    state = dict(state, codebook=dict(state["codebook"], initted=jnp.ones((), bool)))
    ckpt = checkpointing.Checkpointer(str(run), asynchronous=False)
    ckpt.maybe_save(1, {"params": params, "model_state": state}, force=True)
    ckpt.close()
    return run


@pytest.mark.slow
def test_beit3_quickstart_trains_and_evaluates_finetuning_retrieval_and_masked_tokens(
        tfds_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    workdir = tmp_path / "beit3"
    args = [sys.executable, "-m", "mim_jax.evaluate", "--config", "configs/beit3.py:quickstart",
            "--workdir", str(workdir), "--random_seeds=1", "--retrieval_steps=3",
            "--retrieval_batch=8", "--finetune_epochs=0.5",  # its warmup: 18 steps of 128 digits
            f"--config.objective.tokenizer.checkpoint={_tokenizer_run(tmp_path)}",
            "--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
            "--config.model.mlp_dim=64", f"--config.data.data_dir={tfds_dir}",
            "--config.total_steps=4", "--config.warmup_steps=1", "--config.batch_size=12",
            "--config.checkpoint.asynchronous=False", "--config.evaluators.knn.every_steps=0",
            "--config.evaluators.linear_probe.every_steps=0"]
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    assert last["step"] == 4
    for name in ("image_loss", "text_loss", "pair_text_loss", "pair_image_loss"):
        assert last[name] > 0  # every stream ran in the step
    assert (workdir / "text" / "quickstart_1000.model").is_file()  # the run's tokenizer
    result = json.loads((workdir / "evaluation.json").read_text())
    assert set(result["frozen"]["pretrained"]) >= {"knn", "linear_probe", "knn_cls"}
    for start in ("pretrained", "scratch"):  # the run's Multiway encoder, fine-tuned on labels
        finetuned = result["finetune"][start]
        assert 0.0 <= finetuned["top1"] <= 1.0 and finetuned["epochs"] == 0.5
        ft_config = json.loads((workdir / f"finetune_{start}" / "config.json").read_text())
        assert ft_config["model"]["name"] == "multiway"
        assert ft_config["model"]["vocab_size"] == 1002 and ft_config["model"]["width"] == 32
    retrieval = result["retrieval"]
    for row in (retrieval["pretrained"], retrieval["random_init"]):
        assert set(row) >= {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "zero_shot/i2t_r1"}
        assert 0 <= row["i2t_r1"] <= row["i2t_r5"] <= 100
    assert set(result["masked_tokens"]) == {"image", "text", "pair_text", "pair_image"}
    for scores in result["masked_tokens"].values():
        assert 0 <= scores["accuracy"] <= 1 and 0 < scores["most_frequent_token"] <= 1
    table = (workdir / "evaluation.md").read_text()
    assert "| retrieval (%) |" in table and "| masked tokens predicted (%) |" in table
    mean_rows = [line for line in table.splitlines() if "mean of patches" in line]
    assert len(mean_rows) == 2 and not any(line.endswith("| n/a |") for line in mean_rows)
