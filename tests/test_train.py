import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import logged_losses, tiny_mae_config, tiny_train_config
from mim_jax import checkpointing, data, objectives, optim, sharding, train


def test_resume_is_exact(tfds_dir, tmp_path, monkeypatch):
    cfg = tiny_train_config(tfds_dir)
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(cfg, straight)

    # Same run, "preempted" when asking for the batch of step 7 (last checkpoint: step 4).
    class Preempted(Exception):
        pass

    real = data.create_train_iterator

    def dying_iterator(*args, **kwargs):
        it = real(*args, **kwargs)
        limit = 6 - kwargs["start_step"]

        def gen():
            for i, batch in enumerate(it):
                if i == limit:
                    raise Preempted()
                yield batch
        wrapped = gen()
        wrapped_obj = type("It", (), {"__next__": lambda self: next(wrapped),
                                      "steps_per_epoch": it.steps_per_epoch,
                                      "skipped_images": 0})()
        return wrapped_obj

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(data, "create_train_iterator", dying_iterator)
    with pytest.raises(Preempted):
        train.train_and_evaluate(cfg, resumed)
    monkeypatch.setattr(data, "create_train_iterator", real)
    assert checkpointing.Checkpointer(resumed).latest_step() == 4
    assert max(logged_losses(resumed)) == 6
    train.train_and_evaluate(cfg, resumed)

    a, b = logged_losses(straight), logged_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bitwise
    assert len(set(a.values())) == 8  # the losses really move


def test_end_to_end_run_writes_checkpoint_png_and_logs(tfds_dir, tmp_path):
    cfg = tiny_train_config(tfds_dir, total_steps=40)
    cfg.model.update(width=64, depth=2, num_heads=4, mlp_dim=128)
    cfg.batch_size = 32
    cfg.evaluators.reconstruction.every_steps = 20
    cfg.checkpoint.every_steps = 20
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(cfg, workdir)
    losses = logged_losses(workdir)
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean(
        [losses[s] for s in range(36, 41)])
    assert last < 0.85 * first, (first, last)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]
    pngs = sorted(os.listdir(os.path.join(workdir, "reconstructions")))
    assert pngs == ["step_0000020.png", "step_0000040.png"]
    from PIL import Image
    grid = np.asarray(Image.open(os.path.join(workdir, "reconstructions", pngs[-1])))
    assert grid.shape[1] == 4 * grid.shape[0] // 2  # 2 images x 4 columns, square tiles
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    for name in ("config.json", "parameters.txt", "final_metrics.json"):
        assert os.path.exists(os.path.join(workdir, name))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tfds_dir, tmp_path, monkeypatch):
    cfg = tiny_train_config(tfds_dir)
    real = data.create_train_iterator

    def poisoned(*args, **kwargs):
        it = real(*args, **kwargs)

        class It:
            steps_per_epoch, skipped_images, n = it.steps_per_epoch, 0, 0

            def __next__(self):
                self.n += 1
                batch = next(it)
                if self.n == 6:  # step 6 sees a NaN image
                    # Floats reach the model as they are (taken as already normalised).
                    batch = {"image": np.full(batch["image"].shape, np.nan, np.float32)}
                return batch
        return It()

    monkeypatch.setattr(data, "create_train_iterator", poisoned)
    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError,
                       match="non-finite loss, gradient or updated state at or before step 6"):
        train.train_and_evaluate(cfg, workdir)
    ckpt = checkpointing.Checkpointer(workdir)
    assert ckpt.all_steps() == [4]
    restored, step = ckpt.restore(None)
    assert step == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["params"]))


