"""Reconstruction images: original | masked | reconstruction | reconstruction + visible.

Runs the objective on a fixed set of evaluation images with a fixed mask, so successive image
grids show the same inputs and the same mask getting better. Written to TensorBoard and as PNG
files in workdir/reconstructions/.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from mim_jax import data, sharding
from mim_jax.objectives import make_rngs

_MIN_TILE = 112  # small images (e.g. 28 px digits) are upscaled so the grid is readable
_MASKED_GRAY = 0.5


def image_grid(original, reconstruction, mask):
    """[N,H,W,C] in [0,1] + [N,H,W,1] mask (1 = masked) -> uint8 grid [N*H', 4*W', 3]."""
    masked = original * (1 - mask) + _MASKED_GRAY * mask
    pasted = original * (1 - mask) + reconstruction * mask
    cols = [original, masked, reconstruction, pasted]
    grid = np.concatenate([np.concatenate(list(c), axis=0) for c in cols], axis=1)
    grid = np.clip(grid, 0.0, 1.0)
    if grid.shape[-1] == 1:
        grid = np.repeat(grid, 3, axis=-1)
    scale = max(1, -(-_MIN_TILE // original.shape[1]))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return (grid * 255).round().astype(np.uint8)


class ReconstructionEvaluator:
    def __init__(self, config, eval_cfg, objective, mesh, workdir, writers, rng):
        self.every_steps = eval_cfg.every_steps
        self.data_cfg = config.data
        self.writers = writers
        self.outdir = os.path.join(workdir, "reconstructions")
        self.is_main = jax.process_index() == 0
        self.images = None
        self.num_images = eval_cfg.num_images
        self.mesh = mesh
        rngs = make_rngs(rng)
        repl = sharding.replicated(mesh)

        def outputs(params, images):
            _, aux = objective.loss_fn(params, {"image": images}, rngs, False, with_outputs=True)
            return aux.get("outputs")
        self._outputs = jax.jit(outputs, out_shardings=repl)

    def maybe_run(self, step: int, params, force: bool = False):
        if force or step % self.every_steps == 0:
            self.run(step, params)

    def run(self, step: int, params):
        if self.images is None:
            # Every process loads the same images: the jitted call spans all devices.
            local = data.fixed_eval_images(self.data_cfg, self.num_images)
            self.images = jax.device_put(local, sharding.replicated(self.mesh))
        out = self._outputs(params, self.images)
        if out is None or "reconstruction" not in out:
            logging.warning("This objective produces no pixel reconstruction; skipping images.")
            return
        if not self.is_main:
            return
        original = data.denormalize(np.asarray(self.images), self.data_cfg)
        recon = data.denormalize(np.asarray(out["reconstruction"]), self.data_cfg)
        grid = image_grid(original, recon, np.asarray(out["mask"]))
        os.makedirs(self.outdir, exist_ok=True)
        path = os.path.join(self.outdir, f"step_{step:07d}.png")
        from PIL import Image  # pillow is a core dependency; imported lazily to keep start fast
        Image.fromarray(grid).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)  # never leave a half-written PNG behind
        self.writers.write_images(step, {"reconstruction": grid[None]})
        logging.info("Wrote reconstruction images to %s", path)
