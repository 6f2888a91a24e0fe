"""Evaluators run by the trainer every N steps, chosen by config.evaluators.NAME blocks."""
from __future__ import annotations

from mim_jax.evaluators.reconstruction import ReconstructionEvaluator

_EVALUATORS = {"reconstruction": ReconstructionEvaluator}


def names():
    return sorted(_EVALUATORS)


def validate(config) -> None:
    for name, cfg in config.get("evaluators", {}).items():
        if name not in _EVALUATORS:
            raise ValueError(f"evaluators.{name} is not a known evaluator; allowed: {names()}.")
        if cfg.every_steps <= 0:
            raise ValueError(f"evaluators.{name}.every_steps={cfg.every_steps} must be > 0.")


def create(config, objective, mesh, workdir, writers, rng):
    return [_EVALUATORS[name](config, cfg, objective, mesh, workdir, writers, rng)
            for name, cfg in config.get("evaluators", {}).items()]
