"""A config file named on a command line: 'configs/spark.py:model=resnet50' -> its config."""
from __future__ import annotations

import importlib.util
import os


def load_config(spec: str, flag: str = "--config"):
    """'configs/spark.py:model=resnet50' -> that file's get_config('model=resnet50'). Fields
    may follow, each after a '+': 'configs/mae.py:quickstart+model.remat=full' (one config two
    ways). `flag` names the command-line flag in error messages."""
    spec, *fields = spec.split("+")
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}={spec!r}: {path!r} is not a config file.")
    module_spec = importlib.util.spec_from_file_location(
        f"mim_jax_config_{abs(hash(spec))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for field in fields:
        name, sep, text = field.partition("=")
        *parents, leaf = name.split(".")
        node = config
        try:
            for key in parents:
                node = node[key]
            node[leaf]  # the field must exist
        except (KeyError, AttributeError):
            raise ValueError(f"{flag}: {name!r} is not a field of {path}.") from None
        if not sep:
            raise ValueError(f"{flag}: {field!r} is not FIELD=VALUE.")
        node[leaf] = _value(text)
    return config


def _value(text: str):
    """A field value from text: int, float, True / False / None, or the string itself."""
    special = {"True": True, "true": True, "False": False, "false": False, "None": None}
    if text in special:
        return special[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
