"""A stand-in for Google Cloud Storage: gs://BUCKET/KEY is ROOT/BUCKET/KEY on the local disk.

A run reaches a bucket three ways, and install() maps each of them to the same local folder:
  * etils.epath (mim_jax's own files, orbax's directories and metadata): its gs:// backend is
    replaced with epath's own testing mock (etils.epath.testing.mock_epath) over the local
    filesystem. epath picks TensorFlow's GCS filesystem, which the mock does not replace,
    whenever TensorFlow is installed, so EPATH_USE_TF=false is set while the fake is in place;
  * tensorstore (orbax's array data), which talks to GCS itself: orbax's kvstore spec for a
    gs:// path is built on the 'file' driver at the mapped folder instead of the 'gcs' one;
  * TensorFlow (clu's TensorBoard files): the writer is created at the mapped folder.
Like a bucket, the fake refuses to append to an object and replaces an object whole: a write
goes to a file of its own and is renamed into place when it closes, so concurrent writers never
leave a mix of their records (the lock's last-writer-wins relies on this). Orbax still sees gs:// paths and takes
its GCS code paths: a step is finished by a commit_success.txt file, not by a rename;
deletions go through its GCS rmtree. Its question whether the bucket has a hierarchical
namespace (asked through the Cloud Storage client) is answered "no", as for an ordinary
bucket.

What this cannot show is real GCS behaviour: a rename that copies and deletes object by object,
request failures and retries, latency, credentials and permissions, hierarchical-namespace
buckets, the timing of concurrent writers (the lock's last-writer-wins), and TensorFlow reading
a gs:// image folder (tf.io.read_file goes through TensorFlow's own GCS filesystem, which is not
mapped).

    python tests/gcs_fake.py ROOT MODULE [ARGS...]

runs `python -m MODULE ARGS...` with the fake installed (for runs that tests signal or race).
"""
from __future__ import annotations

import contextlib
import os
import sys
import uuid
from unittest import mock

from etils.epath import gpath, testing

PREFIX = "gs://"


@contextlib.contextmanager
def install(root):
    """gs://BUCKET/KEY <-> `root`/BUCKET/KEY for epath, orbax's tensorstore specs and clu."""
    root = os.path.abspath(os.fspath(root))

    def local(path):
        text = os.fspath(path)
        return os.path.join(root, text[len(PREFIX):]) if text.startswith(PREFIX) else text

    def remote(path, like):
        """A local result path back under gs:// when the call was about a gs:// path."""
        text = os.fspath(path)
        if not os.fspath(like).startswith(PREFIX):
            return text
        return PREFIX + os.path.relpath(text, root)

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    uploads = os.path.join(root, ".uploads")  # outside every bucket, on the same disk

    def open_(original, path, mode):
        if os.fspath(path).startswith(PREFIX):
            if "a" in mode:
                raise OSError(f"{path}: an object store cannot append")
            if "w" in mode:  # an object needs no folder above it
                os.makedirs(os.path.dirname(local(path)), exist_ok=True)
                os.makedirs(uploads, exist_ok=True)
                return _Upload(original, os.path.join(uploads, uuid.uuid4().hex),
                               local(path), mode)
        return original(local(path), mode)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    def walk(original, top, **kwargs):
        for folder, dirs, files in original(local(top), **kwargs):
            yield remote(folder, top), dirs, files

    def glob(original, pattern):
        return [remote(p, pattern) for p in original(local(pattern))]

    from orbax.checkpoint._src.path import gcs_utils

    def kvstore(path):
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket, key)}

    from clu import metric_writers
    tensorboard = metric_writers.create_default_writer

    def create_default_writer(logdir, *args, **kwargs):
        return tensorboard(local(logdir), *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, EPATH_USE_TF="false"))
        gpath._is_tf_installed.cache_clear()  # it caches EPATH_USE_TF
        stack.callback(gpath._is_tf_installed.cache_clear)
        stack.enter_context(testing.mock_epath(
            open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
            rmtree=one, stat=one, rename=two, replace=two, copy=two, walk=walk, glob=glob))
        stack.enter_context(mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore))
        stack.enter_context(mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled",
                                              lambda path: False))
        stack.enter_context(mock.patch.object(metric_writers, "create_default_writer",
                                              create_default_writer))
        yield


class _Upload:
    """A file being written as an object: invisible until it closes, then in place whole.
    An upload that fails part-way publishes nothing."""

    def __init__(self, open_file, staging, final, mode):
        self._file = open_file(staging, mode)
        self._staging, self._final = staging, final

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:
            self._file.close()
            os.remove(self._staging)

    def close(self):
        if not self._file.closed:
            self._file.close()
            os.replace(self._staging, self._final)


def _run_module(root, module, args):
    import runpy
    with install(root):
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    # The repository's mim_jax and configs, as `python -m` from its root would import them.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mim_jax.allocator import apply_cpu_policy
    apply_cpu_policy()  # before anything heavy starts threads, as the entry points do
    _run_module(sys.argv[1], sys.argv[2], sys.argv[3:])
