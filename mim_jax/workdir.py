"""A workdir's identity: the config it was started with, and whether a new run may go on in it.

The first run records its config in WORKDIR/config.json. A later run compares its own config
with the newest record and refuses, naming every changed field, when a field that changes what
the run computes differs; --allow_config_change accepts the change and records the new config
next to the old one (config.stepN.json, N = the step it resumes from), never overwriting.
"""
from __future__ import annotations

import json
import re
from typing import Optional

from absl import logging
from etils import epath

from mim_jax import optim, paths
from mim_jax.errors import ConfigError

RECORD = "config.json"
_CHANGE_RECORD = re.compile(r"^config\.step(\d+)\.json$")
FINAL_METRICS = "final_metrics.json"

# Fields that change how a run executes or reports, not what it computes: they may differ
# freely between the runs of one workdir.
OPERATIONAL = ("log_every_steps", "checkpoint", "evaluators", "accum_steps", "data.data_dir",
               "data.manual_dir", "data.prefetch", "data.num_parallel_calls", "model.remat",
               "model.attention_impl", "model.scan", "mesh", "partition_rules", "fsdp_min_size",
               # CPU speed choices that older records hold (the fields are gone): such a run
               # resumes
               "model.matmul_precision", "cpu_dots")


# Fields added after some runs were recorded, with the value that reproduces what those runs
# did: a record without the field compares as if it held this value.
IMPLICIT = {
    "optimizer.no_decay": list(optim.DEFAULT_NO_DECAY),
    "optimizer.schedule": "cosine",
    "optimizer.decay_epochs": [],
    "optimizer.decay_rate": 0.1,
    "optimizer.cosine_from_step_0": False,
}


def flatten(config) -> dict:
    """{'optimizer.base_lr': 1e-3, ...} of a ConfigDict, as JSON would store it."""
    tree = json.loads(config.to_json_best_effort()) if not isinstance(config, dict) else config
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = node
    walk("", tree)
    return out


def _operational(field: str) -> bool:
    return any(field == p or field.startswith(p + ".") for p in OPERATIONAL)


def changed_fields(old: dict, new: dict) -> list:
    """'field: old -> new' for every meaningful field that differs (missing = <unset>)."""
    out = []
    for field in sorted(old.keys() | new.keys()):
        if _operational(field):
            continue
        a = old.get(field, IMPLICIT.get(field, "<unset>"))
        b = new.get(field, IMPLICIT.get(field, "<unset>"))
        if a != b:
            out.append(f"{field}: {a!r} -> {b!r}")
    return out


def latest_record(workdir) -> Optional[epath.Path]:
    """The newest recorded config of `workdir` (config.json or the latest config.stepN.json)."""
    workdir = epath.Path(workdir)
    changes = [(int(m.group(1)), path.name) for path in workdir.iterdir()
               if (m := _CHANGE_RECORD.match(path.name))] if workdir.is_dir() else []
    if changes:
        return workdir / max(changes)[1]
    path = workdir / RECORD
    return path if path.is_file() else None


def check(workdir, config, *, resume_step: Optional[int], allow_change: bool,
          is_main: bool = True) -> list:
    """Records `config` for a fresh run; for a resumed one compares it with the record and
    raises ConfigError listing the changes unless `allow_change`. Returns the changes."""
    workdir = epath.Path(workdir)
    text = config.to_json_best_effort(indent=2)
    record = latest_record(workdir)
    if resume_step is None or record is None:
        # Nothing to resume (or a run that stopped before its first checkpoint): start over.
        if is_main:
            paths.write_whole(workdir / RECORD, text)
        return []
    try:
        old = flatten(json.loads(record.read_text()))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{record} cannot be read ({e}); restore it, or pass "
                          "--allow_config_change to continue with this config.") from e
    changes = changed_fields(old, flatten(config))
    if changes and not allow_change:
        shown = "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
        raise ConfigError(
            f"--workdir {workdir} holds a run with another config ({len(changes)} changed: "
            f"{shown}): rerun with that config, use a new --workdir, or pass "
            "--allow_config_change to continue this run with the new one.")
    if changes and is_main:
        path = workdir / f"config.step{resume_step}.json"
        paths.write_whole(path, text)
        final = workdir / FINAL_METRICS
        if final.exists():  # it ended the old config's run, not this one's
            final.replace(workdir / f"final_metrics.step{resume_step}.json")
        logging.warning("Continuing from step %d with a changed config (%s); recorded in %s, "
                        "the earlier config is kept.", resume_step, "; ".join(changes), path)
    return changes


def finished_metrics(workdir, latest_step: Optional[int]) -> Optional[dict]:
    """The final metrics of a run that completed at `latest_step`, else None."""
    path = epath.Path(workdir) / FINAL_METRICS
    if latest_step is None or not path.is_file():
        return None
    try:
        final = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return final if final.get("step") == latest_step else None


def write_final_metrics(workdir, final: dict) -> None:
    paths.write_whole(epath.Path(workdir) / FINAL_METRICS, json.dumps(final, indent=2))
