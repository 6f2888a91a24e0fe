"""Reconstruction images and masked-region error against the best constant guess.

Runs the objective on a fixed set of evaluation images with a fixed mask, so successive image
grids show the same inputs and the same mask getting better. Written to TensorBoard and as PNG
files in workdir/reconstructions/.

It also reports the error the loss measures (MSE or L1 on the masked region, in the loss's
own target space) next to the error of the best constant prediction - the per-element mean
(MSE) or median (L1) of the targets of training images, i.e. the mean image or the background.
A run stuck at that trivial solution shows `masked_error_ratio` near 1.
"""
from __future__ import annotations

import io

import jax
import numpy as np
from absl import logging
from etils import epath

from mim_jax import data, paths, sharding
from mim_jax.evaluators.schedule import Periodic
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


def masked_error(prediction, target, mask, metric: str) -> float:
    """Mean over masked elements of (prediction - target)^2 ('mse') or |.| ('l1')."""
    diff = np.asarray(prediction, np.float64) - np.asarray(target, np.float64)
    diff = np.square(diff) if metric == "mse" else np.abs(diff)
    weight = np.broadcast_to(np.asarray(mask, np.float64), diff.shape)
    return float((diff * weight).sum() / max(weight.sum(), 1.0))


def best_constant(targets, metric: str) -> np.ndarray:
    """The constant prediction that minimises the error over `targets` [N, ...]."""
    targets = np.asarray(targets, np.float64)
    return targets.mean(0) if metric == "mse" else np.median(targets, axis=0)


class ReconstructionEvaluator(Periodic):
    NEEDS = ("pixels",)

    def __init__(self, config, eval_cfg, objective, mesh, workdir, writers, rng, *,
                 name: str = "reconstruction", kind: str = "reconstruction"):
        del name, kind  # one reconstruction evaluator per run; its scalars are unprefixed
        self.data_cfg = config.data
        self.writers = writers
        self.outdir = epath.Path(workdir) / "reconstructions"
        self.is_main = jax.process_index() == 0
        self.images = None
        self.constant = None
        self.num_images = eval_cfg.num_images
        self.error_images = eval_cfg.get("error_images", 256)
        self.metric = objective.error_metric
        self.mesh = mesh
        # Read now, before the train step compiles: a dataset without enough decodable images
        # stops the run at start-up. A small folder gives fewer error images.
        n = max(self.num_images, self.error_images)
        self._eval_images = data.fixed_eval_images(self.data_cfg, n, minimum=self.num_images)
        self._train_images = None
        if self.error_images:
            # The best constant comes from training images (the split the model learns from).
            train_cfg = self.data_cfg.copy_and_resolve_references()
            with train_cfg.unlocked():
                train_cfg.eval_split = self.data_cfg.split
            self._train_images = data.fixed_eval_images(train_cfg, n, minimum=1)
        rngs = make_rngs(rng)
        repl = sharding.replicated(mesh)

        data_cfg = self.data_cfg

        def outputs(params, images, model_state):
            # uint8 from data.fixed_eval_images, normalised on the device.
            images = data.normalize_images(images, data_cfg)
            _, aux = objective.loss_fn(params, model_state, {"image": images}, rngs, False,
                                       with_outputs=True)
            return aux.get("outputs")
        self._outputs = jax.jit(outputs, out_shardings=repl)

    def maybe_run(self, step: int, state, force: bool = False):
        if self.is_due(step, force):
            return self.run(step, state.params, state.model_state)
        return None

    def _load(self, params, model_state):
        # Every process holds the same images: the jitted call spans all devices.
        repl = sharding.replicated(self.mesh)
        self.images = jax.device_put(self._eval_images, repl)
        if self._train_images is not None:
            out = self._outputs(params, jax.device_put(self._train_images, repl), model_state)
            if out is not None and "target" in out:
                self.constant = best_constant(out["target"], self.metric)

    def errors(self, out) -> dict:
        """Masked-region error of the model and of the best constant, and their ratio."""
        if self.constant is None or "target" not in out:
            return {}
        n = self.error_images
        target, mask = np.asarray(out["target"])[:n], np.asarray(out["loss_mask"])[:n]
        model = masked_error(np.asarray(out["prediction"])[:n], target, mask, self.metric)
        constant = masked_error(np.broadcast_to(self.constant, target.shape), target, mask,
                                self.metric)
        return {"masked_error": model, "masked_error_constant": constant,
                "masked_error_ratio": model / max(constant, 1e-12)}

    def run(self, step: int, params, model_state=None):
        """`model_state`: the objective's (e.g. BatchNorm statistics; None = {})."""
        model_state = {} if model_state is None else model_state
        if self.images is None:
            self._load(params, model_state)
        out = self._outputs(params, self.images, model_state)
        if out is None or "reconstruction" not in out:
            logging.warning("This objective produces no pixel reconstruction; skipping images.")
            return {}
        errors = self.errors(out)
        if not self.is_main:
            return errors
        if errors:
            self.writers.write_scalars(step, errors)
            logging.info("step %d: masked %s %.4f vs %.4f for the best constant guess "
                         "(ratio %.3f)", step, self.metric, errors["masked_error"],
                         errors["masked_error_constant"], errors["masked_error_ratio"])
        k = self.num_images
        original = data.denormalize(np.asarray(self.images)[:k], self.data_cfg)
        recon = data.denormalize(np.asarray(out["reconstruction"])[:k], self.data_cfg)
        grid = image_grid(original, recon, np.asarray(out["mask"])[:k])
        self.outdir.mkdir(parents=True, exist_ok=True)
        path = self.outdir / f"step_{step:07d}.png"
        from PIL import Image  # pillow is a core dependency; imported lazily to keep start fast
        png = io.BytesIO()
        Image.fromarray(grid).save(png, format="PNG")
        paths.write_whole(path, png.getvalue())  # never leave a half-written PNG behind
        self.writers.write_images(step, {"reconstruction": grid[None]})
        logging.info("Wrote reconstruction images to %s", path)
        return errors
