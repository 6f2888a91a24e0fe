"""Evaluators run by the trainer every N steps, chosen by config.evaluators.NAME blocks.

Each block has a `type` (defaults to its NAME): 'reconstruction' (images + masked-region error
against the best constant guess), 'knn' or 'linear_probe' (frozen-encoder accuracy on a
labelled split), 'classification' (top-1 / top-5 of a fine-tuned classifier, best kept).
Results go to the same metric writers as the training scalars. The period is `every_steps`, or
`every_epochs` when that is > 0; both 0 turn the evaluator off
(`--config.evaluators.NAME.every_steps=0`).
"""
from __future__ import annotations

from mim_jax import data
from mim_jax.errors import ConfigError
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


def is_on(cfg) -> bool:
    return bool(cfg.get("every_steps") or cfg.get("every_epochs"))


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
        if not epochs and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ValueError(f"evaluators.{name}.every_steps={every!r} must be an integer >= 0 "
                             "(0 and every_epochs=0: off).")
        if kind == "reconstruction":
            num = cfg.get("num_images")
            if not isinstance(num, int) or num <= 0:
                raise ValueError(f"evaluators.{name}.num_images={num!r} must be a positive "
                                 "integer.")
        elif kind != "classification":
            representation.validate(name, cfg, kind)


def _splits(kind: str, cfg, data_cfg):
    """(field, split) of every split the evaluator reads; the field names where it was set."""
    def pick(field, fallback):
        return ((field, cfg[field]) if cfg.get(field) else
                (f"{field} (from data.{fallback})", data_cfg.get(fallback)))
    if kind == "reconstruction":
        return [("images (from data.eval_split)", data_cfg.get("eval_split") or data_cfg.split)]
    if kind == "classification":
        return [pick("split", "eval_split")]
    return [pick("train_split", "split"), pick("eval_split", "eval_split")]


def check_needs(config, objective) -> None:
    """Raises ConfigError for an evaluator that is on but whose splits do not exist or whose
    needs (its class's NEEDS) the data or the objective cannot meet: labels from an unlabelled
    folder, pixels from an objective that predicts tokens. Reads the dataset's metadata or file
    list, no images."""
    missing = {}

    def why_not(need: str):
        if need not in missing:
            if need == "labels":
                missing[need] = data.missing_labels(config.data)
            else:
                missing[need] = (None if objective.predicts_pixels else
                                 f"objective {objective.name!r} does not predict pixels")
        return missing[need]

    for name, cfg in config.get("evaluators", {}).items():
        if not is_on(cfg):
            continue
        kind = evaluator_type(name, cfg)
        for field, split in _splits(kind, cfg, config.data):
            reason = data.missing_split(config.data, split) if split else "no split is set"
            if reason:
                raise ConfigError(f"evaluators.{name}.{field}: {reason}.")
        for need in _EVALUATORS[kind].NEEDS:
            reason = why_not(need)
            if reason:
                raise ConfigError(
                    f"evaluators.{name} ({kind}) needs {need}, but {reason}. Turn it off with "
                    f"--config.evaluators.{name}.every_steps=0.")


def every_steps(cfg, steps_per_epoch: int) -> int:
    """Evaluation period in steps: every_epochs (if set > 0) wins over every_steps."""
    epochs = cfg.get("every_epochs") or 0
    return max(1, int(round(epochs * steps_per_epoch))) if epochs > 0 else cfg.every_steps


def create(config, objective, mesh, workdir, writers, rng, steps_per_epoch: int = 1):
    """The evaluators of config.evaluators; each has maybe_run(step, state, force)."""
    out = []
    for name, cfg in config.get("evaluators", {}).items():
        if not is_on(cfg):
            continue
        kind = evaluator_type(name, cfg)
        ev = _EVALUATORS[kind](config, cfg, objective, mesh, workdir, writers, rng,
                               name=name, kind=kind)
        ev.every_steps = every_steps(cfg, steps_per_epoch)
        out.append(ev)
    return out
