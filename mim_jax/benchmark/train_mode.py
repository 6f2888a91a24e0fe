"""--mode train: step time, FLOPs, MFU, memory, masking share; the loop with real input."""
from __future__ import annotations

import time
from typing import Callable, Optional

import jax

from mim_jax import data, sharding
from mim_jax.benchmark.environment import environment, peak_memory
from mim_jax.benchmark.gpu_trace import write_trace
from mim_jax.benchmark.masking_share import measure_masking
from mim_jax.benchmark.model_config import describe_model
from mim_jax.benchmark.timing import call_summary, measure_each, mfu
from mim_jax.benchmark.train_step import (StepRunner, build_train_setup, compile_step,
                                          flops_report, xla_memory)
from mim_jax.flops import peak_flops_for

SYNTHETIC = "synthetic"


def benchmark_train_step(config, steps: int, warmup: int, peak_override=None,
                         trace_dir: Optional[str] = None) -> dict:
    setup = build_train_setup(config)
    compiled, compile_times = compile_step(setup)
    runner = StepRunner(compiled, setup.state, setup.batch)
    step_times = call_summary(measure_each(runner, steps, warmup))
    n_dev = setup.mesh.devices.size
    images_per_sec = config.batch_size / step_times["median_s"]
    flop = flops_report(config, compiled, config.batch_size // n_dev)
    device = jax.devices()[0]
    peak, peak_source = peak_flops_for(device.device_kind, device.platform, peak_override)
    # MFU counts the model's FLOPs (analytic); ConvNets have no analytic count, so XLA's
    # count of the compiled step stands in (it includes the optimizer's few FLOPs).
    per_image = flop["analytic_train_per_image"] or flop["xla_train_per_image"]
    result = {
        "compile": compile_times,
        "xla_memory": xla_memory(compiled),
        "step_time": step_times,
        "images_per_sec": images_per_sec,
        "flops": flop,
        "achieved_flops_per_sec": images_per_sec * per_image if per_image else None,
        "achieved_flops_source": "analytic" if flop["analytic_train_per_image"] else "XLA",
        "peak_flops_per_device": peak, "peak_flops_source": peak_source,
        "mfu": mfu(images_per_sec, per_image, peak, n_dev) if per_image else None,
        "final_loss": float(runner.metrics["loss"]),
        "memory": peak_memory(device),
    }
    # The step times above block on every step, so the device also waits while the host
    # dispatches the next one (on an H200 ViT-L/16: ~7 of 100 ms). The trainer dispatches
    # ahead; this is its rate, and the MFU it reaches.
    back_to_back = loop_throughput(runner, lambda: setup.batch, config.batch_size, steps,
                                   min(warmup, 1))
    result["back_to_back"] = dict(
        back_to_back,
        mfu=mfu(back_to_back["images_per_sec"], per_image, peak, n_dev) if per_image else None,
        method="the compiled step called `steps` times without waiting for its results, then "
               "blocked once (as the trainer's loop runs), on the same on-device batch")
    try:
        masking_times = measure_masking(config, setup.mesh, steps, warmup)
    except ValueError as e:  # SparK: its masking is selects spread through the network
        masking_times = None
        result["masking"] = {"note": str(e)}
    if masking_times is not None:
        result["masking"] = dict(
            masking_times,
            share_of_step=masking_times["forward_backward"]["median_s"] / step_times["median_s"],
            share_of_step_min=masking_times["forward_backward"]["min_s"] / step_times["min_s"],
            method="the objective's masking (MAE: random_masking + encoder gather + decoder "
                   "unshuffle; SimMIM: simmim_mask + mask-token replacement; BEiT: block_mask + "
                   "mask-token replacement), with its gradients, "
                   "jitted and timed alone on the step's shapes / the full step")
    if trace_dir:
        result["trace"] = write_trace(runner, compiled, min(steps, 3), trace_dir)
    # Reused by the input-pipeline loop; popped before output.
    result["_runner"] = runner
    return result


def loop_throughput(runner: StepRunner, next_batch: Callable[[], dict], batch_size: int,
                    steps: int, warmup: int) -> dict:
    """Images/s of the trainer's loop shape: get a batch, dispatch the step, never block
    until the end (so host work overlaps device work, as in training)."""
    for _ in range(warmup):
        runner.async_call(next_batch())
    jax.block_until_ready(runner.metrics)
    wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - t
        runner.async_call(batch)
    jax.block_until_ready(runner.metrics)
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": elapsed, "images_per_sec": steps * batch_size / elapsed,
            "batch_wait_s_per_step": wait / steps}


def benchmark_pipeline_loop(config, train_data, runner: StepRunner, synthetic: dict,
                            steps: int, warmup: int) -> dict:
    """The loop with the real input pipeline (host batch -> global array -> step) next to
    `synthetic`: the same loop fed the on-device batch (the train step's back-to-back rate)."""
    mesh = sharding.make_mesh()
    real = loop_throughput(runner, lambda: sharding.global_batch(next(train_data), mesh),
                           config.batch_size, steps, warmup)
    return {"data": config.data.name, "pipeline": real, "on_device_synthetic": synthetic,
            "pipeline_over_synthetic": real["images_per_sec"] / synthetic["images_per_sec"]}


def run_train(config, threads: int, use_data: Optional[bool], steps: int, warmup: int,
              peak_flops: Optional[float] = None, trace_dir: Optional[str] = None) -> dict:
    result = {"mode": "train", "environment": environment(threads),
              "model": describe_model(config)}
    if use_data is None:
        use_data = config.data.name != SYNTHETIC
    # Opened first, so that a dataset that is not there fails before minutes of measuring.
    train_data = (data.create_train_iterator(config.data, global_batch_size=config.batch_size,
                                             seed=config.seed) if use_data else None)
    result["train_step"] = benchmark_train_step(config, steps, warmup, peak_flops, trace_dir)
    runner = result["train_step"].pop("_runner")
    result["input_pipeline_loop"] = (
        benchmark_pipeline_loop(config, train_data, runner, result["train_step"]["back_to_back"],
                                steps, warmup)
        if use_data else None)
    result["train_step"]["memory"] = peak_memory(jax.devices()[0])  # after everything ran
    return result

