"""Shared test fixtures: tiny configs that exercise the real code paths."""
import json
import os

# Tests run on CPU in float32; keep XLA from grabbing every core for intra-op threads twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite runs the CPU path the entry points ship: their allocator policy, set before jax
# starts its threads (a subprocess that runs an entry point sets it itself).
from mim_jax.allocator import apply_cpu_policy  # noqa: E402

apply_cpu_policy()

import re
import tempfile

import jax
import ml_collections
import pytest

# Many tests compile the same tiny programs (each training run re-jits its step); a persistent
# compilation cache shared by this process and the subprocesses it starts saves minutes.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "mim_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def tiny_mae_config(**objective):
    obj = dict(name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=32,
               decoder_depth=1, decoder_heads=4)
    obj.update(objective)
    return ml_collections.ConfigDict(dict(
        data=dict(image_size=32, channels=3),
        model=dict(variant="Ti/4", width=64, depth=2, num_heads=4, mlp_dim=128),
        objective=obj))


@pytest.fixture
def tiny_config():
    return tiny_mae_config()


def tiny_beit_config(version: int):
    """configs/beit.py's quickstart shrunk: 2 blocks of width 64 on a 7 x 7 grid; v1 with a
    small dVAE (56 px view), v2 with the quickstart VQ-KD and a 1-block CLS head."""
    from configs import beit as beit_config
    config = beit_config.get_config("quickstart")
    config.model.update(depth=2, width=64, num_heads=2, mlp_dim=128, drop_path_rate=0.1)
    if version == 1:
        config.objective.tokenizer = beit_config.dall_e_tokenizer()
        config.objective.tokenizer.update(input_size=56, n_hid=16, n_blk_per_group=1,
                                          vocab_size=512)
    else:
        config.objective.update(cls_head_layers=1, early_layers=1)
    config.batch_size = 4
    return config


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """One TFDS data_dir for the whole session: mnist5k is prepared in it on first use."""
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_train_config(data_dir, **overrides):
    """configs/mae.py:quickstart shrunk to seconds: the real trainer path on mnist5k."""
    from configs import mae as mae_config
    c = mae_config.get_config("quickstart")
    c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.objective.update(decoder_width=16, decoder_depth=1, decoder_heads=2)
    c.evaluators = ml_collections.ConfigDict(dict(reconstruction=dict(
        type="reconstruction", every_steps=100, num_images=2, error_images=8)))
    return short_run(c, data_dir, **overrides)


def recipe_config(spec: str, **overrides):
    """A config file as a user names it (configs/NAME.py[:ARGS]) with dotted-field overrides,
    e.g. recipe_config("configs/mae.py:variant=B/16", **{"model.depth": 2})."""
    from mim_jax.config_file import load_config
    config = load_config(spec)
    with config.unlocked():
        for dotted, value in overrides.items():
            node = config
            *head, last = dotted.split(".")
            for h in head:
                node = node[h]
            node[last] = value
    return config


def short_run(c, data_dir, **overrides):
    """8 steps of batch 16 with checkpoints at 4 and 8: what the trainer tests run."""
    c.data.update(data_dir=data_dir, shuffle_buffer=256)
    c.batch_size = 16
    c.total_steps = 8
    c.warmup_steps = 2
    c.log_every_steps = 1
    c.checkpoint.update(every_steps=4, asynchronous=False)
    c.update(overrides)
    return c


def logged_losses(workdir, *extra: str):
    """{step: loss} from a run's metrics.jsonl (or {step: (loss, *extra)}); a step logged again
    after a resume overwrites the earlier record. Evaluator records carry no loss: skipped."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = (rec["loss"], *(rec[k] for k in extra)) if extra \
                    else rec["loss"]
    return out


def adam_losses(objective, params, batch, rngs, lr: float, steps: int):
    """Losses of `steps` Adam steps on one fixed batch and mask: a pure optimisation check."""
    import optax
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt_state):
        (loss, _), grads = jax.value_and_grad(
            lambda p: objective.loss_fn(p, {}, batch, rngs, train=True), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


def legacy_transformers_names(state: dict, root: str) -> dict:
    """transformers 4.x key names (most Hub files), written out independently of the
    converters; BEiT's also move the relative position tables."""
    out = {}
    for key, value in state.items():
        key = re.sub(rf"^{root}layers\.", f"{root}encoder.layer.", key)
        key = re.sub(rf"^{root}shared_position_bias\.", f"{root}encoder.relative_position_bias.",
                     key)
        key = re.sub(r"(\.layer\.\d+)\.relative_position_bias\.",
                     r"\1.attention.attention.relative_position_bias.", key)
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense"),
                         ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


# Command-line overrides that keep the quickstarts' kNN / probe evaluators to a few seconds.
SMALL_PROBES = [f"--config.evaluators.{name}.{field}={value}"
                for name in ("knn", "linear_probe")
                for field, value in (("max_train_examples", 64), ("max_eval_examples", 32),
                                     ("batch_size", 32))] + [
    "--config.evaluators.linear_probe.max_iter=20",
    "--config.evaluators.reconstruction.error_images=16"]


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05) -> None:
    """Polls `predicate` until it is true or `timeout` seconds pass (the caller asserts)."""
    import time
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(interval)
