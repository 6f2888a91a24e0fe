"""The training loop: jit-compiled, data-parallel, exactly resumable. It runs every objective
alike: the pretraining methods and the fine-tuning / linear probing of a classifier."""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from mim_jax import (checkpointing, data, evaluators, flops, objectives, optim, paths,
                     preemption, pretrained, reporting, sharding, workdir as workdir_lib,
                     workdir_lock)
from mim_jax.errors import ConfigError, RunError


class NonFiniteError(RunError, FloatingPointError):
    """A step produced a non-finite loss or gradient (its update was skipped) or a non-finite
    state; the run stops before anything is saved."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # Steps whose loss or gradient was not finite (their updates are skipped) or whose update
    # left a non-finite state. The host stops the run when it is > 0, before saving anything.
    nonfinite_steps: jax.Array
    # Variables that are not trained by the optimizer: BatchNorm statistics, a frozen tokenizer,
    # teacher or encoder (linear probe). Empty for objectives without any.
    model_state: Any = dataclasses.field(default_factory=dict)
    # Exponential moving average of the parameters (None when off).
    ema_params: Any = None


def _skip_by_cond(mesh) -> bool:
    """Skip a bad update with lax.cond, under which the update runs in place (on a CPU 0.15 s
    instead of 0.5 s for ViT-B's with a select), except on a GPU: a GPU conditional waits on the
    host for its predicate, which would stop the host dispatching steps ahead, so there a select
    fused into the update does it. The mesh's devices decide (an AOT compile for a TPU traces on
    a CPU)."""
    return mesh.devices.flat[0].platform != "gpu"


def _micro_batches(batch, accum_steps: int, mesh):
    """[B, ...] -> [accum, B/accum, ...], taking every accum-th row so that each micro-batch
    stays evenly spread over the data-parallel devices (rows are sharded contiguously)."""
    micro_sharding = sharding.micro_batch_sharded(mesh)

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)
    return jax.tree.map(split, batch)


def _float_norm(tree) -> jax.Array:
    """Global L2 norm of the tree's float leaves, in float32 (0 for a tree without any). It is
    finite exactly when no leaf holds NaN/inf and none has exploded (|x| > ~1e19, which would
    only turn into NaN a step later, after it may already have been checkpointed)."""
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return optax.global_norm(leaves) if leaves else jnp.zeros((), jnp.float32)


def make_train_step(objective, tx, schedule, accum_steps: int, base_rng, mesh, data_cfg=None):
    """(state, batch) -> (state, metrics); `batch` is the global batch of one optimizer step.

    batch['image'] is normalised here, on the device, by data.normalize_images with
    `data_cfg`'s mean / std: uint8 pixels as the pipelines yield them (then `data_cfg` is
    required), or floats that are already normalised."""
    grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)
    ema_decay = objective.ema_decay

    def loss_and_grads(params, model_state, batch, key):
        # Per micro-batch: only one micro-batch of float32 images is live at a time.
        batch = data.normalize_batch(batch, data_cfg)
        (_, aux), grads = grad_fn(params, model_state, batch, objectives.make_rngs(key), True)
        return grads, aux["metrics"], aux["model_state"]

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(base_rng, state.step)
        if accum_steps == 1:
            grads, metrics, model_state = loss_and_grads(state.params, state.model_state, batch,
                                                         key)
        else:
            def body(carry, xs):
                acc, model_state = carry
                i, micro = xs
                grads, metrics, model_state = loss_and_grads(
                    state.params, model_state, micro, jax.random.fold_in(key, i))
                return (jax.tree.map(jnp.add, acc, grads), model_state), metrics
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, model_state), metrics = jax.lax.scan(
                body, (zeros, state.model_state),
                (jnp.arange(accum_steps), _micro_batches(batch, accum_steps, mesh)))
            # Each micro-batch loss is a mean over an equal number of masked patches, so the
            # mean of micro-batch gradients is the large-batch gradient.
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = jax.tree.map(lambda m: m.mean(0), metrics)
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient skips the update, decided before the update runs.
        # (Deciding after it, from the new state, kept both states alive and cost extra passes
        # over them: on a 2-core CPU the update of ViT-B took 0.67 s instead of 0.15 s.)
        gradient_ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def update(operands):
            params, opt_state, ema, grads = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if ema is not None:
                ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                   ema, params)
            return params, opt_state, ema

        operands = (state.params, state.opt_state, state.ema_params, grads)
        if _skip_by_cond(mesh):
            params, opt_state, ema = jax.lax.cond(gradient_ok, update, lambda o: o[:3], operands)
        else:
            params, opt_state, ema = jax.tree.map(lambda n, o: jnp.where(gradient_ok, n, o),
                                                  update(operands), operands[:3])
        # A finite gradient can still break the state (a huge lr, an overflowing moment). That
        # update is not rolled back (that would cost the copy above) but counted like a skipped
        # one: the host stops the run at its next check, which comes before any checkpoint or
        # evaluation, so no checkpoint ever holds a NaN/inf.
        param_norm = _float_norm(params)
        finite = gradient_ok & jnp.isfinite(param_norm) & jnp.isfinite(_float_norm(opt_state))
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            model_state=jax.tree.map(lambda n, o: jnp.where(gradient_ok, n, o),
                                     model_state, state.model_state),
            ema_params=ema)
        metrics = dict(metrics, grad_norm=grad_norm, param_norm=param_norm,
                       lr=schedule(state.step))
        return new_state, metrics

    return train_step


def _check_run_fields(config) -> None:
    for field in ("batch_size", "log_every_steps", "accum_steps", "seed"):
        value = config.get(field, 1)
        minimum = 0 if field == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{field}={value!r} must be an integer >= {minimum}.")
    for field in ("num_epochs", "total_steps", "warmup_epochs", "warmup_steps"):
        value = config.get(field, 0)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                or value == float("inf"):
            raise ConfigError(f"{field}={value!r} must be a finite number >= 0.")
    if not config.get("total_steps") and not config.get("num_epochs"):
        raise ConfigError("num_epochs=0 and total_steps=0: set one of them > 0.")
    # Warmup longer than the run: checked here where both are in the same unit, and against
    # the steps per epoch once the data is known (_total_steps).
    pairs = [("warmup_steps", "total_steps")]
    if not config.get("total_steps") and not config.get("warmup_steps"):
        pairs.append(("warmup_epochs", "num_epochs"))  # only then do both set the lengths
    for warmup, length in pairs:
        if config.get(warmup) and config.get(length) and config[warmup] > config[length]:
            raise ConfigError(f"{warmup}={config[warmup]!r} is longer than the run "
                              f"({length}={config[length]!r}): it must be <= {length}.")
    if config.batch_size % config.get("accum_steps", 1):
        raise ConfigError(f"accum_steps={config.accum_steps} must divide batch_size="
                          f"{config.batch_size}.")


def without_text_data(config):
    """The config without its `text` block (BEiT-3), for a step compiled or timed without
    data (mim_jax.aot, the benchmark): the files that block names for the input pipeline (a
    SentencePiece model, corpora) need not exist, as data.data_dir need not."""
    if config.get("text") is None:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        del config["text"]
    return config


def validate_config(config, *, device_count=None, process_count=None, check_data_dir=True):
    """Every check that can fail before the data is touched or anything compiles; each block
    is checked by the module that owns it. Returns the objective to train (its frozen parts
    resolved, their weights not read yet); raises ConfigError.
    The device and process counts default to this job's (mim_jax.aot passes a pod's)."""
    try:
        _check_run_fields(config)
        optim.validate_config(config.optimizer)
        checkpointing.validate_config(config.checkpoint)
        data.validate_data_config(config.data)
        data.check_known_splits(config.data, config.batch_size,
                                process_count or jax.process_count())
        if check_data_dir:
            data.check_data_dir(config.data)
        sharding.mesh_shape(config.get("mesh"), device_count or jax.device_count())
        sharding.rules_from_config(config)
        sharding.fsdp_min_size(config)
        evaluators.validate(config)
        return pretrained.build_objective(config)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # The owners' checks raise ValueError; a missing or mistyped field surfaces as one of
        # the others while building the model. All are config errors, reported on one line.
        raise ConfigError(_config_message(e)) from e


def _config_message(error: Exception) -> str:
    if isinstance(error, (KeyError, AttributeError)):
        return f"the config lacks a field the run needs: {error}."
    return str(error)


def _total_steps(config, steps_per_epoch: int):
    total = config.get("total_steps") or int(round(config.num_epochs * steps_per_epoch))
    warmup = config.get("warmup_steps") or int(round(config.get("warmup_epochs", 0) *
                                                     steps_per_epoch))
    if warmup > total:  # e.g. a short total_steps against a warmup in epochs: allowed
        logging.warning("The warmup (%d steps) is longer than the run (%d steps): the learning "
                        "rate never reaches its peak.", warmup, total)
    return total, warmup


def _write_parameter_counts(workdir, state, mesh):
    """parameters.txt: every parameter's size, the total, and the train state's bytes in all
    and on one device (what FSDP divides)."""
    counts = {"/".join(getattr(k, "key", str(k)) for k in path): int(np.prod(x.shape))
              for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
    total = sum(counts.values())
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    per_device = sharding.per_device_bytes(state)
    mesh_text = " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    lines = [f"{name}: {n:,}" for name, n in counts.items()] + [f"total: {total:,}"]
    lines.append(f"train state bytes: {state_bytes} in all, {per_device} per device "
                 f"(mesh {mesh_text})")
    (workdir / "parameters.txt").write_text("\n".join(lines) + "\n")
    return total, state_bytes, per_device


def abstract_train_state(config, objective, init_rng):
    """The TrainState's shapes and dtypes, without computing anything. The optimizer state's
    structure does not depend on the schedule's values, so a placeholder schedule does."""
    abstract_params, abstract_model_state = jax.eval_shape(objective.init_variables, init_rng)
    tx = optim.make_optimizer(config.optimizer, optim.make_schedule(1.0, 1, 0), abstract_params)
    ema = objective.ema_decay > 0
    return jax.eval_shape(lambda p, m: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
        nonfinite_steps=jnp.zeros((), jnp.int32), model_state=m,
        ema_params=p if ema else None), abstract_params, abstract_model_state)


