"""Orbax CheckpointManager wrapper: periodic async saves, keep-last-K, verified auto-resume.

Orbax writes each step into a temporary directory and renames it only once every host has
finished, so a checkpoint interrupted mid-write is never listed, and so never restored.
On top of that, every checkpoint carries an integrity fingerprint of its arrays (computed on
device when saving, stored in the step's metadata): a restore recomputes it and also requires
every value to be finite. A checkpoint that cannot be read or fails either check is moved to
WORKDIR/checkpoints_damaged/ with a warning, and the newest good one is restored instead.

The workdir may be a bucket (gs://): orbax reaches it through etils.epath and tensorstore, and on
GCS marks a finished step with a commit_success.txt file instead of renaming it (objects cannot
be renamed atomically); moving a damaged step aside is a copy and delete there.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mim_jax import paths, sharding
from mim_jax.errors import CheckpointError, ConfigError, one_line

FINGERPRINT_KEY = "mim_jax_fingerprint"
def validate_config(cfg) -> None:
    """config.checkpoint: cadence and retention."""
    for field in ("every_steps", "keep"):
        value = cfg.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"checkpoint.{field}={value!r} must be an integer >= 1.")
    if not isinstance(cfg.get("asynchronous", True), bool):
        raise ConfigError(f"checkpoint.asynchronous={cfg.asynchronous!r} must be true or false.")


def _leaf_fingerprint(x):
    """A uint32 checksum of the bits of one array: sum of bits x odd position weights
    (mod 2^32), so flipping any single bit always changes it. Runs on device, sharded."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def _leaf_finite(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.asarray(True)


@jax.jit
def _fingerprint_and_finite(tree):
    return jax.tree.map(_leaf_fingerprint, tree), jax.tree.map(_leaf_finite, tree)


