"""The mim_jax train step next to the PyTorch (transformers) one, on the CPU: the figures and
their table."""
from __future__ import annotations

import contextlib
import os

import jax
import numpy as np

from mim_jax import allocator, data, pretrained
from mim_jax.benchmark.environment import environment, usable_cores
from mim_jax.benchmark.masking_share import measure_masking
from mim_jax.benchmark.model_config import describe_model
from mim_jax.benchmark.report import (cpu_line, fmt_flops, fmt_pct, fmt_ratio, fmt_seconds,
                                      step_line)
from mim_jax.benchmark.timing import call_summary, interleaved_calls, paired_ratios
from mim_jax.benchmark.train_step import (StepRunner, build_train_setup, compile_step,
                                          flops_report, token_labels_shape, xla_flops,
                                          xla_memory)
from tools.torch_compare.torch_process import TorchStepProcess, allocator_variables
from tools.torch_compare.torch_steps import torch_step_class


def _tokenizer_step(config, per_device_batch: int):
    """The mim_jax step that runs its tokenizer (what the trainer runs): -> (runner, figures)."""
    setup = build_train_setup(config)
    compiled, compile_times = compile_step(setup)
    measured = xla_flops(compiled)
    return StepRunner(compiled, setup.state, setup.batch), {
        "compile": compile_times, "xla_memory": xla_memory(compiled),
        "xla_train_flops_per_image": (measured / per_device_batch if measured is not None
                                      else None)}


def _cpu_ratio(a: dict, b: dict):
    """a / b of median process CPU time, None when b's is below the clock's tick (tiny steps)."""
    return a["cpu_median_s"] / b["cpu_median_s"] if b["cpu_median_s"] > 0 else None


def _tokenizer_share(calls: dict, with_tok: dict, without: dict) -> dict:
    return {"share_of_step": 1.0 - without["median_s"] / with_tok["median_s"],
            "share_of_step_cpu": (1.0 - without["cpu_median_s"] / with_tok["cpu_median_s"]
                                  if with_tok["cpu_median_s"] > 0 else None),
            "with_over_without_paired_wall": paired_ratios(
                calls["mim_jax_with_tokenizer"], calls["mim_jax"], "wall_s")}


def run_compare_torch(config, threads: int, steps: int, warmup: int,
                      tokenizer_step: bool = True, torch_process: str = "own") -> dict:
    """torch_process: 'own' runs PyTorch in a child process with the allocator a PyTorch user
    has (torch_process.py says why); 'shared' runs it in this process, under mim_jax's
    allocator policy where it applies."""
    if torch_process not in ("own", "shared"):
        raise ValueError(f"torch_process={torch_process!r}; allowed: ['own', 'shared'].")
    if jax.devices()[0].platform != "cpu":
        raise ValueError("compare_torch compares on the CPU; run with JAX_PLATFORMS=cpu.")
    if config.model.get("dtype", "float32") != "float32":
        raise ValueError(f"model.dtype={config.model.dtype!r}: compare_torch is float32 only.")
    torch_step_cls = torch_step_class(config)  # fails before minutes of compiling
    # A tokenizer objective (BEiT) reads precomputed ids here, as HF's model gets its labels;
    # the step with the tokenizer is timed as a third call per round (tokenizer_step).
    tokens = token_labels_shape(pretrained.build_objective(config)) is not None
    setup = build_train_setup(config, precomputed_tokens=tokens)
    # The same images as the JAX step sees after its on-device normalisation.
    images = np.asarray(data.normalize_images(jax.device_get(setup.batch["image"]),
                                              config.data))
    if torch_process == "shared":
        import torch
        torch.set_num_threads(threads)
        torch_side = contextlib.nullcontext(torch_step_cls(config, images))
    else:
        torch_side = TorchStepProcess(torch_step_cls, config, images, threads)
    with torch_side as torch_step:
        return _compare(config, threads, steps, warmup, tokenizer_step, setup, tokens,
                        torch_step, torch_process)