def make_state_shardings(config, abstract_state, mesh):
    """Where each leaf of the train state lives on `mesh` (FSDP and partition rules)."""
    try:
        return sharding.state_shardings(abstract_state, mesh, sharding.rules_from_config(config),
                                        sharding.fsdp_min_size(config))
    except ValueError as e:  # a partition rule that does not fit a tensor
        raise ConfigError(str(e)) from e


def _restore(ckpt, abstract_state, state_shardings):
    """(state, step) of the newest good checkpoint, or (None, None). It is restored straight
    into this run's shardings, whatever mesh or process count wrote it (resharding)."""
    if not ckpt.all_steps():
        return None, None
    return ckpt.restore(sharding.with_shardings(abstract_state, state_shardings))


def train_and_evaluate(config, workdir, *, allow_config_change: bool = False) -> dict:
    """Pretrains `config.objective` (or, with a config.finetune block, fine-tunes / probes a
    classifier) in `workdir` (a local path or gs://BUCKET/path), resuming from its newest good
    checkpoint.

    Raises ConfigError (bad config, or a workdir started with another config unless
    `allow_config_change`), CheckpointError (no restorable checkpoint, a failed save) or
    NonFiniteError (a non-finite step) with a one-line message, or preemption.Stopped after a
    SIGTERM / SIGINT has been answered with a checkpoint; nothing else is expected."""
    objective = validate_config(config)
    evaluators.check_needs(config, objective)
    mesh = sharding.make_mesh(config.get("mesh"))
    accum = config.get("accum_steps", 1)
    try:
        sharding.check_batch_divisible(config.batch_size, accum, mesh,
                                       objective.stream_sizes(config.batch_size))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    is_main = jax.process_index() == 0
    workdir = paths.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # One run per workdir, taken before anything in it is read or written (opening the
    # checkpoint manager already cleans up unfinished saves, which may be a live run's).
    with workdir_lock.hold(workdir, is_main=is_main, agree=_agree_with_process_0) as hold:
        ckpt = checkpointing.Checkpointer(workdir, **config.checkpoint)
        try:
            # Signals from here on stop the run at the next step boundary, with a checkpoint.
            with preemption.PreemptionWatch() as watch:
                return _run(config, workdir, objective, mesh, accum, is_main, ckpt,
                            allow_config_change, watch, hold)
        finally:
            # Let an in-flight async save finish (or fail) cleanly; an unfinished one is never
            # listed, so a crash here can only lose progress, not corrupt the workdir.
            ckpt.close()


