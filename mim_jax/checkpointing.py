"""Orbax CheckpointManager wrapper: periodic async saves, keep-last-K, auto-resume.

Orbax writes each step into a temporary directory and renames it only once every host has
finished, so a checkpoint interrupted mid-write is never listed, and so never restored.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1000,
                 asynchronous: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1.")
        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps={every_steps} must be >= 1.")
        self.every_steps = every_steps
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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