def _compare(config, threads, steps, warmup, tokenizer_step, setup, tokens, torch_step,
             torch_process) -> dict:
    compiled, compile_times = compile_step(setup)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state.params))
    jax_step = StepRunner(compiled, setup.state, setup.batch)
    per_device = config.batch_size // setup.mesh.devices.size
    with_tok = _tokenizer_step(config, per_device) if tokens and tokenizer_step else None
    fns = {"mim_jax": jax_step, "torch": torch_step}
    if with_tok:
        fns["mim_jax_with_tokenizer"] = with_tok[0]
    calls = interleaved_calls(fns, steps, warmup)
    jax_t, torch_t = call_summary(calls["mim_jax"]), call_summary(calls["torch"])
    masking_times = measure_masking(config, setup.mesh, steps, warmup)
    train_flops = setup.objective.flops_per_image
    per_sec = lambda t: config.batch_size / t["median_s"]
    masking_s = masking_times["forward_backward"]
    result = {
        "mode": "compare_torch", "environment": environment(threads),
        "model": describe_model(config),
        "threads": {"xla_cpu_pool (PJRT_NPROC)": int(os.environ["PJRT_NPROC"]),
                    "torch.get_num_threads": torch_step.describe()["torch_threads"],
                    "process_affinity_cores": usable_cores()},
        "malloc_env": allocator_variables(os.environ),  # PyTorch's own: torch.malloc_env
        "allocator_policy": allocator.apply_cpu_policy(),  # in force in this process
        "torch_process": torch_process,
        "mim_jax": {"step_time": jax_t, "images_per_sec": per_sec(jax_t),
                    "compile": compile_times, "parameters": n_params,
                    "xla_memory": xla_memory(compiled),
                    "final_loss": float(jax_step.metrics["loss"]),
                    "achieved_flops_per_sec": per_sec(jax_t) * train_flops},
        "torch": dict(torch_step.describe(), step_time=torch_t, images_per_sec=per_sec(torch_t),
                      final_loss=torch_step.loss,
                      achieved_flops_per_sec=per_sec(torch_t) * train_flops),
        "torch_over_mim_jax": torch_t["median_s"] / jax_t["median_s"],
        "torch_over_mim_jax_paired_wall": paired_ratios(calls["torch"], calls["mim_jax"],
                                                        "wall_s"),
        "torch_over_mim_jax_cpu": _cpu_ratio(torch_t, jax_t),
        "flops": flops_report(config, compiled, per_device),
        "masking": dict(masking_times,
                        share_of_step=masking_s["median_s"] / jax_t["median_s"],
                        share_of_step_min=masking_s["min_s"] / jax_t["min_s"]),
        "order": "interleaved per round: " + ", ".join(fns),
    }
    if tokens:
        result["labels"] = ("precomputed token ids in the batch (mim_jax) / random ids at the "
                            "masked positions (torch): neither runs a tokenizer")
    if with_tok:
        tok_t = call_summary(calls["mim_jax_with_tokenizer"])
        result["mim_jax_with_tokenizer"] = dict(
            with_tok[1], step_time=tok_t, images_per_sec=per_sec(tok_t),
            final_loss=float(with_tok[0].metrics["loss"]),
            tokenizer=config.objective.tokenizer.get("name"),
            tokenizer_share=_tokenizer_share(calls, tok_t, jax_t),
            torch_over_it=torch_t["median_s"] / tok_t["median_s"],
            torch_over_it_cpu=_cpu_ratio(torch_t, tok_t))
    return result



def _model_label(model: dict) -> str:
    """'MAE B/16' or 'SimMIM Swin-B window 6'."""
    if model["objective"] == "mae":
        return f"MAE {model['variant']}"
    if model["objective"] == "beit":
        obj = model["objective_config"]
        head = obj.get("cls_head_layers", 0)
        return (f"BEiT {model['variant']}, {obj['tokenizer']['name']} vocabulary"
                + (f", CLS head {head} blocks over block {obj.get('early_layers')}" if head
                   else ""))
    label = f"{model['objective']} {model['backbone']}-{model['variant']}"
    window = model["arch"].get("window_size")
    return label.replace("simmim", "SimMIM").replace("swin", "Swin") + (
        f" window {window}" if window else "")


