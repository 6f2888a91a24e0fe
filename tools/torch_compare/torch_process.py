"""compare_torch's PyTorch step in a process of its own, with the allocator a PyTorch user has.

mim_jax's entry points set glibc allocator settings for their own process at start-up
(mim_jax/allocator.py) that suit XLA's per-step scratch buffers. A child process starts with
glibc's defaults again (MALLOC_* variables the user set stay, for both sides), so PyTorch is
measured as a PyTorch user runs it. The two processes take turns, one step each per round;
the child measures its own steps (wall time, CPU time, page faults) as compare_torch measures
mim_jax's.

Protocol: pickled requests on the child's stdin, pickled replies on its stdout (the child sends
its own prints to stderr).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback

# The repository root, where `tools` is imported from (the child may start anywhere).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torch_environment(environ=None) -> dict:
    """`environ` (default os.environ) with the repository root importable; JAX, imported by the
    child for the config helpers only, stays on the CPU."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def allocator_variables(environ) -> dict:
    """The MALLOC_* and LD_PRELOAD variables of an environment: what decides its allocator."""
    return {k: v for k, v in environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}


class TorchStepProcess:
    """A torch_steps step class built and called in a child process; `measured_call()` runs one
    step there and returns timing.measure_call's figures, measured there."""

    def __init__(self, step_class: type, config, images_nhwc, threads: int):
        self._child = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=torch_environment())
        self.loss = None
        try:
            self._describe = self._request(("build", step_class.__name__, config, images_nhwc,
                                            threads))
        except BaseException:
            self._child.kill()  # no step to run: do not leave the child waiting for requests
            self._child.wait()
            raise

    def _request(self, message):
        try:
            pickle.dump(message, self._child.stdin)
            self._child.stdin.flush()
            kind, payload = pickle.load(self._child.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            raise RuntimeError(f"The PyTorch process exited (code {self._child.wait()}); "
                               "its error is printed above.") from None
        if kind == "error":
            raise RuntimeError(f"The PyTorch process failed: {payload}")
        return payload

    def measured_call(self) -> dict:
        measured, self.loss = self._request(("step",))
        return measured

    def __call__(self):
        return self.measured_call()

    def describe(self) -> dict:
        """The step's description, with the child's pid and its MALLOC_* / LD_PRELOAD
        variables (the user's own, if any)."""
        return dict(self._describe, process="its own", pid=self._child.pid)

    def close(self) -> None:
        if self._child.poll() is None:
            try:
                pickle.dump(("exit",), self._child.stdin)
                self._child.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self._child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        self._child.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(requests, replies) -> None:
    from mim_jax.benchmark.timing import measure_call
    from tools.torch_compare.torch_steps import TORCH_STEPS
    classes = {cls.__name__: cls for cls in TORCH_STEPS.values()}
    step = None
    while True:
        try:
            message = pickle.load(requests)
        except EOFError:
            return
        try:
            if message[0] == "exit":
                return
            if message[0] == "build":
                import torch
                _, name, config, images, threads = message
                torch.set_num_threads(threads)
                step = classes[name](config, images)
                reply = dict(step.describe(), malloc_env=allocator_variables(os.environ))
            else:
                measured = measure_call(step)
                reply = (measured, step.loss)
            pickle.dump(("ok", reply), replies)
        except Exception as e:  # the parent raises it with this line; the traceback goes above
            traceback.print_exc()
            pickle.dump(("error", f"{type(e).__name__}: {e}"), replies)
        replies.flush()


if __name__ == "__main__":
    _replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints must not corrupt the replies
    _serve(sys.stdin.buffer, _replies)
