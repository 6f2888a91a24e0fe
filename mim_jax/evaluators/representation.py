"""kNN and linear-probe accuracy of the encoder being pretrained, on a labelled dataset.

Config (config.evaluators.NAME):
  type: 'knn' | 'linear_probe'
  every_steps: how often (and always at the end of training)
  train_split / eval_split: labelled splits of config.data (defaults: data.split / eval_split)
  max_train_examples / max_eval_examples: caps (0 = the whole split)
  pool: 'cls' | 'gap' features; batch_size: extraction batch
  k, temperature (knn)
  l2_grid, val_fraction, max_iter (linear_probe: see evaluators/probe.py)
"""
from __future__ import annotations

import time

import jax
from absl import logging

from mim_jax.evaluators import features, knn, probe
from mim_jax.evaluators.schedule import Periodic

TYPES = ("knn", "linear_probe")


def validate(name: str, cfg, kind: str) -> None:
    batch = cfg.get("batch_size", 256)
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"evaluators.{name}.batch_size={batch!r} must be a positive integer.")
    pool = cfg.get("pool", "gap")
    if pool not in ("gap", "cls"):
        raise ValueError(f"evaluators.{name}.pool={pool!r}; allowed: ['cls', 'gap'].")
    if kind == "knn":
        k, t = cfg.get("k", 20), cfg.get("temperature", 0.07)
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"evaluators.{name}.k={k!r} must be a positive integer.")
        if not t > 0:
            raise ValueError(f"evaluators.{name}.temperature={t!r} must be > 0.")
    else:
        grid = cfg.get("l2_grid", probe.DEFAULT_L2_GRID)
        if (not isinstance(grid, (list, tuple)) or not grid
                or not all(isinstance(v, (int, float)) and v > 0 for v in grid)):
            raise ValueError(f"evaluators.{name}.l2_grid={grid!r} must be a non-empty list of "
                             "numbers > 0.")
        fraction = cfg.get("val_fraction", 0.2)
        if not isinstance(fraction, float) or not 0 < fraction < 1:
            raise ValueError(f"evaluators.{name}.val_fraction={fraction!r} must be a number "
                             "in (0, 1).")
        iters = cfg.get("max_iter", 1000)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
            raise ValueError(f"evaluators.{name}.max_iter={iters!r} must be a positive "
                             "integer.")


def evaluate_features(kind: str, train, test, cfg) -> dict:
    """{'top1': accuracy in [0, 1]} of kNN, plus the chosen 'l2' for the linear probe."""
    (train_x, train_y), (test_x, test_y) = train, test
    if kind == "knn":
        return {"top1": knn.knn_accuracy(train_x, train_y, test_x, test_y, k=cfg.get("k", 20),
                                         temperature=cfg.get("temperature", 0.07))}
    result = probe.linear_probe(train_x, train_y, test_x, test_y,
                                l2_grid=tuple(cfg.get("l2_grid", probe.DEFAULT_L2_GRID)),
                                val_fraction=cfg.get("val_fraction", 0.2),
                                max_iter=cfg.get("max_iter", 1000))
    return {"top1": result.accuracy, "l2": result.l2}


class _FeatureCache:
    """Features of the current step, shared by the kNN and probe evaluators (one extraction)."""

    def __init__(self):
        self.owner, self.entries = None, {}

    def get(self, params, batch_stats, key, compute):
        # The cache belongs to one parameter tree and its BatchNorm statistics (held, so their
        # identities cannot be reused).
        if (self.owner is None or self.owner[0] is not params
                or self.owner[1] is not batch_stats):
            self.owner, self.entries = (params, batch_stats), {}
        if key not in self.entries:
            self.entries[key] = compute()
        return self.entries[key]


_CACHE = _FeatureCache()


class FrozenFeatureEvaluator(Periodic):
    NEEDS = ("labels",)

    def __init__(self, config, eval_cfg, objective, mesh, workdir, writers, rng, *, name: str,
                 kind: str):
        del workdir, rng
        self.name, self.kind = name, kind
        self.cfg = eval_cfg
        self.data_cfg = config.data
        self.writers = writers
        self.mesh = mesh
        self.encoder_key = objective.encoder_keys[0]
        self.feature_fn = features.make_feature_fn(objective.encoder, eval_cfg.get("pool", "gap"),
                                                   mesh, config.data)

    def maybe_run(self, step: int, state, force: bool = False):
        if self.is_due(step, force):
            return self.run(step, state.params, state.model_state)
        return None

    def _features(self, params, batch_stats, split, max_examples):
        pool = self.cfg.get("pool", "gap")
        return _CACHE.get(params, batch_stats, (pool, split, max_examples),
                          lambda: features.extract(
                              self.feature_fn, params, self.data_cfg, split,
                              batch_size=self.cfg.get("batch_size", 256), mesh=self.mesh,
                              max_examples=max_examples or None, batch_stats=batch_stats))

    def run(self, step: int, params, model_state=None) -> float:
        start = time.perf_counter()
        enc = params[self.encoder_key]
        stats = features.encoder_batch_stats(model_state, self.encoder_key)
        train = self._features(enc, stats, self.cfg.get("train_split") or self.data_cfg.split,
                               self.cfg.get("max_train_examples", 0))
        test = self._features(enc, stats, self.cfg.get("eval_split") or self.data_cfg.eval_split,
                              self.cfg.get("max_eval_examples", 0))
        result = evaluate_features(self.kind, train, test, self.cfg)
        acc = result["top1"]
        if jax.process_index() == 0:
            self.writers.write_scalars(step, {f"{self.name}/{k}": v for k, v in result.items()})
            chosen = f", l2 {result['l2']:.0e}" if "l2" in result else ""
            logging.info("step %d: %s top-1 %.2f%% (%d train / %d eval examples%s, %.1fs)",
                         step, self.name, 100 * acc, len(train[1]), len(test[1]), chosen,
                         time.perf_counter() - start)
        return acc