def test_gradient_accumulation_matches_large_batch():
    cfg = tiny_mae_config()
    base = objectives.build(cfg)
    # Feed the mask noise with the batch, so micro-batches see exactly the large batch's masks.
    obj = base.__class__(
        name=base.name, model=base.model, encoder_keys=base.encoder_keys,
        image_shape=base.image_shape,
        loss_fn=lambda p, s, b, r, t: base.loss_fn(p, s, b, r, t, noise=b["noise"]))
    params = obj.init(jax.random.key(0))
    batch = {"image": jax.random.normal(jax.random.key(1), (8, 32, 32, 3)),
             "noise": jax.random.uniform(jax.random.key(2), (8, 64))}
    schedule = optim.make_schedule(1.0, 10, 0)
    # Plain SGD with lr 1: the update IS the gradient, so the comparison is not blurred by
    # Adam's first step (which is ~sign(g) and amplifies rounding where g ~ 0).
    tx = optax.sgd(schedule)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), nonfinite_steps=jnp.zeros((), jnp.int32))
    mesh = sharding.make_mesh()
    results = [jax.jit(train.make_train_step(obj, tx, schedule, accum, jax.random.key(3), mesh))(
        state, batch) for accum in (1, 4)]
    for new_state, metrics in results[1:]:
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], results[0][1]["grad_norm"], rtol=1e-5)
        delta = lambda s: jax.tree.map(jnp.subtract, s.params, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                     delta(new_state), delta(results[0][0]))


@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_normalises_uint8_like_precomputed_images(accum):
    """The step normalises uint8 pixels itself (data.normalize_images, on the device): its
    result is that of the same step fed the images normalised beforehand, on the host."""
    cfg = tiny_mae_config()
    cfg.data.mean, cfg.data.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    obj = objectives.build(cfg)
    params = obj.init(jax.random.key(0))
    pixels = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), np.uint8)
    mean, std = np.float32(cfg.data.mean), np.float32(cfg.data.std)
    precomputed = (pixels.astype(np.float32) / np.float32(255) - mean) / std
    # XLA turns the division by 255 / std into a multiplication: at most one float32 ulp.
    np.testing.assert_allclose(jax.jit(lambda x: data.normalize_images(x, cfg.data))(pixels),
                               precomputed, rtol=0, atol=1e-6)
    schedule = optim.make_schedule(1.0, 10, 0)
    tx = optax.sgd(schedule)  # lr 1: the update is the gradient (Adam would amplify ulps)
    mesh = sharding.make_mesh()
    step = jax.jit(train.make_train_step(obj, tx, schedule, accum, jax.random.key(3), mesh,
                                         data_cfg=cfg.data))

    def run(images):
        state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params),
                                 nonfinite_steps=jnp.zeros((), jnp.int32))
        state, metrics = step(state, {"image": images})
        delta = jax.tree.map(jnp.subtract, state.params, params)
        return jax.device_get((delta, metrics))

    (d_uint8, m_uint8), (d_float, m_float) = run(pixels), run(precomputed)
    for k in m_float:
        np.testing.assert_allclose(m_uint8[k], m_float[k], rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 d_uint8, d_float)
    with pytest.raises(ValueError, match="data config"):  # uint8 needs mean / std
        jax.jit(train.make_train_step(obj, tx, schedule, 1, jax.random.key(3), mesh))(
            train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), nonfinite_steps=jnp.zeros((), jnp.int32)),
            {"image": pixels})


@pytest.mark.parametrize("field,value,match", [
    ("data.name", "no_such_dataset", r"data.name='no_such_dataset' is unknown"),
    ("objective.name", "nope", r"objective.name='nope' is not a known objective"),
    ("model.variant", "Q/16", r"variant='Q/16' is not a ViT variant"),
    ("total_steps", -5, r"total_steps=-5 must be a finite number >= 0"),
    ("batch_size", 0, r"batch_size=0 must be an integer >= 1"),
    ("accum_steps", 3, r"accum_steps=3 must divide batch_size=16"),
    ("evaluators.reconstruction.every_steps", -1, r"every_steps=-1 must be an integer >= 0"),
    ("evaluators.reconstruction.every_epochs", -1.0, r"every_epochs=-1.0 must be a number >= 0"),
    ("optimizer.layer_decay", 1.5, r"optimizer.layer_decay=1.5 must be in \(0, 1\]"),
])
def test_bad_config_fails_before_compute(tfds_dir, tmp_path, field, value, match):
    cfg = tiny_train_config(tfds_dir)
    node, key = cfg, field
    if "." in field:
        *parents, key = field.split(".")
        for p in parents:
            node = node[p]
    node[key] = value
    workdir = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(cfg, str(workdir))
    assert not (workdir / "checkpoints").exists()


