"""Registry of objectives: config.objective.name -> the module of that method, or, for a config
with a finetune block, the classifier (fine-tuning / linear probing).

A method's module has build(config) -> Objective. One that runs frozen weights (a tokenizer, a
teacher, a pretrained encoder) declares them with needs(config) -> {name: Frozen} and takes
them resolved, build(config, frozen); mim_jax.pretrained.build_objective resolves them."""
from __future__ import annotations

import dataclasses

from mim_jax.objectives import beit, beit3, classification, mae, simmim, spark, vqkd
from mim_jax.objectives.base import Frozen, FrozenEncoder, Objective, RNG_STREAMS, make_rngs

_METHODS = {"beit": beit, "beit3": beit3, "mae": mae, "simmim": simmim, "spark": spark,
            "vqkd": vqkd}


def names():
    return sorted(_METHODS)


def _method(config):
    if config.get("finetune") is not None:
        return classification
    name = config.objective.name
    if name not in _METHODS:
        raise ValueError(f"objective.name={name!r} is not a known objective; allowed: {names()}.")
    return _METHODS[name]


def build(config, resolve=None) -> Objective:
    """Builds the objective a whole experiment config describes. `resolve(Frozen) -> part`
    gives the module of each frozen part it declares (mim_jax.pretrained.build_objective)."""
    method = _method(config)
    needs = method.needs(config) if hasattr(method, "needs") else {}
    if not needs:
        return method.build(config)
    if resolve is None:
        raise ValueError(f"{method.__name__} runs frozen weights ({', '.join(needs)}): build it "
                         "with mim_jax.pretrained.build_objective.")
    frozen = {name: dataclasses.replace(need, part=resolve(need)) for name, need in needs.items()}
    return dataclasses.replace(method.build(config, frozen), frozen=frozen)


__all__ = ["Frozen", "FrozenEncoder", "Objective", "RNG_STREAMS", "build", "make_rngs", "names"]