def compare_rows(r: dict) -> list:
    """The table of run_compare_torch's result (mim_jax.benchmark.report prints it)."""
    j, t, paired = r["mim_jax"], r["torch"], r["torch_over_mim_jax_paired_wall"]
    return [
        ("model", f"{_model_label(r['model'])} @ {r['model']['image_size']} px, batch "
                  f"{r['model']['batch_size']}, float32, CPU"),
        ("threads", ", ".join(f"{k} {v}" for k, v in r["threads"].items())),
        ("mim_jax allocator", ("mallopt policy of mim_jax/allocator.py" if r["allocator_policy"]
                               else "glibc defaults") + "".join(
            f", {k}={v}" for k, v in r["malloc_env"].items())),
        ("torch process", "shared with mim_jax" if "process" not in t else
         "its own, malloc env " + (", ".join(f"{k}={v}" for k, v in t["malloc_env"].items())
                                   or "default")),
        ("mim_jax step", step_line(j["step_time"]) + f"  ({j['images_per_sec']:.2f} img/s)"),
        ("torch step", step_line(t["step_time"]) + f"  ({t['images_per_sec']:.2f} img/s, "
                       f"attn {t['attn_implementation']})"),
        ("torch / mim_jax (median)", f"{r['torch_over_mim_jax']:.3f}"),
        ("torch / mim_jax (per round)", f"median {paired['median']:.3f}, range "
                                        f"{paired['min']:.3f}-{paired['max']:.3f}"),
        ("mim_jax per step", cpu_line(j["step_time"])),
        ("torch per step", cpu_line(t["step_time"])),
        ("torch / mim_jax (CPU time)", fmt_ratio(r["torch_over_mim_jax_cpu"])),
        ("XLA temp buffer", "n/a" if not j["xla_memory"]
         else f"{j['xla_memory']['temp'] / 2**30:.2f} GiB"),
        ("train FLOPs/img analytic / XLA", f"{fmt_flops(r['flops']['analytic_train_per_image'])}"
                                           f" / {fmt_flops(r['flops']['xla_train_per_image'])}"),
        ("achieved mim_jax / torch", f"{j['achieved_flops_per_sec'] / 1e9:.1f} / "
                                     f"{t['achieved_flops_per_sec'] / 1e9:.1f} GFLOP/s"),
        ("masking fwd+bwd (isolated)", step_line(r["masking"]["forward_backward"])),
        ("masking share of mim_jax step", f"{fmt_pct(r['masking']['share_of_step'])} (median),"
                                          f" {fmt_pct(r['masking']['share_of_step_min'])} (min)"),
    ] + _tokenizer_rows(r)


def _tokenizer_rows(r: dict) -> list:
    rows = [("labels", r["labels"])] if r.get("labels") else []
    t = r.get("mim_jax_with_tokenizer")
    if not t:
        return rows
    share, paired = t["tokenizer_share"], t["tokenizer_share"]["with_over_without_paired_wall"]
    return rows + [
        (f"mim_jax step + {t['tokenizer']} tokenizer",
         step_line(t["step_time"]) + f"  ({t['images_per_sec']:.2f} img/s)"),
        ("  per step", cpu_line(t["step_time"])),
        ("  XLA compile", fmt_seconds(t["compile"]["compile_s"])),
        ("  train FLOPs/img XLA", fmt_flops(t["xla_train_flops_per_image"])),
        ("tokenizer share of step", f"{fmt_pct(share['share_of_step'])} (medians), "
                                    f"{fmt_pct(share['share_of_step_cpu'])} (CPU time); "
                                    f"with / without per round: median {paired['median']:.3f}"),
        ("torch / mim_jax with tokenizer", f"{t['torch_over_it']:.3f} (wall), "
                                           f"{fmt_ratio(t['torch_over_it_cpu'])} (CPU)"),
    ]
