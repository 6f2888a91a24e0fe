"""Registry of MIM objectives: config.objective.name -> builder(config) -> Objective."""
from __future__ import annotations

from typing import Callable, Dict

from mim_jax.objectives.base import Objective, RNG_STREAMS, make_rngs
from mim_jax.objectives import beit, mae, simmim, spark, vqkd

_BUILDERS: Dict[str, Callable[..., Objective]] = {
    "beit": beit.build,
    "mae": mae.build,
    "simmim": simmim.build,
    "spark": spark.build,
    "vqkd": vqkd.build,
}


def names():
    return sorted(_BUILDERS)


def build(config) -> Objective:
    """Builds the objective named by config.objective.name from the whole experiment config."""
    name = config.objective.name
    if name not in _BUILDERS:
        raise ValueError(f"objective.name={name!r} is not a known objective; allowed: {names()}.")
    return _BUILDERS[name](config)


__all__ = ["Objective", "RNG_STREAMS", "build", "make_rngs", "names"]
