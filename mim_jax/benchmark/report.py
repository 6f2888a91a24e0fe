"""The benchmark's output: a two-column table on stdout and, optionally, every figure as JSON."""
from __future__ import annotations

import json
from typing import Optional

from mim_jax import cpu_dots


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.3f} s"


def _fmt_flops(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f} GFLOP"


def _fmt_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _step_line(t: dict) -> str:
    return f"median {_fmt_seconds(t['median_s'])}, min {_fmt_seconds(t['min_s'])}"


def _products(compile_record: dict) -> str:
    """', products: oneDNN' (or 'MKL ... + oneDNN') for a CPU step whose products do not
    all run on XLA's own kernels (cpu_dots)."""
    library = compile_record.get("products")
    if not library or library == "xla":
        return ""
    return ", products: " + cpu_dots.describe(library)


def _train_rows(r: dict) -> list:
    t, f = r["train_step"], r["train_step"]["flops"]
    rows = [
        ("model", f"{r['model']['objective']} {r['model']['variant']} @ "
                  f"{r['model']['image_size']} px, batch {r['model']['batch_size']}, "
                  f"{r['model']['dtype']}, matmul inputs "
                  f"{r['model'].get('matmul_precision', 'float32')}"),
        ("trace + lower", _fmt_seconds(t["compile"]["trace_lower_s"])),
        ("XLA compile", _fmt_seconds(t["compile"]["compile_s"]) + _products(t["compile"])),
        ("step time", _step_line(t["step_time"])),
        ("per step", _cpu_line(t["step_time"])),
        ("XLA temp buffer", "n/a" if not t["xla_memory"]
         else f"{t['xla_memory']['temp'] / 2**30:.2f} GiB"),
        ("images/s (on-device synthetic)", f"{t['images_per_sec']:.1f}"),
        ("train FLOPs/img analytic", _fmt_flops(f["analytic_train_per_image"])),
        ("train FLOPs/img XLA", _fmt_flops(f["xla_train_per_image"])),
        ("XLA / analytic", ("n/a" if f["xla_over_analytic"] is None
                            else f"{f['xla_over_analytic']:.3f}")
         + (f"  [{f['xla_note']}]" if f.get("xla_note") else "")),
        (f"achieved ({t.get('achieved_flops_source', 'analytic')})",
         "n/a" if t["achieved_flops_per_sec"] is None
         else f"{t['achieved_flops_per_sec'] / 1e12:.4f} TFLOP/s"),
        ("MFU", _fmt_pct(t["mfu"]) + f"  [{t['peak_flops_source']}"
                + ("; --peak_flops sets one]" if t["mfu"] is None else "]")),
        ("images/s, steps back to back", "n/a" if "back_to_back" not in t else
         f"{t['back_to_back']['images_per_sec']:.1f}, MFU {_fmt_pct(t['back_to_back']['mfu'])}"
         "  [dispatched without waiting, as the trainer does]"),
        ("peak memory", f"{t['memory']['bytes'] / 2**30:.2f} GiB  [{t['memory']['source']}]"),
    ]
    if "note" in t["masking"]:
        rows.append(("masking", t["masking"]["note"]))
    else:
        rows += [
            ("masking fwd+bwd (isolated)", _step_line(t["masking"]["forward_backward"])),
            ("masking share of step", f"{_fmt_pct(t['masking']['share_of_step'])} (median), "
                                      f"{_fmt_pct(t['masking']['share_of_step_min'])} (min)"),
        ]
    rows += _profile_rows(t.get("profile"))
    loop = r.get("input_pipeline_loop")
    if loop:
        real, synthetic = loop["pipeline"], loop["on_device_synthetic"]
        rows += [
            (f"loop images/s, {loop['data']} pipeline",
             f"{real['images_per_sec']:.1f} (waits {_fmt_seconds(real['batch_wait_s_per_step'])}"
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


def _cpu_line(t: dict) -> str:
    return (f"CPU median {t['cpu_median_s']:.2f} s (user {t['user_median_s']:.2f}, "
            f"kernel {t['sys_median_s']:.2f}), {t['minor_faults_median']:.0f} page faults")


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


def _compare_rows(r: dict) -> list:
    j, t, paired = r["mim_jax"], r["torch"], r["torch_over_mim_jax_paired_wall"]
    return [
        ("model", f"{_model_label(r['model'])} @ {r['model']['image_size']} px, batch "
                  f"{r['model']['batch_size']}, float32, matmul inputs "
                  f"{r['model'].get('matmul_precision', 'float32')}, CPU"),
        ("threads", ", ".join(f"{k} {v}" for k, v in r["threads"].items())),
        ("malloc env (mim_jax)", ", ".join(f"{k}={v}" for k, v in r["malloc_env"].items())
         or "default"),
        ("torch process", "shared with mim_jax" if "process" not in t else
         "its own, malloc env " + (", ".join(f"{k}={v}" for k, v in t["malloc_env"].items())
                                   or "default")),
        ("mim_jax step", _step_line(j["step_time"]) + f"  ({j['images_per_sec']:.2f} img/s)"
                         + _products(j["compile"])),
        ("torch step", _step_line(t["step_time"]) + f"  ({t['images_per_sec']:.2f} img/s, "
                       f"attn {t['attn_implementation']}, autocast "
                       f"{t.get('autocast', 'off (float32)')})"),
        ("torch / mim_jax (median)", f"{r['torch_over_mim_jax']:.3f}"),
        ("torch / mim_jax (per round)", f"median {paired['median']:.3f}, range "
                                        f"{paired['min']:.3f}-{paired['max']:.3f}"),
        ("mim_jax per step", _cpu_line(j["step_time"])),
        ("torch per step", _cpu_line(t["step_time"])),
        ("torch / mim_jax (CPU time)", _fmt_ratio(r["torch_over_mim_jax_cpu"])),
        ("XLA temp buffer", "n/a" if not j["xla_memory"]
         else f"{j['xla_memory']['temp'] / 2**30:.2f} GiB"),
        ("train FLOPs/img analytic / XLA", f"{_fmt_flops(r['flops']['analytic_train_per_image'])}"
                                           f" / {_fmt_flops(r['flops']['xla_train_per_image'])}"),
        ("achieved mim_jax / torch", f"{j['achieved_flops_per_sec'] / 1e9:.1f} / "
                                     f"{t['achieved_flops_per_sec'] / 1e9:.1f} GFLOP/s"),
        ("masking fwd+bwd (isolated)", _step_line(r["masking"]["forward_backward"])),
        ("masking share of mim_jax step", f"{_fmt_pct(r['masking']['share_of_step'])} (median),"
                                          f" {_fmt_pct(r['masking']['share_of_step_min'])} (min)"),
    ] + _tokenizer_rows(r) + _profile_rows(r.get("profile"))


def _tokenizer_rows(r: dict) -> list:
    rows = [("labels", r["labels"])] if r.get("labels") else []
    t = r.get("mim_jax_with_tokenizer")
    if not t:
        return rows
    share, paired = t["tokenizer_share"], t["tokenizer_share"]["with_over_without_paired_wall"]
    return rows + [
        (f"mim_jax step + {t['tokenizer']} tokenizer",
         _step_line(t["step_time"]) + f"  ({t['images_per_sec']:.2f} img/s)"),
        ("  per step", _cpu_line(t["step_time"])),
        ("  XLA compile", _fmt_seconds(t["compile"]["compile_s"])),
        ("  train FLOPs/img XLA", _fmt_flops(t["xla_train_flops_per_image"])),
        ("tokenizer share of step", f"{_fmt_pct(share['share_of_step'])} (medians), "
                                    f"{_fmt_pct(share['share_of_step_cpu'])} (CPU time); "
                                    f"with / without per round: median {paired['median']:.3f}"),
        ("torch / mim_jax with tokenizer", f"{t['torch_over_it']:.3f} (wall), "
                                           f"{_fmt_ratio(t['torch_over_it_cpu'])} (CPU)"),
    ]


def _profile_rows(profile: Optional[dict]) -> list:
    if not profile:
        return []
    if "error" in profile:
        return [("profile", profile["error"])]
    rows = [("profile: XLA thunk time", f"{_fmt_seconds(profile['thunk_seconds_per_step'])}"
                                        "/step")]
    rows += [(f"  {name}", f"{_fmt_seconds(c['seconds_per_step'])}/step ({_fmt_pct(c['share'])})")
             for name, c in profile["categories"].items()]
    describe = lambda op: f"{op['name']} [{', '.join(op['opcodes'][:6])}] {_fmt_pct(op['share'])}"
    rows += [(f"  top op {i + 1}", describe(op)) for i, op in enumerate(profile["top_ops"][:3])]
    rows += [(f"  top {kind.split(' ')[0]} op", describe(ops[0]))
             for kind, ops in profile["top_ops_by_category"].items() if kind != "matmul / conv"]
    return rows


def _compare_steps_rows(r: dict) -> list:
    rows = [("threads", f"{r['threads']} (XLA CPU pool {r['xla_cpu_pool']})"),
            ("ratios", f"step time / the step of {r['reference']}, per round (median)")]
    for label, e in r["steps"].items():
        paired = e["step_over_first_paired_wall"]
        rows += [
            (label, f"batch {e['batch_size']} @ {e['image_size']} px: " + _step_line(e["step_time"])
                    + f"  ({e['images_per_sec']:.2f} img/s)"),
            ("  step / reference", f"{paired['median']:.3f} (range {paired['min']:.3f}-"
                                   f"{paired['max']:.3f})"),
            ("  train FLOPs/img XLA", _fmt_flops(e["xla_train_flops_per_image"])
             + ("" if not e["achieved_flops_per_sec"] else
                f", achieved {e['achieved_flops_per_sec'] / 1e9:.1f} GFLOP/s")),
            ("  compile / XLA temp", f"{_fmt_seconds(e['compile']['compile_s'])} / " + (
                "n/a" if not e["xla_memory"] else f"{e['xla_memory']['temp'] / 2**30:.2f} GiB")),
        ] + [("  " + k, v) for k, v in _profile_rows(e.get("profile"))]
    return rows


def _compare_attention_rows(r: dict) -> list:
    rows = [("batch", str(r["batch"]))]
    if r.get("products"):
        rows.append(("mim_jax products", r["products"]))
    for s in r["shapes"]:
        shape = s["shape"]
        calls = (f"{r['batch']}" if shape["windows"] == 1
                 else f"{r['batch']} x {shape['windows']} windows")
        bias = f", {shape['bias'].replace('_', '-')} bias" if shape["bias"] else ""
        rows.append((shape["label"], f"[{calls}, {shape['tokens']} tokens, "
                                     f"{shape['heads']} heads, {shape['head_dim']}]{bias} "
                                     f"x {shape['layers']} layers"))
        for name, t in s["times"].items():
            gflops = s["flops"] / t["median_s"] / 1e9
            rows.append((f"  {name}", f"median {_fmt_seconds(t['median_s'])} (min "
                                      f"{_fmt_seconds(t['min_s'])}), {gflops:.0f} GFLOP/s; "
                                      f"{_fmt_seconds(s['per_step_s'][name])} per step"))
        p = s["sdpa_over_mim_jax_paired"]
        rows.append(("  torch sdpa / mim_jax", f"{p['median']:.3f} per round (range "
                                               f"{p['min']:.3f}-{p['max']:.3f})"))
    return rows


def _compare_products_rows(r: dict) -> list:
    total = r["per_step_s"]
    rows = [("batch", str(r["batch"])), ("mim_jax products", r["products"]),
            ("products per step", f"{r['calls_per_step']} calls of {r['distinct_products']} "
                                  f"shapes, {r['gflop_per_step']:.0f} GFLOP"),
            ("mim_jax, each alone", f"{_fmt_seconds(total['mim_jax'])} per step "
                                    f"({r['gflop_per_step'] / total['mim_jax']:.0f} GFLOP/s)"),
            ("torch.einsum, each alone", f"{_fmt_seconds(total['torch'])} per step "
                                         f"({r['gflop_per_step'] / total['torch']:.0f} GFLOP/s)"),
            ("torch / mim_jax", f"{r['torch_over_mim_jax']:.3f}")]
    for i, p in enumerate(r["largest_losses"]):
        lost = p["per_step_s"]["mim_jax"] - p["per_step_s"]["torch"]
        rate = p["gflops_per_sec"]
        rows.append((f"  loss {i + 1}", f"{p['einsum']} {p['lhs']} x {p['rhs']} "
                                        f"x{p['calls_per_step']}: {lost * 1e3:+.1f} ms per step "
                                        f"({rate['mim_jax']:.0f} vs {rate['torch']:.0f} "
                                        "GFLOP/s)"))
    return rows


def format_table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)


def report(result: dict, json_out: Optional[str]) -> None:
    rows = {"train": _train_rows, "input": _input_rows, "compare_torch": _compare_rows,
            "compare_steps": _compare_steps_rows, "compare_attention": _compare_attention_rows,
            "compare_products": _compare_products_rows}
    print(format_table(rows[result["mode"]](result)), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2, default=str)