def test_partial_checkpoint_is_never_loaded(tfds_dir, tmp_path):
    cfg = tiny_train_config(tfds_dir, total_steps=4)
    workdir = tmp_path / "run"
    train.train_and_evaluate(cfg, str(workdir))
    # What an interrupted save of step 8 leaves behind: orbax's temporary directory.
    partial = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1234"
    (partial / "default").mkdir(parents=True)
    (partial / "default" / "garbage").write_bytes(b"\x00" * 10)
    assert checkpointing.Checkpointer(str(workdir)).latest_step() == 4


@pytest.mark.slow
def test_a_checkpoint_resumes_with_scan_switched_on_and_off(tfds_dir, tmp_path):
    """model.scan stores the ViT blocks stacked; a checkpoint of either layout restores into
    the other (parameters, optimizer moments alike) and training continues the same way."""
    import shutil
    runs = {}
    for scan in (False, True):
        cfg = tiny_train_config(tfds_dir)
        cfg.model.update(depth=2, scan=scan)
        runs[scan] = str(tmp_path / f"scan_{scan}")
        train.train_and_evaluate(cfg, runs[scan])
    for scan in (False, True):  # (the layouts initialise differently: compare per source)
        straight = logged_losses(runs[scan])
        switched = str(tmp_path / f"from_{scan}")
        shutil.copytree(runs[scan], switched)
        shutil.rmtree(os.path.join(switched, "checkpoints", "8"))
        os.remove(os.path.join(switched, "final_metrics.json"))
        cfg = tiny_train_config(tfds_dir)
        cfg.model.update(depth=2, scan=not scan)
        train.train_and_evaluate(cfg, switched)  # model.scan may change between runs
        resumed = logged_losses(switched)
        np.testing.assert_allclose([resumed[s] for s in range(5, 9)],
                                   [straight[s] for s in range(5, 9)], rtol=1e-5)


@pytest.mark.parametrize("by_cond", [True, False])  # lax.cond (CPU, TPU) / select (GPU)
@pytest.mark.parametrize("case", ["nan_loss", "exploding_lr", "finite"])
def test_train_step_skips_a_non_finite_gradient_and_counts_a_broken_state(
        case, by_cond, monkeypatch):
    """A NaN loss / gradient leaves params and optimizer state exactly as they were; an update
    from a finite gradient that breaks the state (lr 1e36) is applied but counted, so the host
    stops before saving; a normal step counts nothing."""
    monkeypatch.setattr(train, "_skip_by_cond", lambda mesh: by_cond)
    obj = objectives.build(tiny_mae_config())
    params = obj.init(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    if case == "nan_loss":
        images = images.at[0, 0, 0, 0].set(jnp.nan)
    lr = 1e36 if case == "exploding_lr" else 1e-3
    schedule = optim.make_schedule(lr, 10, 0)
    tx = optax.adam(schedule)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), nonfinite_steps=jnp.zeros((), jnp.int32))
    step = jax.jit(train.make_train_step(obj, tx, schedule, 1, jax.random.key(3),
                                         sharding.make_mesh()))
    new, metrics = step(state, {"image": images})
    assert int(new.step) == 1
    assert int(new.nonfinite_steps) == (0 if case == "finite" else 1)
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                        (new.params, new.opt_state),
                                        (state.params, state.opt_state)))
    if case == "nan_loss":
        assert all(same) and not np.isfinite(float(metrics["loss"]))
    else:
        assert not all(same)
        assert np.isfinite(float(metrics["param_norm"])) == (case == "finite")
