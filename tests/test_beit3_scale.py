"""BEiT-3 at scale: the train step of configs/beit3.py's quickstart, shrunk to one Multiway
layer of width 32 and a one-block tokenizer, under FSDP against data parallelism on 4
simulated devices; the Multiway encoder's rematerialised layers against plain ones
(tests/test_beit3_objective.py's tiny model)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mim_jax import pretrained
from mim_jax.models import remat
from mim_jax.objectives.base import make_rngs
from test_beit3_objective import B, T, random_variables, texts, tiny_config
from test_main import ROOT

# One process, 4 CPU devices: the same two train steps on a data-parallel mesh and on an FSDP
# mesh, from the same state and batch. Writes the losses, the state's bytes (in all and on one
# device) and the parameters after the steps to argv[1].
_STEPS_ON_TWO_MESHES = """
import json, sys
import jax, numpy as np
from conftest import recipe_config
from test_beit3_objective import random_variables
from mim_jax import optim, pretrained, sharding, train
from mim_jax.benchmark.train_step import _synthetic_device_batch

config = recipe_config("configs/beit3.py:quickstart", **{
    "model.width": 32, "model.depth": 1, "model.num_heads": 2, "model.mlp_dim": 64,
    "objective.tokenizer.depth": 1, "batch_size": 12, "fsdp_min_size": 0})
objective = pretrained.build_objective(config)
params, model_state = random_variables(objective)  # the tokenizer's too: random weights
schedule = optim.make_schedule(1e-3, total_steps=100, warmup_steps=0)
tx = optim.make_optimizer(config.optimizer, schedule, params)
abstract = train.abstract_train_state(config, objective, jax.random.key(0))
results, saved = {}, {}
for name, axes in (("data", {"data": 4}), ("fsdp", {"data": 1, "fsdp": 4})):
    mesh = sharding.make_mesh(axes)
    state_sh = train.make_state_shardings(config, abstract, mesh)
    state = jax.device_put(train.TrainState(
        step=np.int32(0), params=params, opt_state=tx.init(params), nonfinite_steps=np.int32(0),
        model_state=model_state), state_sh)
    step = jax.jit(train.make_train_step(objective, tx, schedule, 1, jax.random.key(1), mesh,
                                         data_cfg=config.data),
                   in_shardings=(state_sh, sharding.batch_sharded(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)))
    batch = _synthetic_device_batch(objective, config.batch_size, mesh, seed=0)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    results[name] = dict(
        losses=losses, params_bytes=sum(x.nbytes for x in jax.tree.leaves(state.params)),
        params_per_device=sharding.per_device_bytes(state.params),
        state_bytes=sum(x.nbytes for x in jax.tree.leaves(state)),
        state_per_device=sharding.per_device_bytes(state))
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        saved[name + "/" + sharding.path_name(path)] = np.asarray(leaf)
np.savez(sys.argv[1] + ".npz", **saved)
with open(sys.argv[1] + ".json", "w") as f:
    json.dump(results, f)
"""


@pytest.mark.slow
def test_fsdp_shards_the_state_and_trains_like_data_parallel(tmp_path):
    """fsdp=4: each device holds about a quarter of the parameters (the Multiway copies, the
    embeddings, the heads) and of the whole train state (the frozen tokenizer included), and
    two steps give the data-parallel run's losses and parameters."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    out = str(tmp_path / "steps")
    run = subprocess.run([sys.executable, "-c", _STEPS_ON_TWO_MESHES, out], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out + ".json") as f:
        results = json.load(f)
    dp, fsdp = results["data"], results["fsdp"]
    assert dp["params_per_device"] == dp["params_bytes"] == fsdp["params_bytes"]
    assert dp["state_per_device"] == dp["state_bytes"] == fsdp["state_bytes"]
    # Not exactly 1/4: scalars and tensors with no dimension divisible by 4 stay whole.
    assert 0.25 <= fsdp["params_per_device"] / fsdp["params_bytes"] < 0.3, fsdp
    assert 0.25 <= fsdp["state_per_device"] / fsdp["state_bytes"] < 0.3, fsdp
    np.testing.assert_allclose(fsdp["losses"], dp["losses"], rtol=1e-6)
    assert dp["losses"][1] != dp["losses"][0]  # the first step changed the parameters
    params = np.load(out + ".npz")
    names = sorted({key.split("/", 1)[1] for key in params})
    # AdamW divides each gradient by its own magnitude: where one is near zero, the meshes'
    # different reduction orders can move its update by a little of the lr (1e-3).
    for name in names:
        np.testing.assert_allclose(params["fsdp/" + name], params["data/" + name], rtol=1e-5,
                                   atol=1e-5, err_msg=name)


def test_remat_gives_the_loss_and_gradients_of_plain_layers():
    """Rematerialised Multiway layers keep the parameter names (a checkpoint loads either
    way), each under its model.remat policy, and give the same loss and gradients, drop path
    included, on a mixed batch."""
    def build(remat_policy):
        config = tiny_config()
        config.model.update(drop_path_rate=0.2, remat=remat_policy)
        return pretrained.build_objective(config)

    plain = build("none")
    params, state = random_variables(plain)
    rng = np.random.default_rng(0)
    ids, padding = texts(rng, B, T)
    pair_ids, pair_padding = texts(rng, B, T)
    batch = dict(image=rng.standard_normal((B, 32, 32, 3)).astype(np.float32),
                 text_ids=ids, text_padding=padding,
                 pair_image=rng.standard_normal((B, 32, 32, 3)).astype(np.float32),
                 pair_text_ids=pair_ids, pair_text_padding=pair_padding)
    rngs = make_rngs(jax.random.key(3))

    def loss_of(objective):
        return lambda p: objective.loss_fn(p, state, batch, rngs, train=True)[0]

    def remat_policies(objective):
        eqns = jax.make_jaxpr(loss_of(objective))(params).jaxpr.eqns
        return [e.params["policy"] for e in eqns if e.primitive.name in ("checkpoint", "remat2")]

    assert remat_policies(plain) == []
    for name, policy in remat.POLICIES.items():
        objective = build(name)
        assert jax.tree.structure(jax.eval_shape(objective.init_variables, jax.random.key(0))) \
            == jax.tree.structure((params, state))
        assert remat_policies(objective) == [policy] * 3 * 2  # streams x layers

    def loss_and_grads(objective):
        return jax.jit(jax.value_and_grad(loss_of(objective)))(params)

    (loss, grads), (remat_loss, remat_grads) = map(loss_and_grads, (plain, build("full")))
    np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale)
