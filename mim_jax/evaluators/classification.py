"""Top-1 / top-5 of a fine-tuned or probed classifier on the validation split; keeps the best.

Config (config.evaluators.NAME, type 'classification'): every_epochs (or every_steps),
split (default data.eval_split), batch_size, max_examples (0 = all). With an EMA of the
weights both are evaluated (`ema_top1` ...). The best weights so far (by top-1, EMA included)
are saved to workdir/best/ with best.json beside them; a resumed run continues that record.
"""
from __future__ import annotations

import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from mim_jax import checkpointing, data, paths, sharding
from mim_jax.evaluators.schedule import Periodic
from mim_jax.objectives import make_rngs


def top_k_correct(logits, labels, valid, k: int):
    """Number of valid rows whose label is among the k highest logits."""
    top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
    hit = jnp.any(top == labels[:, None], axis=-1)
    return jnp.sum(hit & valid)


def make_predict(objective, mesh, data_cfg):
    """jitted (params, model_state, batch) -> [top-1 hits, top-5 hits, summed loss, valid rows];
    batch['image'] (uint8 from data.eval_batches) is normalised inside with `data_cfg`."""

    def predict(params, model_state, batch):
        rngs = make_rngs(jax.random.key(0))
        images = data.normalize_images(batch["image"], data_cfg)
        _, aux = objective.loss_fn(params, model_state,
                                   {"image": images, "label": batch["label"]}, rngs, False,
                                   with_outputs=True)
        logits, labels, valid = aux["outputs"]["logits"], batch["label"], batch["valid"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.stack([top_k_correct(logits, labels, valid, 1),
                          top_k_correct(logits, labels, valid, 5),
                          jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)]).astype(
                              jnp.float32)
    return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def evaluate_classifier(objective, params, model_state, data_cfg, split: str, *,
                        batch_size: int, mesh, max_examples: Optional[int] = None,
                        predict=None) -> dict:
    """top-1 / top-5 (in [0, 1]) and the loss of the classifier on `split`."""
    if predict is None:
        predict = make_predict(objective, mesh, data_cfg)
    totals = np.zeros(4)
    for batch in data.eval_batches(data_cfg, split, global_batch_size=batch_size,
                                   max_examples=max_examples):
        batch = sharding.global_batch(batch, mesh)
        totals += np.asarray(jax.device_get(predict(params, model_state, batch)))
    n = max(totals[3], 1.0)
    return {"top1": totals[0] / n, "top5": totals[1] / n, "loss": totals[2] / n,
            "examples": int(totals[3])}


class ClassificationEvaluator(Periodic):
    NEEDS = ("labels",)

    def __init__(self, config, eval_cfg, objective, mesh, workdir, writers, rng, *, name: str,
                 kind: str):
        del rng, kind
        self.name = name
        self.cfg = eval_cfg
        self.data_cfg = config.data
        self.objective = objective
        self.mesh = mesh
        self.writers = writers
        self.is_main = jax.process_index() == 0
        self.predict = make_predict(objective, mesh, config.data)
        self.best_dir = epath.Path(workdir) / "best"
        self.best_json = epath.Path(workdir) / "best.json"
        self.best = self._read_best()

    def _read_best(self) -> dict:
        if self.best_json.is_file():
            return json.loads(self.best_json.read_text())
        return {"top1": -1.0}

    def maybe_run(self, step: int, state, force: bool = False):
        if self.is_due(step, force):
            return self.run(step, state)
        return None

    def _evaluate(self, params, model_state) -> dict:
        return evaluate_classifier(
            self.objective, params, model_state, self.data_cfg,
            self.cfg.get("split") or self.data_cfg.eval_split,
            batch_size=self.cfg.get("batch_size", 256), mesh=self.mesh,
            max_examples=self.cfg.get("max_examples") or None, predict=self.predict)

    def run(self, step: int, state) -> dict:
        results = {"": (self._evaluate(state.params, state.model_state), state.params)}
        if state.ema_params is not None:
            results["ema_"] = (self._evaluate(state.ema_params, state.model_state),
                               state.ema_params)
        scalars = {f"{self.name}/{prefix}{k}": v for prefix, (m, _) in results.items()
                   for k, v in m.items() if k != "examples"}
        prefix, (metrics, params) = max(results.items(), key=lambda kv: kv[1][0]["top1"])
        if metrics["top1"] > self.best["top1"]:
            self._save_best(step, prefix, metrics, params, state.model_state)
        scalars[f"{self.name}/best_top1"] = self.best["top1"]
        if self.is_main:
            self.writers.write_scalars(step, scalars)
            main = results[""][0]
            logging.info("step %d: %s top-1 %.2f%%, top-5 %.2f%% on %d examples%s (best %.2f%% "
                         "at step %d)", step, self.name, 100 * main["top1"], 100 * main["top5"],
                         main["examples"],
                         f"; EMA top-1 {100 * results['ema_'][0]['top1']:.2f}%"
                         if "ema_" in results else "",
                         100 * self.best["top1"], self.best["step"])
        return {k.split("/", 1)[1]: v for k, v in scalars.items()}

    def _save_best(self, step, prefix, metrics, params, model_state):
        ckpt = checkpointing.Checkpointer(self.best_dir.parent, keep=1,
                                          asynchronous=False, subdir="best")
        ckpt.maybe_save(step, {"params": params, "model_state": model_state}, force=True)
        ckpt.close()
        self.best = dict(top1=float(metrics["top1"]), top5=float(metrics["top5"]), step=int(step),
                         weights="ema" if prefix else "online")
        if self.is_main:
            paths.write_whole(self.best_json, json.dumps(self.best, indent=2))
