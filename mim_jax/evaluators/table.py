"""The evaluation table of `python -m mim_jax.evaluate` (kept apart from its flags)."""
from __future__ import annotations


def markdown_table(result: dict) -> str:
    """The table `python -m mim_jax.evaluate` prints: a row per encoder (pretrained, random
    init, raw pixels) and pooling (mean, CLS), columns kNN / linear probe / fine-tune."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
    frozen, finetune = result["frozen"], result.get("finetune", {})
    seeds = len(frozen["random_init_runs"])
    has_cls = "knn_cls" in frozen["pretrained"]
    rows = []
    for suffix, pooled in ([("", "mean of patches"), ("_cls", "CLS token")] if has_cls
                           else [("", "mean of the last map")]):
        rows += [(f"pretrained encoder, {pooled}", frozen["pretrained"], suffix,
                  finetune.get("pretrained") if not suffix else None),
                 (f"same encoder at random init (mean of {seeds}), {pooled}",
                  frozen["random_init"], suffix, finetune.get("scratch") if not suffix else None)]
    rows.append(("raw pixels", frozen["raw_pixels"], "", None))
    lines = ["| | kNN top-1 (%) | linear probe top-1 (%) | fine-tune top-1 (%) |",
             "|---|---|---|---|"]
    for name, scores, suffix, ft in rows:
        lines.append(f"| {name} | {pct(scores[f'knn{suffix}'])} | "
                     f"{pct(scores[f'linear_probe{suffix}'])} | "
                     f"{pct(ft['top1'] if ft else None)} |")
    return "\n".join(lines)
