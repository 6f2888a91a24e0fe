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
    if "retrieval" in result:
        lines += ["", *_retrieval_table(result["retrieval"], seeds)]
    if "masked_tokens" in result:
        lines += ["", *_masked_tokens_table(result["masked_tokens"])]
    return "\n".join(lines)


def _retrieval_table(retrieval: dict, seeds: int) -> list:
    """Recall after the contrastive fine-tune, and before it (raw features)."""
    metrics = [("i2t_r1", "image->text R@1"), ("i2t_r5", "R@5"), ("t2i_r1", "text->image R@1"),
               ("t2i_r5", "R@5")]
    lines = ["| retrieval (%) | " + " | ".join(name for _, name in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for label, scores in (("pretrained encoder", retrieval["pretrained"]),
                          (f"same encoder at random init (mean of {seeds})",
                           retrieval["random_init"])):
        for prefix, when in (("", "after the contrastive fine-tune"),
                             ("zero_shot/", "raw features, no fine-tune")):
            if f"{prefix}i2t_r1" in scores:
                lines.append(f"| {label}, {when} | " + " | ".join(
                    f"{scores[prefix + k]:.1f}" for k, _ in metrics) + " |")
    return lines


def _masked_tokens_table(masked: dict) -> list:
    lines = ["| masked tokens predicted (%) | pretrained | most frequent token |", "|---|---|---|"]
    for scores in masked.values():
        lines.append(f"| {scores['what']} | {100 * scores['accuracy']:.1f} | "
                     f"{100 * scores['most_frequent_token']:.1f} |")
    return lines
