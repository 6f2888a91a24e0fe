"""Fine-tuning and linear probing through the shared trainer: loading, resume, main."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import short_run, tiny_train_config
from mim_jax import checkpointing, data, pretrained, train
from mim_jax.evaluators import probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pretrained_run(tfds_dir, tmp_path_factory):
    """A tiny MAE pretraining run (8 steps) to fine-tune from."""
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    train.train_and_evaluate(tiny_train_config(tfds_dir), workdir)
    return workdir


def tiny_finetune_config(tfds_dir, pretrained, mode="finetune", **overrides):
    from configs import finetune as finetune_config, linear_probe as probe_config
    arg = f"quickstart,pretrained={pretrained}"
    c = (finetune_config if mode == "finetune" else probe_config).get_config(arg)
    c.evaluators.classification.update(every_epochs=0.0, every_steps=4, max_examples=64,
                                       batch_size=32)
    return short_run(c, tfds_dir, **overrides)


def _records(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
    return out


def test_load_encoder_returns_the_pretrained_encoder(pretrained_run):
    enc = pretrained.load_encoder(pretrained_run)
    assert enc.objective == "mae" and enc.step == 8
    raw = checkpointing.restore_raw(os.path.join(pretrained_run, "checkpoints"), 8)
    for a, b in zip(jax.tree.leaves(enc.params), jax.tree.leaves(raw["encoder"])):
        np.testing.assert_array_equal(a, b)
    # A checkpoints/STEP folder works too.
    again = pretrained.load_encoder(os.path.join(pretrained_run, "checkpoints", "8"))
    assert again.step == 8


def test_load_encoder_names_mismatched_parameters(pretrained_run, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    os.symlink(os.path.join(pretrained_run, "checkpoints"), changed / "checkpoints")
    config = json.load(open(os.path.join(pretrained_run, "config.json")))
    config["model"]["width"] = 48
    config["model"]["num_heads"] = 2
    json.dump(config, open(changed / "config.json", "w"))
    with pytest.raises(ValueError) as e:
        pretrained.load_encoder(str(changed))
    assert "patch_embed/kernel (4, 4, 1, 32) != (4, 4, 1, 48)" in str(e.value)
    assert "norm/scale (32,) != (48,)" in str(e.value)


def test_finetune_starts_from_the_pretrained_encoder(tfds_dir, pretrained_run, tmp_path):
    cfg = tiny_finetune_config(tfds_dir, pretrained_run, total_steps=1, warmup_steps=1,
                               optimizer=dict(base_lr=1e-30))  # effectively no update
    cfg.optimizer.update(layer_decay=0.75)
    workdir = str(tmp_path / "ft")
    train.train_and_evaluate(cfg, workdir)
    params = checkpointing.restore_raw(os.path.join(workdir, "checkpoints"), 1)
    encoder = pretrained.load_encoder(pretrained_run).params
    np.testing.assert_allclose(params["encoder"]["patch_embed"]["kernel"],
                               encoder["patch_embed"]["kernel"], atol=1e-6)
    assert "norm" not in params["encoder"]  # global pooling normalises after pooling
    assert os.path.isfile(os.path.join(workdir, "best.json"))
    rec = _records(workdir)[1]
    assert 0.0 <= rec["classification/top1"] <= rec["classification/top5"] <= 1.0


def _preempted_then_resumed(cfg, workdir, monkeypatch, die_at=6):
    class Preempted(Exception):
        pass

    real = data.create_train_iterator

    def dying(*args, **kwargs):
        it = real(*args, **kwargs)
        limit = die_at - kwargs["start_step"]

        class Wrapped:
            steps_per_epoch = it.steps_per_epoch
            skipped_images = 0
            count = 0

            def __next__(self):
                if Wrapped.count == limit:
                    raise Preempted()
                Wrapped.count += 1
                return next(it)
        return Wrapped()

    monkeypatch.setattr(data, "create_train_iterator", dying)
    with pytest.raises(Preempted):
        train.train_and_evaluate(cfg, workdir)
    monkeypatch.setattr(data, "create_train_iterator", real)
    assert checkpointing.Checkpointer(workdir).latest_step() == 4
    train.train_and_evaluate(cfg, workdir)


@pytest.mark.parametrize("mode", ["finetune", "linear_probe"])
def test_finetune_and_probe_resume_exactly(tfds_dir, pretrained_run, tmp_path, monkeypatch,
                                           mode):
    overrides = {}
    if mode == "finetune":
        overrides["finetune"] = dict(ema_decay=0.9)
    cfg = tiny_finetune_config(tfds_dir, pretrained_run, mode, **overrides)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(cfg, straight)
    _preempted_then_resumed(cfg, resumed, monkeypatch)
    a, b = _records(straight), _records(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], step
    for key in ("classification/top1", "classification/loss"):
        assert a[8][key] == b[8][key]
    if mode == "finetune":
        assert "classification/ema_top1" in a[8]
    else:  # the encoder is frozen: its checkpointed copy never moves
        before = pretrained.load_encoder(pretrained_run).params
        state = checkpointing.restore_raw(os.path.join(straight, "checkpoints"), 8,
                                          subtree="model_state")
        np.testing.assert_array_equal(state["encoder"]["patch_embed"]["kernel"],
                                      before["patch_embed"]["kernel"])


@pytest.mark.slow
def test_pretrain_then_finetune_through_main(tfds_dir, tmp_path):
    """The README path: pretrain with main, then fine-tune that workdir with main."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    pre, ft = str(tmp_path / "pre"), str(tmp_path / "ft")
    common = [f"--config.data.data_dir={tfds_dir}", "--config.batch_size=16",
              "--config.total_steps=4", "--config.warmup_steps=1", "--config.log_every_steps=2",
              "--config.checkpoint.asynchronous=False"]
    subprocess.run([sys.executable, "-m", "mim_jax.main", "--config",
                    "configs/mae.py:quickstart", "--workdir", pre, *common,
                    "--config.model.width=32", "--config.model.depth=1",
                    "--config.model.num_heads=2", "--config.model.mlp_dim=64",
                    "--config.objective.decoder_width=16", "--config.objective.decoder_depth=1",
                    "--config.objective.decoder_heads=2",
                    "--config.evaluators.reconstruction.every_steps=100",
                    "--config.evaluators.reconstruction.error_images=16",
                    "--config.evaluators.knn.every_steps=4",
                    "--config.evaluators.knn.max_train_examples=64",
                    "--config.evaluators.knn.max_eval_examples=32",
                    "--config.evaluators.linear_probe.every_steps=4",
                    "--config.evaluators.linear_probe.max_train_examples=64",
                    "--config.evaluators.linear_probe.max_eval_examples=32",
                    "--config.evaluators.linear_probe.max_iter=20"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    pre_records = _records(pre)
    assert "knn/top1" in pre_records[4] and "masked_error_ratio" in pre_records[4]
    assert pre_records[4]["linear_probe/l2"] in probe.DEFAULT_L2_GRID
    subprocess.run([sys.executable, "-m", "mim_jax.main", "--config",
                    f"configs/finetune.py:quickstart,pretrained={pre}", "--workdir", ft, *common,
                    "--config.evaluators.classification.every_epochs=0",
                    "--config.evaluators.classification.every_steps=2",
                    "--config.evaluators.classification.max_examples=32"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    records = _records(ft)
    assert np.isfinite(records[4]["loss"]) and "classification/top1" in records[4]
    best = json.load(open(os.path.join(ft, "best.json")))
    assert best["step"] in (2, 4)


# ------------------------------------------------------------- SparK ConvNet encoders ---

@pytest.fixture(scope="module")
def spark_run(tfds_dir, tmp_path_factory):
    """A tiny SparK ResNet pretraining run (4 steps; BatchNorm statistics in model_state)."""
    import ml_collections

    from configs import spark as spark_config
    c = spark_config.get_config("quickstart")  # total stride 8 on 32 px
    c.model.update(stem_width=8, widths=(4, 8, 8, 16))
    c.objective.decoder_width = 32
    c.evaluators = ml_collections.ConfigDict()
    short_run(c, tfds_dir, total_steps=4)
    workdir = str(tmp_path_factory.mktemp("spark"))
    train.train_and_evaluate(c, workdir)
    return workdir


def _spark_finetune_config(tfds_dir, run, mode):
    c = tiny_finetune_config(tfds_dir, run, mode, total_steps=2, warmup_steps=1)
    c.checkpoint.every_steps = 2
    c.evaluators.classification.every_steps = 2
    return c


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_spark_finetune_starts_from_the_pretrained_encoder_and_statistics(
        tfds_dir, spark_run, tmp_path, monkeypatch):
    encoder = pretrained.load_encoder(spark_run)
    state = checkpointing.restore_raw(os.path.join(spark_run, "checkpoints"), 4,
                                      subtree="model_state")
    assert encoder.objective == "spark" and encoder.step == 4
    _assert_trees_equal(encoder.batch_stats, state["batch_stats"]["encoder"])

    cfg = _spark_finetune_config(tfds_dir, spark_run, "finetune")
    assert cfg.model.name == "resnet" and cfg.model.stem_stride == 1
    assert cfg.data.image_size == 32 and tuple(cfg.model.widths) == (4, 8, 8, 16)
    # Record the state the trainer starts from (step 0).
    starts = []
    real_load = pretrained.load_frozen
    monkeypatch.setattr(pretrained, "load_frozen",
                        lambda *a: starts.append(real_load(*a)) or starts[-1])
    workdir = str(tmp_path / "ft")
    train.train_and_evaluate(cfg, workdir)
    (params, model_state), = starts
    _assert_trees_equal(params["encoder"], encoder.params)
    _assert_trees_equal(model_state["batch_stats"]["encoder"], encoder.batch_stats)
    assert "fc_norm" not in params and params["head"]["kernel"].shape == (64, 10)
    rec = _records(workdir)[2]
    assert np.isfinite(rec["loss"]) and 0.0 <= rec["classification/top1"] <= 1.0
    # Fine-tuning trains BatchNorm: the running averages moved with the batch statistics.
    after = checkpointing.restore_raw(os.path.join(workdir, "checkpoints"), 2,
                                      subtree="model_state")["batch_stats"]["encoder"]
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(after),
                                                   jax.tree.leaves(encoder.batch_stats))]
    assert any(moved)


def test_spark_linear_probe_keeps_the_encoder_and_its_statistics(tfds_dir, spark_run,
                                                                 tmp_path):
    encoder = pretrained.load_encoder(spark_run)
    cfg = _spark_finetune_config(tfds_dir, spark_run, "linear_probe")
    workdir = str(tmp_path / "probe")
    train.train_and_evaluate(cfg, workdir)
    rec = _records(workdir)[2]
    assert np.isfinite(rec["loss"]) and 0.0 <= rec["classification/top1"] <= 1.0
    state = checkpointing.restore_raw(os.path.join(workdir, "checkpoints"), 2,
                                      subtree="model_state")
    # Frozen encoder in eval mode: its weights and statistics are the pretrained ones.
    _assert_trees_equal(state["encoder"], encoder.params)
    _assert_trees_equal(state["batch_stats"]["encoder"], encoder.batch_stats)
    assert set(state["batch_stats"]) == {"encoder", "probe"}


def test_convnext_classifier_has_timms_head_and_no_state(tfds_dir):
    from configs import finetune as finetune_config
    from mim_jax.objectives.base import make_rngs
    c = short_run(finetune_config.get_config("quickstart,model=convnext"), tfds_dir)
    assert c.optimizer.layer_decay == 0.75 and c.data.image_size == 32
    objective = pretrained.build_objective(c)
    params, model_state = objective.init_variables(jax.random.key(0))
    assert model_state == {}  # ConvNeXt has no BatchNorm
    assert params["fc_norm"]["scale"].shape == (128,)
    batch = {"image": np.zeros((2, 32, 32, 1), np.float32), "label": np.zeros(2, np.int32)}
    loss, aux = objective.loss_fn(params, model_state, batch, make_rngs(jax.random.key(1)),
                                  False)
    assert np.isfinite(loss) and aux["metrics"]["train_top1"].shape == ()
    assert aux["model_state"] == {}


def test_convnet_finetune_reads_a_timm_layout_pth(tfds_dir, spark_run, tmp_path):
    """SparK releases its encoders as timm state dicts: finetune.pretrained takes the .pth."""
    torch = pytest.importorskip("torch")
    from mim_jax.convert import timm_convnet
    from mim_jax.objectives import classification
    encoder = pretrained.load_encoder(spark_run)
    cfg = _spark_finetune_config(tfds_dir, spark_run, "finetune")
    arch = classification.encoder_from_config(cfg, for_probe=False).config
    state = timm_convnet.convnet_variables_to_timm(
        {"params": {"encoder": encoder.params},
         "batch_stats": {"encoder": encoder.batch_stats}}, config=arch)
    path = str(tmp_path / "resnet_timm_style.pth")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    cfg.finetune.pretrained = path
    params, model_state = pretrained.build_objective(cfg).init_variables(jax.random.key(0))
    got, stats = pretrained.fitted_encoder_params(
        cfg, params["encoder"], model_state["batch_stats"]["encoder"])
    _assert_trees_equal(got, encoder.params)
    _assert_trees_equal(stats, encoder.batch_stats)


def test_bce_loss_is_timms_binary_cross_entropy():
    """finetune.loss='bce' (SparK's ResNet recipe): mean over batch and classes of the
    per-class logistic loss on the soft (mixup, smoothed) targets."""
    from mim_jax.objectives import classification
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5)).astype(np.float32) * 3
    targets = rng.dirichlet(np.ones(5), size=4).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    np.testing.assert_allclose(float(classification.classification_loss(logits, targets, "bce")),
                               want, rtol=1e-5)
    ce = float(classification.classification_loss(logits, targets))
    np.testing.assert_allclose(ce, -np.mean(np.sum(targets * (logits - np.log(np.sum(
        np.exp(logits.astype(np.float64)), -1, keepdims=True))), -1)), rtol=1e-5)
