"""The benchmark's output: a two-column table on stdout and, optionally, every figure as JSON."""
from __future__ import annotations

import json
from typing import Callable, Optional


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.3f} s"


def fmt_flops(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f} GFLOP"


def fmt_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def step_line(t: dict) -> str:
    return f"median {fmt_seconds(t['median_s'])}, min {fmt_seconds(t['min_s'])}"


def _train_rows(r: dict) -> list:
    t, f = r["train_step"], r["train_step"]["flops"]
    rows = [
        ("model", f"{r['model']['objective']} {r['model']['variant']} @ "
                  f"{r['model']['image_size']} px, batch {r['model']['batch_size']}, "
                  f"{r['model']['dtype']}"),
        ("trace + lower", fmt_seconds(t["compile"]["trace_lower_s"])),
        ("XLA compile", fmt_seconds(t["compile"]["compile_s"])),
        ("step time", step_line(t["step_time"])),
        ("per step", cpu_line(t["step_time"])),
        ("XLA temp buffer", "n/a" if not t["xla_memory"]
         else f"{t['xla_memory']['temp'] / 2**30:.2f} GiB"),
        ("images/s (on-device synthetic)", f"{t['images_per_sec']:.1f}"),
        ("train FLOPs/img analytic", fmt_flops(f["analytic_train_per_image"])),
        ("train FLOPs/img XLA", fmt_flops(f["xla_train_per_image"])),
        ("XLA / analytic", ("n/a" if f["xla_over_analytic"] is None
                            else f"{f['xla_over_analytic']:.3f}")
         + (f"  [{f['xla_note']}]" if f.get("xla_note") else "")),
        (f"achieved ({t.get('achieved_flops_source', 'analytic')})",
         "n/a" if t["achieved_flops_per_sec"] is None
         else f"{t['achieved_flops_per_sec'] / 1e12:.4f} TFLOP/s"),
        ("MFU", fmt_pct(t["mfu"]) + f"  [{t['peak_flops_source']}"
                + ("; --peak_flops sets one]" if t["mfu"] is None else "]")),
        ("images/s, steps back to back", "n/a" if "back_to_back" not in t else
         f"{t['back_to_back']['images_per_sec']:.1f}, MFU {fmt_pct(t['back_to_back']['mfu'])}"
         "  [dispatched without waiting, as the trainer does]"),
        ("peak memory", f"{t['memory']['bytes'] / 2**30:.2f} GiB  [{t['memory']['source']}]"),
    ]
    if "note" in t["masking"]:
        rows.append(("masking", t["masking"]["note"]))
    else:
        rows += [
            ("masking fwd+bwd (isolated)", step_line(t["masking"]["forward_backward"])),
            ("masking share of step", f"{fmt_pct(t['masking']['share_of_step'])} (median), "
                                      f"{fmt_pct(t['masking']['share_of_step_min'])} (min)"),
        ]
    loop = r.get("input_pipeline_loop")
    if loop:
        real, synthetic = loop["pipeline"], loop["on_device_synthetic"]
        rows += [
            (f"loop images/s, {loop['data']} pipeline",
             f"{real['images_per_sec']:.1f} (waits {fmt_seconds(real['batch_wait_s_per_step'])}"
             "/step for a batch)"),
            ("loop images/s, on-device synthetic", f"{synthetic['images_per_sec']:.1f}"),
            ("pipeline / synthetic", f"{loop['pipeline_over_synthetic']:.3f}"),
        ]
    return rows


def _stage_rows(stages: dict) -> list:
    if "error" in stages:
        return [("stages", stages["error"])]
    return [(f"  {name}", f"{s['cpu_ms_per_image']:.2f} ms CPU/img "
                          f"({s['images_per_cpu_second']:.0f} img per CPU-second)")
            for name, s in stages.items()]


def _input_rows(r: dict) -> list:
    d, i = r["dataset"], r["input"]
    return [
        ("dataset", f"{d['images']} {d['description']}, mean {d['mean_pixels'] ** 0.5:.0f} px "
                    f"side, {d['mean_bytes'] / 1024:.1f} KiB"),
        ("augmentation", f"decode+RandomResizedCrop{tuple(r['augmentation']['crop_scale'])} "
                         f"{r['augmentation']['interpolation']} -> "
                         f"{r['augmentation']['image_size']} px, flip, uint8 "
                         "(normalised on the device)"),
        ("images/s", f"{i['images_per_sec']:.1f} ({i['images']} images)"),
        ("tf.data threads (cores)", str(i["cores"])),
        ("images/s per core", f"{i['images_per_sec_per_core']:.1f}"),
        ("images per process CPU-second", "n/a" if i["images_per_cpu_second"] is None
         else f"{i['images_per_cpu_second']:.1f}"),
        ("stages, one thread (cumulative)", ""),
    ] + _stage_rows(r["stages_one_thread"])


def cpu_line(t: dict) -> str:
    return (f"CPU median {t['cpu_median_s']:.2f} s (user {t['user_median_s']:.2f}, "
            f"kernel {t['sys_median_s']:.2f}), {t['minor_faults_median']:.0f} page faults")


def _compare_steps_rows(r: dict) -> list:
    rows = [("threads", f"{r['threads']} (XLA CPU pool {r['xla_cpu_pool']})"),
            ("ratios", f"step time / the step of {r['reference']}, per round (median)")]
    for label, e in r["steps"].items():
        paired = e["step_over_first_paired_wall"]
        rows += [
            (label, f"batch {e['batch_size']} @ {e['image_size']} px: " + step_line(e["step_time"])
                    + f"  ({e['images_per_sec']:.2f} img/s)"),
            ("  step / reference", f"{paired['median']:.3f} (range {paired['min']:.3f}-"
                                   f"{paired['max']:.3f})"),
            ("  train FLOPs/img XLA", fmt_flops(e["xla_train_flops_per_image"])
             + ("" if not e["achieved_flops_per_sec"] else
                f", achieved {e['achieved_flops_per_sec'] / 1e9:.1f} GFLOP/s")),
            ("  compile / XLA temp", f"{fmt_seconds(e['compile']['compile_s'])} / " + (
                "n/a" if not e["xla_memory"] else f"{e['xla_memory']['temp'] / 2**30:.2f} GiB")),
        ]
    return rows


def format_table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)


ROWS = {"train": _train_rows, "input": _input_rows, "compare_steps": _compare_steps_rows}


def report(result: dict, json_out: Optional[str],
           rows_of: Optional[Callable[[dict], list]] = None) -> None:
    """Prints the table of `result` (rows_of(result), by default its mode's rows) and writes
    every figure to json_out."""
    print(format_table((rows_of or ROWS[result["mode"]])(result)), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2, default=str)