def _train_iterator(config, objective, workdir, start_step: int):
    """This process's training batches from `start_step` on: images (and labels), or, for an
    objective that reads several streams (BEiT-3), images, texts and pairs in one batch."""
    sizes = objective.stream_sizes(config.batch_size)
    if sizes is None:
        return data.create_train_iterator(
            config.data, global_batch_size=config.batch_size, seed=config.seed,
            start_step=start_step, with_labels=objective.with_labels)
    from mim_jax.data import text as text_data  # pylint: disable=g-import-not-at-top

    tokenizer = text_data.load_tokenizer(config.text, text_data.build_dir_of(workdir))
    if objective.check_text_tokenizer is not None:
        objective.check_text_tokenizer(tokenizer)
    return text_data.create_mixed_iterator(config.text, config.data, tokenizer, sizes,
                                           seed=config.seed, start_step=start_step)


def _agree_with_process_0(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _run(config, workdir, objective, mesh, accum, is_main, ckpt, allow_config_change, watch,
         hold):
    changes = workdir_lib.check(workdir, config, resume_step=ckpt.latest_step(),
                                allow_change=allow_config_change, is_main=is_main)
    base_rng = jax.random.key(config.seed)
    init_rng, step_rng, eval_rng = jax.random.split(base_rng, 3)
    abstract_state = abstract_train_state(config, objective, init_rng)
    state_sh = make_state_shardings(config, abstract_state, mesh)
    # Restore (verifying, falling back past damaged checkpoints) before touching the data.
    restored, start_step = _restore(ckpt, abstract_state, state_sh)
    finished = None if changes else workdir_lib.finished_metrics(workdir, start_step)
    if finished is not None:
        logging.info("The run in %s finished at step %d; nothing to do (its final metrics are "
                     "in %s).", workdir, start_step, workdir_lib.FINAL_METRICS)
        return {k: v for k, v in finished.items() if k not in ("step", "wall_seconds")}
    start_step = start_step or 0
    start = None
    if restored is None and objective.frozen:
        # A fresh run of an objective with frozen weights (a tokenizer, a teacher, a pretrained
        # encoder): read them before the data is touched, so an unusable file fails at once.
        try:
            start = pretrained.load_frozen(
                config, objective, *jax.device_get(jax.jit(objective.init_variables)(init_rng)))
        except ValueError as e:
            raise ConfigError(str(e)) from e

    if is_main:
        data.prepare(config.data)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dataset prepared")
    try:
        train_data = _train_iterator(config, objective, workdir, start_step)
    except ValueError as e:  # a split or batch size the prepared dataset cannot serve
        raise ConfigError(str(e)) from e
    # The first batch now, before anything compiles: data that cannot fill one batch (no
    # decodable image, too few) stops the run here with one line.
    pending = [next(train_data)]
    total_steps, warmup_steps = _total_steps(config, train_data.steps_per_epoch)
    peak_lr = optim.peak_learning_rate(config.optimizer, config.batch_size)
    schedule = optim.schedule_from_config(config.optimizer, peak_lr, total_steps, warmup_steps,
                                          train_data.steps_per_epoch)

    repl = sharding.replicated(mesh)
    abstract_params, _ = jax.eval_shape(objective.init_variables, init_rng)
    tx = optim.make_optimizer(config.optimizer, schedule, abstract_params)

    def init_state(rng, start=None):
        params, model_state = objective.init_variables(rng) if start is None else start
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), nonfinite_steps=jnp.zeros((), jnp.int32),
                          model_state=model_state,
                          ema_params=params if objective.ema_decay > 0 else None)

    if restored is not None:
        logging.info("Resuming from the checkpoint of step %d in %s", start_step, ckpt.directory)
        state = restored
    elif start is None:
        state = jax.jit(init_state, out_shardings=state_sh)(init_rng)
    else:  # a fresh run with frozen weights read in
        state = jax.jit(init_state, out_shardings=state_sh)(init_rng, start)
    writers = reporting.create_writers(workdir, is_main)
    if is_main:
        n_params, state_bytes, per_device = _write_parameter_counts(workdir, state, mesh)
        writers.write_texts(start_step, {"config": f"```\n{config}\n```"})
        logging.info("%s: %s parameters, %d steps (%d per epoch), global batch %d, peak lr %.3g",
                     objective.name, f"{n_params:,}", total_steps, train_data.steps_per_epoch,
                     config.batch_size, peak_lr)
        logging.info("Mesh %s; train state %.1f MiB, %.1f MiB per device.",
                     dict(mesh.shape), state_bytes / 2**20, per_device / 2**20)

    train_step = jax.jit(
        make_train_step(objective, tx, schedule, accum, step_rng, mesh, data_cfg=config.data),
        in_shardings=(state_sh, sharding.batch_sharded(mesh)), out_shardings=(state_sh, repl),
        donate_argnums=(0,))
    evals = evaluators.create(config, objective, mesh, workdir, writers, eval_rng,
                              steps_per_epoch=train_data.steps_per_epoch)
    peak = flops.device_peak_flops(jax.devices()[0])
    progress = reporting.Progress(
        total_steps, start_step, config.batch_size, objective.flops_per_image,
        peak * jax.device_count() if peak else None)  # MFU only where the peak is known

    def check_finite():
        if int(jax.device_get(state.nonfinite_steps)):
            last = ckpt.latest_step()
            raise NonFiniteError(
                f"non-finite loss, gradient or updated state at or before step {step}; the run "
                "stopped before saving it, so no checkpoint holds a non-finite value"
                f"{f' (the last is step {last})' if last else ''}. Lower the learning rate, "
                "enable optimizer.grad_clip_norm, or use float32.")

    metrics, step = None, start_step
    t_start = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        batch = sharding.global_batch(pending.pop() if pending else next(train_data), mesh)
        state, metrics = train_step(state, batch)
        ckpt.check_for_errors()  # a failed async save stops the run at once
        if step == start_step + 1:
            jax.block_until_ready(metrics)  # exclude compilation from throughput
            progress.start(step)
        if step % config.log_every_steps == 0 or step == total_steps:
            check_finite()
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            scalars.update(progress.report(step))
            scalars["skipped_images"] = train_data.skipped_images
            writers.write_scalars(step, scalars)
            logging.info(progress.line(step, scalars, scalars["loss"]))
        if step % ckpt.every_steps == 0:
            check_finite()
            hold.check()
            ckpt.maybe_save(step, state)
        if any(ev.is_due(step, final=step == total_steps) for ev in evals):
            check_finite()  # an evaluation never sees a broken state
        for ev in evals:
            ev.maybe_run(step, state, force=step == total_steps)
        # A signal (preemption, Ctrl-C) stops the run here, at a step boundary that every
        # process agrees on, after its checkpoint is committed.
        if watch.should_stop(step) and step < total_steps:
            check_finite()
            hold.check()
            ckpt.maybe_save(step, state, force=True)
            ckpt.wait()  # committed before the process may be killed
            writers.flush()
            raise preemption.Stopped(
                f"stopped by {watch.signal_name} after step {step} of {total_steps}; its "
                f"checkpoint is in {ckpt.directory}. Run the same command to resume.",
                watch.signum or signal.SIGTERM)
    if metrics is not None:
        check_finite()
        hold.check()
        ckpt.maybe_save(step, state, force=True)
    ckpt.wait()  # the final save must have landed before the run counts as finished
    writers.flush()
    wall = time.perf_counter() - t_start
    logging.info("Done: %d steps in %s.", step - start_step, reporting.format_duration(wall))
    final = {k: float(v) for k, v in jax.device_get(metrics or {}).items()}
    if is_main:
        workdir_lib.write_final_metrics(workdir, dict(final, step=int(step), wall_seconds=wall))
    writers.close()
    return final
