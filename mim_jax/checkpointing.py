"""Orbax CheckpointManager wrapper: periodic async saves, keep-last-K, auto-resume.

Orbax writes each step into a temporary directory and renames it only once every host has
finished, so a checkpoint interrupted mid-write is never listed, and so never restored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1000,
                 asynchronous: bool = True, subdir: str = "checkpoints"):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1.")
        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps={every_steps} must be >= 1.")
        self.every_steps = every_steps
        self.directory = os.path.join(os.path.abspath(workdir), subdir)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def restore(self, abstract_state: Any, step: Optional[int] = None):
        """Restores into the shapes/shardings of `abstract_state` (jax.ShapeDtypeStruct tree)."""
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
        if not force and step % self.every_steps:
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) describing a live pytree, for restore targets."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


@dataclasses.dataclass(frozen=True)
class PretrainedEncoder:
    """The encoder of a pretraining run: its module, parameters and the run's config."""
    module: Any  # flax.linen.Module, built from `config` exactly as pretraining built it
    params: Any  # numpy arrays
    config: Any  # ml_collections.ConfigDict of the pretraining run
    step: int
    objective: str


def resolve_checkpoint(path: str, step: Optional[int] = None):
    """A workdir, its checkpoints/ folder or one checkpoints/STEP folder -> (workdir, step)."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if name.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(path)), int(name)
    if name == "checkpoints":
        path = os.path.dirname(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is not a mim_jax workdir (no config.json): pass the "
                         "--workdir of a pretraining run or one of its checkpoints/STEP folders.")
    return path, step


def read_run_config(workdir: str):
    import ml_collections
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_raw(directory: str, step: int, subtree: str = "params"):
    """One top-level entry of a saved state as host numpy arrays, on any device count."""
    manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
    if step not in manager.all_steps():
        raise ValueError(f"no checkpoint of step {step} in {directory}; saved steps: "
                         f"{sorted(manager.all_steps())}.")
    metadata = manager.item_metadata(step)
    metadata = getattr(metadata, "tree", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    manager.close()
    return jax.tree.map(np.asarray, restored[subtree])


def load_encoder(path: str, step: Optional[int] = None) -> PretrainedEncoder:
    """The encoder (module + parameters) of a mim_jax pretraining run.

    `path` is the run's workdir (latest checkpoint, or `step`), its checkpoints/ folder, or a
    checkpoints/STEP folder. Works for every objective (MAE, SimMIM with ViT or Swin, ...): the
    objective is rebuilt from the run's config.json and names its encoder. Raises ValueError
    listing the parameter names whose shapes do not match the encoder that config describes.
    """
    from mim_jax import objectives  # the objectives import models; keep this module light

    workdir, step = resolve_checkpoint(path, step)
    config = read_run_config(workdir)
    objective = objectives.build(config)
    directory = os.path.join(workdir, "checkpoints")
    if step is None:
        step = ocp.CheckpointManager(directory).latest_step() if os.path.isdir(directory) else None
        if step is None:
            raise ValueError(f"{workdir!r} has no complete checkpoint yet.")
    params = restore_raw(directory, step)
    key = objective.encoder_keys[0]
    expected = jax.eval_shape(objective.init, jax.random.key(0))[key]
    check_shapes(params.get(key, {}), expected, f"checkpoint {directory}/{step}")
    return PretrainedEncoder(module=objective.encoder, params=params[key], config=config,
                             step=step, objective=objective.name)


def check_shapes(params, expected, what: str) -> None:
    """Raises ValueError naming every parameter missing, unexpected or of another shape."""
    from flax import traverse_util
    got = traverse_util.flatten_dict(params, sep="/")
    want = traverse_util.flatten_dict(expected, sep="/")
    problems = [f"{k} missing" for k in sorted(set(want) - set(got))]
    problems += [f"{k} unexpected" for k in sorted(set(got) - set(want))]
    problems += [f"{k} {tuple(np.shape(got[k]))} != {tuple(want[k].shape)}"
                 for k in sorted(set(got) & set(want)) if np.shape(got[k]) != tuple(want[k].shape)]
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))
