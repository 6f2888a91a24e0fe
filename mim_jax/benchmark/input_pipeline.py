"""--mode input: the input pipeline alone, images/s per core and CPU ms per image by stage."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional, Sequence

from mim_jax import data
from mim_jax.benchmark.environment import environment
from mim_jax.benchmark.jpeg_dataset import dataset_stats, prepare_jpeg_dataset, read_encoded
from mim_jax.benchmark.timing import per_core


def _stage_functions(data_cfg) -> dict:
    """(encoded, seed) -> image, for each cumulative stage of the pipeline's per-image work,
    built from the pipeline's own ops; 'what-if' entries are alternatives it does not use."""
    from mim_jax.data import image_ops
    spec = image_ops.ImageSpec.from_config(data_cfg)
    size, interp = spec.image_size, spec.interpolation

    def crop(encoded, seed):
        return image_ops.decode_random_crop(encoded, seed, spec.channels, spec.crop_scale,
                                            spec.crop_ratio)

    def raw_resize(image, method, antialias):
        from mim_jax.data.tf_setup import tf
        out = tf.image.resize(image, (size, size), method=method, antialias=antialias)
        return tf.clip_by_value(out, 0.0, 255.0)

    return {
        "decode whole JPEG": lambda e, s: image_ops.decode_any(e, spec.channels),
        "decode crop window only": crop,
        f"+ resize to {size} ({interp}, antialias)":
            lambda e, s: image_ops.resize(crop(e, s), size, interp),
        "+ flip + uint8 (the pipeline's map)":
            lambda e, s: image_ops.train_image_uint8(e, s, spec),
        "what-if: the map normalising on the host (float32 out)": lambda e, s: image_ops.normalize(
            image_ops.train_image(e, s, spec), spec.mean, spec.std),
        f"what-if: crop + {interp} resize without antialias":
            lambda e, s: raw_resize(crop(e, s), interp, False),
        "what-if: crop + bilinear resize with antialias":
            lambda e, s: raw_resize(crop(e, s), "bilinear", True),
    }


def measure_input_stages(blobs: Sequence[bytes], data_cfg, images: int = 512) -> dict:
    """Process CPU milliseconds per image of each stage, on ONE tf.data thread."""
    from mim_jax.data.tf_setup import tf
    if data_cfg.crop_scale is None:
        return {"error": "data.crop_scale is None: the pipeline does no RandomResizedCrop"}
    records = tf.data.Dataset.from_tensor_slices(list(blobs[:images])).enumerate()
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    out = {}
    for name, fn in _stage_functions(data_cfg).items():
        # A sum of the pixels, so no stage can be pruned as unused (costs ~0.03 ms/img).
        ds = records.map(lambda i, e, fn=fn: tf.reduce_sum(tf.cast(
            fn(e, tf.stack([tf.constant(7, tf.int64), i])), tf.float32)),
                         num_parallel_calls=1).with_options(options)
        ds.take(16).reduce(0, lambda a, x: a + 1)  # kernels initialised outside the timing
        cpu0 = os.times()
        count = int(ds.reduce(0, lambda a, x: a + 1))
        cpu1 = os.times()
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        out[name] = {"cpu_ms_per_image": 1e3 * cpu / count,
                     "images_per_cpu_second": count / cpu if cpu > 0 else None}
    return out


def measure_input(data_cfg, batch_size: int, steps: int, warmup: int, cores: int) -> dict:
    train_data = data.create_train_iterator(data_cfg, global_batch_size=batch_size, seed=0,
                                            process_index=0, process_count=1)
    for _ in range(warmup):  # fills the shuffle buffer and lets tf.data autotune settle
        next(train_data)
    cpu_start, start = os.times(), time.perf_counter()
    for _ in range(steps):
        next(train_data)
    elapsed = time.perf_counter() - start
    cpu_end = os.times()
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    return dict(input_rates(steps * batch_size, elapsed, cores, cpu),
                steps_per_epoch=train_data.steps_per_epoch)


def input_rates(images: int, seconds: float, cores: int, cpu_seconds: float) -> dict:
    """Throughput figures of the input pipeline.

    Per core divides by the pool size (wall clock: understates the per-core speed when other
    work shares the cores); per CPU-second divides by the CPU time the process actually got,
    so it holds up on a shared machine.
    """
    rate = images / seconds
    return {"images": images, "seconds": seconds, "images_per_sec": rate, "cores": cores,
            "images_per_sec_per_core": per_core(rate, cores), "process_cpu_seconds": cpu_seconds,
            "images_per_cpu_second": images / cpu_seconds if cpu_seconds > 0 else None}


def run_input(config, threads: int, batch: Optional[int], steps: int, warmup: int,
              input_format: str = "tfds", input_images: int = 2048,
              input_dir: Optional[str] = None) -> dict:
    config.batch_size = batch or 128
    root = input_dir or os.path.join(tempfile.gettempdir(), "mim_jax_bench_jpeg")
    start = time.perf_counter()
    overrides = prepare_jpeg_dataset(input_format, root, input_images)
    prepare_s = time.perf_counter() - start
    config.data.update(overrides)
    config.data.split = "train"
    d = config.data
    blobs = read_encoded(overrides)
    return {
        "mode": "input", "environment": environment(threads),
        "dataset": dict(dataset_stats(blobs), format=input_format,
                        description=("JPEG bytes in TFDS records (TFRecord files, decoded by "
                                     "the pipeline)" if input_format == "tfds" else
                                     "a folder of JPEG files"),
                        location=overrides["data_dir"] or overrides["folder"],
                        prepare_seconds=prepare_s),
        "augmentation": {"image_size": d.image_size, "crop_scale": tuple(d.crop_scale or ()),
                         "interpolation": d.interpolation, "flip": d.flip,
                         "batch_size": config.batch_size},
        "threads_note": "tf.data runs on its default thread pool, sized to the schedulable "
                        "cores (the pipeline sets no private pool); per core = images/s / "
                        "that count",
        "input": measure_input(d, config.batch_size, steps, warmup, threads),
        "stages_one_thread": measure_input_stages(blobs, d),
    }