def _by_path(tree) -> dict:
    """{'opt_state/0/mu/encoder/...': leaf}: the same names whether the tree is the live
    TrainState (attributes, tuples) or the nested dicts orbax restores without a target."""
    return {sharding.path_name(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def fingerprint(state) -> dict:
    """{leaf path: uint32 checksum} of a state (host ints); also checks every value is finite
    (a non-finite state must never be saved: raises CheckpointError naming the leaves)."""
    sums, finite = jax.device_get(_fingerprint_and_finite(state))
    bad = [k for k, ok in _by_path(finite).items() if not bool(ok)]
    if bad:
        raise CheckpointError(f"refusing to save a state with non-finite values in {bad[:5]}.")
    return {k: int(v) for k, v in _by_path(sums).items()}


def _verify(state, expected: Optional[dict]) -> Optional[str]:
    """None if `state` is finite and matches the fingerprint `expected`, else the reason."""
    sums, finite = jax.device_get(_fingerprint_and_finite(state))
    bad = [k for k, ok in _by_path(finite).items() if not bool(ok)]
    if bad:
        return f"non-finite values in {', '.join(bad[:3])}"
    if expected is None:
        return None
    got = {k: int(v) for k, v in _by_path(sums).items()}
    wrong = sorted(k for k in got.keys() | expected.keys() if got.get(k) != expected.get(k))
    if wrong:
        return f"integrity fingerprint mismatch in {', '.join(wrong[:3])}"
    return None


def _structure_mismatch(saved_metadata, abstract_state) -> list:
    """Leaves whose saved shape / presence differs from the state the config builds."""
    saved = {k: tuple(getattr(m, "shape", ()) or ()) for k, m in _by_path(saved_metadata).items()}
    want = {k: tuple(s.shape) for k, s in _by_path(abstract_state).items()}
    out = [f"{k} missing" for k in sorted(want.keys() - saved.keys())]
    out += [f"{k} unexpected" for k in sorted(saved.keys() - want.keys())]
    out += [f"{k} {saved[k]} != {want[k]}" for k in sorted(want.keys() & saved.keys())
            if saved[k] != want[k]]
    return out


_BLOCK = re.compile(r"/block_(\d+)/")


def _scan_layout_plan(saved_metadata, abstract_state) -> Optional[dict]:
    """{target leaf: (kind, source, index)} when the saved state differs from the target only
    in the layout of ViT blocks (per-block 'block_i' vs scanned 'blocks' with a leading
    depth axis), else None. Kinds: 'copy' the same leaf, 'stack' the per-block leaves into
    one, 'index' one block out of a stacked leaf."""
    saved = {k: tuple(getattr(m, "shape", ()) or ()) for k, m in _by_path(saved_metadata).items()}
    want = {k: tuple(s.shape) for k, s in _by_path(abstract_state).items()}
    plan, used = {}, set()
    for name, shape in want.items():
        if saved.get(name) == shape:
            plan[name] = ("copy", name, None)
            used.add(name)
        elif "/blocks/" in name and shape:
            head, tail = name.split("/blocks/", 1)
            sources = [f"{head}/block_{i}/{tail}" for i in range(shape[0])]
            if any(saved.get(src) != shape[1:] for src in sources):
                return None
            plan[name] = ("stack", sources, None)
            used.update(sources)
        elif _BLOCK.search(name):
            index = int(_BLOCK.search(name).group(1))
            source = _BLOCK.sub("/blocks/", name, count=1)
            stacked = saved.get(source)
            if stacked is None or stacked[1:] != shape or index >= stacked[0]:
                return None
            plan[name] = ("index", source, index)
            used.add(source)
        else:
            return None
    return plan if used == set(saved) else None


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1000,
                 asynchronous: bool = True, subdir: str = "checkpoints"):
        validate_config(dict(keep=keep, every_steps=every_steps, asynchronous=asynchronous))
        self.every_steps = every_steps
        self.directory = paths.resolve(workdir) / subdir
        self.damaged_directory = self.directory.with_name(subdir + "_damaged")
        self._pending_step = None  # the step of the save that may still be in flight
        self._manager = ocp.CheckpointManager(
            self.directory,
            # Declared up front so item metadata can be read before the first save/restore.
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
                # Partial writes of a failed or killed save take disk space; drop them.
                cleanup_tmp_directories=True))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def _saved_fingerprint(self, step: int) -> Optional[dict]:
        custom = self._manager.metadata(step).custom_metadata or {}
        return custom.get(FINGERPRINT_KEY)

    def _restore_verified(self, abstract_state, step: int, legacy: bool):
        """The state of `step`, or raises _Damaged with the reason."""
        try:
            expected = self._saved_fingerprint(step)
        except Exception as e:  # unreadable step metadata
            raise _Damaged(f"its metadata cannot be read ({_short(e)})") from e
        if expected is None and not legacy:
            raise _Damaged("it has no integrity fingerprint (its metadata is damaged)")
        try:
            saved = _metadata_tree(self._manager.item_metadata(step))
        except Exception as e:
            raise _Damaged(f"its array metadata cannot be read ({_short(e)})") from e
        if saved is None:
            raise _Damaged("it holds no state (an empty or incomplete step directory)")
        if abstract_state is not None:
            mismatch = _structure_mismatch(saved, abstract_state)
            plan = _scan_layout_plan(saved, abstract_state) if mismatch else None
            if plan is not None:
                logging.warning("The checkpoint of step %d holds the ViT blocks in the other "
                                "layout (model.scan); converting them while restoring.", step)
                return self._restore_converted(step, saved, abstract_state, plan, expected)
            if mismatch:
                # Not damage: the config builds a different state. Never move it away.
                raise ConfigError(
                    f"the checkpoint of step {step} in {self.directory} holds a different "
                    f"model/optimizer state than this config builds ({'; '.join(mismatch[:4])}"
                    f"{'; ...' if len(mismatch) > 4 else ''}): use the config of that run or a "
                    "new --workdir.")
        return self._read_verified(step, abstract_state, expected)

    def _read_verified(self, step, target, expected):
        """The arrays of `step` read into `target`, checked finite and against `expected`."""
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:
            raise _Damaged(f"it cannot be read ({_short(e)})") from e
        reason = _verify(state, expected)
        if reason:
            raise _Damaged(reason)
        return state

    def _restore_converted(self, step, saved, abstract_state, plan, expected):
        """The state of `step` read in its saved layout (and verified there), then rearranged
        by `plan` into `abstract_state`'s tree and shardings."""
        raw = self._read_verified(step, _on_one_device(saved), expected)
        flat = {k: np.asarray(v) for k, v in _by_path(raw).items()}
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
        out = []
        for path, want in leaves:
            kind, source, index = plan[sharding.path_name(path)]
            if kind == "copy":
                value = flat[source]
            elif kind == "stack":
                value = np.stack([flat[name] for name in source])
            else:
                value = flat[source][index]
            out.append(jax.device_put(value.astype(want.dtype), want.sharding))
        return jax.tree_util.tree_unflatten(treedef, out)

    def restore(self, abstract_state: Any, step: Optional[int] = None):
        """Restores into the shapes/shardings of `abstract_state` (jax.ShapeDtypeStruct tree).

        `step` None: the newest checkpoint that reads back intact; damaged newer ones are moved
        to checkpoints_damaged/ with a warning. Returns (state, step), (None, None) when the
        directory holds no checkpoint at all, and raises CheckpointError when it holds some but
        none is good (a run never silently starts over)."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            steps = [step]
        if not steps:
            return None, None
        legacy = not any(self._has_fingerprint(s) for s in steps)
        reasons = []
        for candidate in steps:
            try:
                state = self._restore_verified(abstract_state, candidate, legacy)
            except _Damaged as e:
                reasons.append(f"step {candidate}: {e}")
                logging.warning("The checkpoint of step %d in %s is unusable (%s); moving it to "
                                "%s and trying the previous one.", candidate, self.directory, e,
                                self.damaged_directory)
                self._quarantine(candidate)
                continue
            if legacy:
                logging.warning("The checkpoints in %s predate integrity fingerprints: step %d "
                                "was checked for finite values only.", self.directory, candidate)
            return state, candidate
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored ({'; '.join(reasons)}); they "
            f"were moved to {self.damaged_directory}. To start this run over, use a new "
            "--workdir (or remove the checkpoints directories of this one).")

    def _has_fingerprint(self, step: int) -> bool:
        try:
            return self._saved_fingerprint(step) is not None
        except Exception:
            return False

    def _quarantine(self, step: int):
        """Moves a damaged step out of orbax's sight (kept for inspection, never deleted):
        otherwise it would stay "latest" and block the save of its step number."""
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.damaged_directory / str(step)
            suffix = 1
            while target.exists():
                target = self.damaged_directory / f"{step}.{suffix}"
                suffix += 1
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            if source.exists():
                # A rename on a filesystem; on an object store a copy of every object, then
                # their deletion: interrupted, what is left is moved again by the next restore
                # or, once its commit marker is gone, ignored like an unfinished save.
                source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"quarantined checkpoint {step}")
        self._manager.reload()

    def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts a (possibly asynchronous) save of `state`; a failure of an earlier async save
        surfaces here or in check_for_errors as a CheckpointError."""
        if not force and step % self.every_steps:
            return False
        if step in self._manager.all_steps():
            return False
        self.wait()  # orbax would wait for the save in flight anyway; its failure is its own
        custom = {FINGERPRINT_KEY: fingerprint(state)}
        self._check_can_write(step, state)
        try:
            saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True,
                                       custom_metadata=custom)
        except Exception as e:
            raise self._save_error(step, e) from e
        self._pending_step = step
        return saved

    def _check_can_write(self, step: int, state: Any):
        """Refuse a save that cannot succeed before it starts (read-only or full disk): a write
        that fails inside orbax's threads is reported many times over and can hang the exit
        for minutes; old checkpoints are only deleted after a save succeeds, so it needs room
        for a whole new one."""
        # Named per process of the job: two hosts may run the same pid.
        probe = self.directory / f".write_probe_{jax.process_index()}_{os.getpid()}"
        try:
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as e:
            raise self._save_error(step, e) from e
        if not paths.is_local(self.directory):
            return  # a bucket has no free-space figure (and its quota is not the disk's)
        needed = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        needed = int(needed * 1.05) + (64 << 10)  # metadata, manifests
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise self._save_error(step, OSError(
                f"not enough free space: the state needs ~{needed / 2**20:.1f} MiB, "
                f"{free / 2**20:.1f} MiB are free"))

    def check_for_errors(self):
        """Raises CheckpointError if an asynchronous save has failed (disk full, permissions);
        cheap enough to call every step."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise self._save_error(self._pending_step, e) from e

    def _save_error(self, step, error) -> CheckpointError:
        good = [s for s in self._manager.all_steps() if s != step]
        previous = (f"the checkpoint of step {max(good)} is intact and a rerun resumes from it "
                    "once the cause is fixed" if good else
                    "there is no earlier checkpoint: fix the cause and rerun")
        return CheckpointError(
            f"saving the checkpoint of step {step} to {self.directory} failed: {_short(error)}; "
            f"{previous}.")

    def wait(self):
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(self._pending_step, e) from e

    def close(self):
        """Waits for the save in flight (raising CheckpointError if it failed) and releases
        orbax's threads either way."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # the save error was reported by wait()
                logging.debug("Closing the checkpoint manager: %s", e)


