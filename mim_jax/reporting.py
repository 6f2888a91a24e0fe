"""Metric writers (TensorBoard + console + JSON lines) and progress/ETA reporting.

TensorBoard and console writers come from clu when it can be imported (it needs TensorFlow
and tensorboard); accelerator hosts without TensorFlow still get the console and JSON-lines logs.
TensorFlow writes the TensorBoard files, to a bucket (gs://) too, through its own filesystems.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import time
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging
from etils import epath

from mim_jax import paths

# An object store cannot append: metrics.jsonl there is rewritten whole, at most this often
# (and at every flush), so a run that dies loses at most this much of its log.
REWRITE_SECONDS = 60.0


class QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of orbax (a dozen lines per checkpoint); its warnings and errors
    still show, as one line each: a failed save's traceback from orbax's background thread
    (logged with logging.exception) is left out, because the trainer reports that failure
    itself, once, as a CheckpointError."""

    def filter(self, record):
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno < std_logging.WARNING:
            return False
        record.exc_info, record.exc_text = None, None
        return True


class ProcessTag(std_logging.Filter):
    """Prefixes every log line of a multi-process run with the process that wrote it, so
    interleaved logs of a pod or a SLURM job say where each line comes from."""

    def __init__(self, index: int, count: int):
        super().__init__()
        self.tag = f"[process {index}/{count}] "

    def filter(self, record):
        if isinstance(record.msg, str) and not record.msg.startswith(self.tag):
            record.msg = self.tag + record.msg
        return True


def _to_python(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


def jsonl_writer(path):
    """The writer of metrics.jsonl at `path`: appending to a local file, rewriting an object."""
    return JsonlWriter(path) if paths.is_local(path) else RewritingJsonlWriter(path)


class JsonlWriter:
    """One JSON object per write_scalars call in workdir/metrics.jsonl (appended on resume)."""

    def __init__(self, path):
        self._file = open(path, "a", buffering=1)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")

    def write_images(self, step, images):
        del step, images

    def write_texts(self, step, texts):
        del step, texts

    def write_hparams(self, hparams):
        del hparams

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class RewritingJsonlWriter(JsonlWriter):
    """metrics.jsonl in an object store, which has no append: the lines so far (those of earlier
    runs of the workdir included) are kept and the whole object is written again at flush()
    and at most every `rewrite_seconds`. Each write replaces the object whole, so a reader
    sees the file of one rewrite or the next, never a part of one."""

    def __init__(self, path, rewrite_seconds: float = REWRITE_SECONDS):
        self._path = epath.Path(path)
        text = self._path.read_text() if self._path.exists() else ""
        self._lines = [line + "\n" for line in text.splitlines() if line.strip()]
        self._rewrite_seconds = rewrite_seconds
        self._written, self._last = len(self._lines), time.monotonic()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        self._lines.append(json.dumps(record) + "\n")
        if time.monotonic() - self._last >= self._rewrite_seconds:
            self.flush()

    def flush(self):
        if len(self._lines) > self._written:
            self._path.write_text("".join(self._lines))
            self._written = len(self._lines)
        self._last = time.monotonic()

    def close(self):
        self.flush()


class ConsoleWriter:
    """Readable scalar lines through absl logging (used when clu is unavailable)."""

    def write_scalars(self, step, scalars):
        text = ", ".join(f"{k}={_to_python(v):.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", step, text)

    def write_images(self, step, images):
        logging.info("[%d] images: %s", step, {k: np.shape(v) for k, v in images.items()})

    def write_texts(self, step, texts):
        for k, v in texts.items():
            logging.info("[%d] %s: %s", step, k, v)

    def write_hparams(self, hparams):
        logging.info("hparams: %s", hparams)

    def flush(self):
        pass

    def close(self):
        pass


class Writers:
    """Fans every call out to several writers."""

    def __init__(self, writers):
        self._writers = list(writers)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for w in self._writers:
                getattr(w, name)(*args, **kwargs)
        return call


def create_writers(workdir, is_main: bool) -> Writers:
    """TensorBoard + console + JSON-lines on the main process; nothing elsewhere."""
    if not is_main:
        return Writers([])
    writers = [jsonl_writer(epath.Path(workdir) / "metrics.jsonl")]
    try:
        from clu import metric_writers  # imports TensorFlow and tensorboard
        writers.append(metric_writers.create_default_writer(os.fspath(workdir),
                                                            asynchronous=False))
    except ImportError as e:
        logging.warning("TensorBoard logging is off (%s); console and metrics.jsonl only.", e)
        writers.append(ConsoleWriter())
    return Writers(writers)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Throughput and ETA over the steps since the last report (excludes compile time)."""

    def __init__(self, total_steps: int, start_step: int, global_batch_size: int,
                 flops_per_image: Optional[float] = None, peak_flops: Optional[float] = None):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.flops_per_image = flops_per_image
        self.peak_flops = peak_flops
        self._last_step, self._last_time = start_step, None

    def start(self, step: int):
        """Call after the first (compiling) step has finished."""
        self._last_step, self._last_time = step, time.perf_counter()

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        if self._last_time is None or step <= self._last_step:
            self.start(step)
            return {}
        steps_per_sec = (step - self._last_step) / (now - self._last_time)
        self._last_step, self._last_time = step, now
        out = {"steps_per_sec": steps_per_sec,
               "images_per_sec": steps_per_sec * self.global_batch_size,
               "eta_seconds": (self.total_steps - step) / steps_per_sec}
        if self.flops_per_image and self.peak_flops:
            out["mfu"] = out["images_per_sec"] * self.flops_per_image / self.peak_flops
        return out

    def line(self, step: int, stats: dict, loss: float) -> str:
        text = f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%) " \
               f"loss {loss:.4f}"
        if "images_per_sec" in stats:
            text += f", {stats['images_per_sec']:.1f} img/s"
            if "mfu" in stats:
                text += f", MFU {100 * stats['mfu']:.1f}%"
            text += f", ETA {format_duration(stats['eta_seconds'])}"
        return text
