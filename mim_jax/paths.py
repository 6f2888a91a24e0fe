"""Paths to local files and to objects in a bucket (gs://BUCKET/KEY) alike.

Every file a run reads or writes goes through etils.epath.Path, the path type orbax and TFDS
use, so a workdir, a pretrained run, a weights file or an image folder may be either. An object
store is not a filesystem, and the few places where that matters ask is_local():
  * an object is written whole (it appears complete or not at all): nothing needs the
    write-then-rename that keeps a local reader from seeing a half-written file;
  * there is no append, no hard link, no exclusive create and no free-space figure.
"""
from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
    """False for a URL (gs://, s3://, ...), True for a filesystem path."""
    return "://" not in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """A path from the command line as a run uses it: a local one made absolute (against the
    working directory), a URL unchanged (os.path.abspath would turn gs://b/run into
    ./gs:/b/run)."""
    path = os.fspath(path)
    return epath.Path(os.path.abspath(path) if is_local(path) else path)


def write_whole(path: PathLike, data: Union[str, bytes]) -> None:
    """Writes `data` so that no reader ever sees it half-written: a local file through a
    temporary file renamed over `path`, an object directly (its write is all-or-nothing)."""
    path = epath.Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    target = path if not is_local(path) else path.with_name(path.name + ".tmp")
    with target.open(mode) as f:
        f.write(data)
    if target != path:
        target.replace(path)
