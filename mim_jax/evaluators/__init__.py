"""Evaluators run by the trainer every N steps, chosen by config.evaluators.NAME blocks.

Each block has a `type` (defaults to its NAME): 'reconstruction' (images + masked-region error
against the best constant guess), 'knn' or 'linear_probe' (frozen-encoder accuracy on a
labelled split), 'classification' (top-1 / top-5 of a fine-tuned classifier, best kept).
Results go to the same metric writers as the training scalars. The period is `every_steps`, or
`every_epochs` when that is > 0.
"""
from __future__ import annotations

from mim_jax.evaluators import representation
from mim_jax.evaluators.classification import ClassificationEvaluator
from mim_jax.evaluators.reconstruction import ReconstructionEvaluator

_EVALUATORS = {"reconstruction": ReconstructionEvaluator,
               "classification": ClassificationEvaluator,
               "knn": representation.FrozenFeatureEvaluator,
               "linear_probe": representation.FrozenFeatureEvaluator}


def names():
    return sorted(_EVALUATORS)


def evaluator_type(name: str, cfg) -> str:
    return cfg.get("type") or name


def validate(config) -> None:
    for name, cfg in config.get("evaluators", {}).items():
        kind = evaluator_type(name, cfg)
        if kind not in _EVALUATORS:
            raise ValueError(f"evaluators.{name}.type={kind!r} is not a known evaluator; "
                             f"allowed: {names()}.")
        every, epochs = cfg.get("every_steps"), cfg.get("every_epochs") or 0
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs < 0:
            raise ValueError(f"evaluators.{name}.every_epochs={epochs!r} must be a number >= 0 "
                             "(0 = use every_steps).")
        if not epochs and (not isinstance(every, int) or every <= 0):
            raise ValueError(f"evaluators.{name}.every_steps={every!r} must be a positive "
                             "integer.")
        if kind == "reconstruction":
            num = cfg.get("num_images")
            if not isinstance(num, int) or num <= 0:
                raise ValueError(f"evaluators.{name}.num_images={num!r} must be a positive "
                                 "integer.")
        elif kind != "classification":
            representation.validate(name, cfg, kind)


def every_steps(cfg, steps_per_epoch: int) -> int:
    """Evaluation period in steps: every_epochs (if set > 0) wins over every_steps."""
    epochs = cfg.get("every_epochs") or 0
    return max(1, int(round(epochs * steps_per_epoch))) if epochs > 0 else cfg.every_steps


def create(config, objective, mesh, workdir, writers, rng, steps_per_epoch: int = 1):
    """The evaluators of config.evaluators; each has maybe_run(step, state, force)."""
    out = []
    for name, cfg in config.get("evaluators", {}).items():
        kind = evaluator_type(name, cfg)
        ev = _EVALUATORS[kind](config, cfg, objective, mesh, workdir, writers, rng,
                               name=name, kind=kind)
        ev.every_steps = every_steps(cfg, steps_per_epoch)
        out.append(ev)
    return out