def _metadata_tree(metadata):
    """The saved tree of shapes/dtypes from orbax's item metadata (None if there is none)."""
    if metadata is None:
        return None
    try:
        return metadata.tree
    except (AttributeError, KeyError):
        pass
    if hasattr(metadata, "keys") and "default" in metadata.keys():  # a Composite of items
        return _metadata_tree(metadata["default"])
    return metadata


class _Damaged(Exception):
    """A checkpoint that cannot be read back intact."""


def _short(error: BaseException) -> str:
    """The root cause of an exception chain, on one line, without orbax's wrapping."""
    for _ in range(20):  # follow the chain to its root; bounded in case it loops
        nxt = error.__cause__ or error.__context__
        if nxt is None or nxt is error:
            break
        error = nxt
    text = one_line(str(error)) or type(error).__name__
    return (text[:300] + "...") if len(text) > 300 else text


def _on_one_device(saved_metadata):
    """A restore target for a saved tree as it was saved, on this process's first device:
    readable whatever mesh or process count wrote it."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        saved_metadata)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) describing a live pytree, for restore targets."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def latest_step(directory: str) -> Optional[int]:
    """The step of the newest complete checkpoint in `directory`, or None (none yet)."""
    if not epath.Path(directory).is_dir():
        return None
    return ocp.CheckpointManager(directory).latest_step()


def all_steps(directory) -> list:
    """The steps of every complete checkpoint in `directory`, oldest first."""
    if not epath.Path(directory).is_dir():
        return []
    return sorted(ocp.CheckpointManager(directory).all_steps())


def restore_raw(directory: str, step: int, subtree: Union[str, Tuple[str, ...]] = "params"):
    """One top-level entry of a saved state (or a tuple of them, for a tuple of names) as
    host numpy arrays, on any device count; CheckpointError when the checkpoint is damaged."""
    manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
    if step not in manager.all_steps():
        raise ValueError(f"no checkpoint of step {step} in {directory}; saved steps: "
                         f"{sorted(manager.all_steps())}.")
    metadata = manager.item_metadata(step)
    metadata = getattr(metadata, "tree", metadata)
    restored = manager.restore(step, args=ocp.args.StandardRestore(_on_one_device(metadata)))
    expected = (manager.metadata(step).custom_metadata or {}).get(FINGERPRINT_KEY)
    manager.close()
    problem = _verify(restored, expected)
    if problem:
        raise CheckpointError(f"the checkpoint {directory}/{step} is damaged: {problem}.")
    if isinstance(subtree, tuple):
        return tuple(jax.tree.map(np.asarray, restored.get(name) or {}) for name in subtree)
    return jax.tree.map(np.asarray, restored[subtree])
