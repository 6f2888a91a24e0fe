"""BEiT through the real trainer: the frozen tokenizer is loaded before the data, kept in the
checkpointed model state (a resume needs neither the file nor a reload) and resumes exactly;
an unusable tokenizer file fails with one line naming the field."""
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import logged_losses, short_run  # noqa: E402
from mim_jax import checkpointing, train  # noqa: E402
from mim_jax.convert import dall_e  # noqa: E402
from mim_jax.errors import ConfigError  # noqa: E402
from mim_jax.models import tokenizers  # noqa: E402


def _tiny_beit(data_dir, tokenizer_file, **overrides):
    """configs/beit.py:quickstart shrunk: 28 px digits, patch 4 (7 x 7), a one-group dVAE on a
    7 px view as the tokenizer (a 7 x 7 token grid)."""
    from configs import beit as beit_config
    c = beit_config.get_config("quickstart")
    c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.objective.tokenizer = dict(name="dall_e", checkpoint=tokenizer_file, input_size=7,
                                 n_hid=8, group_count=1, n_blk_per_group=1, vocab_size=16)
    c.evaluators = {}
    return short_run(c, data_dir, **overrides)


def _save_tokenizer(path, cfg):
    spec = tokenizers.build(cfg.objective.tokenizer, 28, 1)
    params = spec.module.init(jax.random.key(7), np.zeros((1, 28, 28, 1), np.float32),
                              method="encode")["params"]
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in
                dall_e.params_to_official(params).items()}, path)
    return params


def test_tokenizer_loads_into_state_and_resume_is_exact(tfds_dir, tmp_path):
    token_file = str(tmp_path / "tokenizer.pt")
    cfg = _tiny_beit(tfds_dir, token_file)
    saved = _save_tokenizer(token_file, cfg)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(cfg, workdir)
    straight = logged_losses(workdir, "mim_accuracy")
    assert sorted(straight) == list(range(1, 9))
    assert len({loss for loss, _ in straight.values()}) == 8  # the loss moves

    # The file's weights, not the random init, are what the run tokenized with.
    ckpt_dir = os.path.join(workdir, "checkpoints")
    tok = checkpointing.restore_raw(ckpt_dir, 8, subtree="model_state")["tokenizer"]
    for a, b in zip(jax.tree.leaves(tok), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Resume from step 4 with the tokenizer file gone: steps 5-8 are repeated bit for bit.
    os.remove(token_file)
    shutil.rmtree(os.path.join(ckpt_dir, "8"))
    os.remove(os.path.join(workdir, "final_metrics.json"))
    train.train_and_evaluate(cfg, workdir)
    resumed = logged_losses(workdir, "mim_accuracy")
    assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]


def test_missing_tokenizer_fails_with_one_line_before_data(tmp_path):
    cfg = _tiny_beit(str(tmp_path / "never_prepared"), str(tmp_path / "absent.pt"))
    with pytest.raises(ConfigError, match=r"^objective\.tokenizer\.checkpoint=.*absent\.pt"):
        train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "never_prepared")  # the dataset was never touched
