"""timm without torchvision, for the tests that build timm models.

timm's package __init__ imports torchvision (transforms, datasets, FrozenBatchNorm2d) that the
models the tests build never use; torchvision's PyPI wheels need a CUDA build of torch. Without
torchvision, timm is imported against a stand-in whose every name is a class that raises when
used, and the stand-in is removed right after, so nothing else (e.g. transformers' torchvision
detection) ever sees it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types


class _Unavailable(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision is not installed ({cls.__name__} was used)")


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def import_timm():
    """The timm package (with every model module), using the torchvision stand-in only when
    torchvision is missing."""
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("torchvision"):
            raise
    for name in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
        del sys.modules[name]  # a half-imported timm must be imported again
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        for name in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
            del sys.modules[name]
