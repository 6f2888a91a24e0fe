"""The trainer's jitted train step without data: setup, compile, runner, XLA cost figures."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

from mim_jax import optim, pretrained, sharding, train


def xla_flops(compiled) -> Optional[float]:
    """FLOPs of one call of a compiled executable by XLA's cost analysis (one device's share)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def xla_memory(compiled) -> Optional[dict]:
    """Buffer sizes XLA planned for one call: arguments, outputs, temporaries (bytes)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if stats is None:
        return None
    return {name: int(getattr(stats, f"{name}_size_in_bytes"))
            for name in ("argument", "output", "alias", "temp")}



@dataclasses.dataclass
class TrainSetup:
    objective: object
    mesh: object
    step: object  # the jitted (not yet lowered) train step
    state: object
    batch: dict  # on-device synthetic images, sharded like the trainer's batch


def token_labels_shape(objective) -> Optional[tuple]:
    """(tokens per image, vocabulary size) of an objective that predicts a tokenizer's ids
    (BEiT), or None."""
    vocab = getattr(objective.model, "vocab_size", None)
    if vocab is None:
        return None
    return objective.encoder.config.num_patches, int(vocab)


def _synthetic_device_batch(objective, batch_size: int, mesh, seed: int,
                            precomputed_tokens: bool = False) -> dict:
    """Random values of every field the step reads (objective.batch_fields): uint8 pixels as
    the pipelines yield them (the step normalises them itself), labels of a fine-tuning step,
    token ids of a text stream. With precomputed_tokens, also random int32 'tokens' [B, L]
    (ids tokenized ahead of time): the objective then skips its tokenizer."""
    rows = sharding.batch_sharded(mesh)

    def random_field(field, key):
        if field.dtype == jnp.bool_:
            return jax.random.bernoulli(key, 0.5, field.shape)
        return jax.random.randint(key, field.shape, 0, field.high, jnp.int32).astype(field.dtype)

    # Pixels from seed + 1, labels from seed + 3, as before any other field existed.
    offsets = {"image": 1, "label": 3}
    batch = {}
    for i, (name, field) in enumerate(sorted(objective.batch_fields(batch_size).items())):
        key = jax.random.key(seed + offsets.get(name, 10 + i))
        batch[name] = jax.jit(functools.partial(random_field, field), out_shardings=rows)(key)
    if precomputed_tokens:
        labels = token_labels_shape(objective)
        if labels is None:
            raise ValueError(f"objective {objective.name!r} predicts no token ids.")
        length, vocab = labels
        batch["tokens"] = jax.jit(
            lambda key: jax.random.randint(key, (batch_size, length), 0, vocab, jnp.int32),
            out_shardings=rows)(jax.random.key(seed + 2))
    return batch


def build_train_setup(config, precomputed_tokens: bool = False) -> TrainSetup:
    """The trainer's own state (params and model_state, e.g. a frozen tokenizer: random
    weights, which cost the same time as real ones), optimizer and jitted step (donated state),
    without data. precomputed_tokens: the batch carries token ids, so a tokenizer objective
    (BEiT) does not run its tokenizer in the step. A config with a finetune block gives the
    fine-tuning (or linear-probe) step, with random labels and randomly initialised weights."""
    config = train.without_text_data(config)
    objective = pretrained.build_objective(config)
    mesh = sharding.make_mesh()
    accum = config.get("accum_steps", 1)
    sharding.check_batch_divisible(config.batch_size, accum, mesh,
                                   objective.stream_sizes(config.batch_size))
    peak_lr = optim.peak_learning_rate(config.optimizer, config.batch_size)
    # The schedule only sets the learning-rate value; its length does not change the compute.
    schedule = optim.make_schedule(peak_lr, total_steps=10_000, warmup_steps=100)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    # Layer-wise lr decay (fine-tuning) numbers the layers from the parameter tree.
    abstract_params, _ = jax.eval_shape(objective.init_variables, init_rng)
    tx = optim.make_optimizer(config.optimizer, schedule, abstract_params)
    repl = sharding.replicated(mesh)

    def init_state(rng):
        params, model_state = objective.init_variables(rng)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params),
                                nonfinite_steps=jnp.zeros((), jnp.int32),
                                model_state=model_state,
                                ema_params=params if objective.ema_decay > 0 else None)

    state = jax.jit(init_state, out_shardings=repl)(init_rng)
    step = jax.jit(train.make_train_step(objective, tx, schedule, accum, step_rng, mesh,
                                         data_cfg=config.data),
                   in_shardings=(repl, sharding.batch_sharded(mesh)), out_shardings=(repl, repl),
                   donate_argnums=(0,))
    batch = _synthetic_device_batch(objective, config.batch_size, mesh, config.seed,
                                    precomputed_tokens)
    return TrainSetup(objective, mesh, step, state, batch)


def compile_step(setup: TrainSetup):
    """-> (compiled step, {'trace_lower_s', 'compile_s'})."""
    start = time.perf_counter()
    lowered = setup.step.lower(setup.state, setup.batch)
    lowered_at = time.perf_counter()
    logging.info("Compiling the train step (traced and lowered in %.1f s)...", lowered_at - start)
    compiled = lowered.compile()
    done = time.perf_counter()
    logging.info("Compiled in %.1f s.", done - lowered_at)
    return compiled, {"trace_lower_s": lowered_at - start, "compile_s": done - lowered_at}


class StepRunner:
    """Calls a compiled step on its own (donated) state; each call blocks on the result."""

    def __init__(self, compiled, state, batch):
        self._compiled, self.state, self._batch = compiled, state, batch
        self.metrics = None

    def __call__(self, batch=None):
        self.state, self.metrics = self._compiled(self.state,
                                                  self._batch if batch is None else batch)
        jax.block_until_ready(self.metrics)
        return self.metrics

    def async_call(self, batch):
        self.state, self.metrics = self._compiled(self.state, batch)


def flops_report(config, compiled, per_device_batch: int) -> dict:
    # SparK / ConvNets: no analytic count, XLA's stands in.
    objective = pretrained.build_objective(train.without_text_data(config))
    forward, analytic = dict(objective.forward_flops), objective.flops_per_image
    measured = xla_flops(compiled)
    xla_per_image = measured / per_device_batch if measured is not None else None
    loops = [name for name, on in (("model.scan", config.model.get("scan", False)),
                                   ("accum_steps > 1", config.get("accum_steps", 1) > 1)) if on]
    notes = [f"{' and '.join(loops)}: XLA's cost analysis may count a loop body once, so "
             "its figure can be low"] if loops else []
    if jax.devices()[0].platform == "gpu":
        notes.append("on a GPU, XLA's cost analysis leaves out the library calls (cuBLAS, "
                     "cuDNN) that run most products, so its figure is far too low")
    return {
        "xla_note": "; ".join(notes) or None,
        "analytic_train_per_image": analytic,
        "analytic_forward_per_image": sum(forward.values()) if forward else None,
        "analytic_forward_breakdown": forward,
        "xla_train_per_image": xla_per_image,
        "xla_over_analytic": xla_per_image / analytic if xla_per_image and analytic else None,
        "convention": "analytic: matmuls only, 2 FLOPs per multiply-add, train = 3x forward; "
                      "XLA: compiled.cost_analysis()['flops'] of the whole step (all ops, "
                      "incl. optimizer) / per-device batch",
    }

