"""Stopping at a step boundary on SIGTERM or SIGINT (preemption, maintenance, scancel, Ctrl-C).

The trainer asks `should_stop(step)` after every step. Once a signal has arrived it returns
True on every process at the same step; the trainer then saves a checkpoint of that step,
waits until it is committed and raises `Stopped`, which `python -m mim_jax.main` prints as one
line before exiting with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell
reports a signalled command. Running the same command again resumes exactly.

One process: Python handlers note the signal. Several processes: JAX's coordination service
already catches SIGTERM (its preemption notifier, which also serves TPU maintenance events)
and picks a step that every process reaches (`reached_preemption_sync_point`); SIGINT is
turned into SIGTERM so that it takes the same path. A second signal while the checkpoint is
being written only logs: nothing is interrupted half-way.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import jax
from absl import logging

from mim_jax.errors import Stopped

_HANDLED = (signal.SIGTERM, signal.SIGINT)
__all__ = ["PreemptionWatch", "Stopped"]


class PreemptionWatch:
    """Context manager: installs the handlers on entry, restores the previous ones on exit."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}
        self._multi_process = jax.process_count() > 1
        self._synced = self._multi_process and _preemption_service_available()
        if self._multi_process and not self._synced:
            logging.warning("JAX's preemption service is off (jax_enable_preemption_service): "
                            "SIGTERM and SIGINT stop this multi-process run without a save.")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        if self._multi_process and not self._synced:
            return self
        for signum in _HANDLED:
            if self._synced and signum == signal.SIGTERM:
                continue  # JAX's notifier owns SIGTERM; a Python handler would replace it
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _on_signal(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.signum is not None:
            logging.warning("Received %s again: the run stops once its checkpoint is "
                            "committed; nothing is interrupted.", name)
            return
        self.signum = signum
        logging.warning("Received %s: saving a checkpoint at the end of this step, then "
                        "stopping.", name)
        if self._synced:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: all processes agree

    def should_stop(self, step: int) -> bool:
        """Call once per step, with increasing steps, on every process."""
        if self._synced:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signum is not None


def _preemption_service_available() -> bool:
    from jax._src import distributed  # the public API offers no "is it on?" query
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
