"""Does pretraining help? One table: pretrained encoder vs the same encoder at random init vs
raw pixels, on kNN, a linear probe and fine-tuning.

  python -m mim_jax.evaluate --config configs/mae.py:quickstart --workdir runs/mae_quickstart

pretrains first when the workdir has no finished run (the same code path as mim_jax.main),
then on the labelled splits of config.data (train -> eval_split):
  - kNN (k=20, T=0.07, cosine) and the linear probe of evaluators/probe.py (L-BFGS logistic
    regression, its l2 chosen on a validation part of train) on frozen features: mean-pooled
    and, where the encoder has one, the CLS token; for the pretrained encoder, the same encoder
    at random initialisation (3 seeds, mean) and raw pixels;
  - fine-tuning (configs/finetune.py quickstart recipe) of the pretrained encoder and of the
    same encoder from random initialisation, with the same budget (--finetune_epochs);
    top-1 of the last epoch is reported (the best epoch is in each run's best.json).
A BEiT-3 run (its config has a `text` block) is also evaluated on what it learns from text:
  - image-text retrieval (recall@1 / @5 both ways on eval_split) after a short contrastive
    fine-tune (evaluators/retrieval.py) of the pretrained encoder and of the same encoder at
    random initialisation (--random_seeds, mean);
  - masked-token accuracy of each stream on batches it did not train on, next to always
    answering the most frequent masked target (evaluators/masked_tokens.py);
and its Multiway encoder is fine-tuned on labels like any other, on images alone.
Writes WORKDIR/evaluation.md and evaluation.json and prints the table.
"""
from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":  # first: before anything starts threads (mim_jax/allocator.py)
    from mim_jax.allocator import apply_cpu_policy
    apply_cpu_policy()

from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import paths
from mim_jax.config_file import load_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The pretraining config, e.g. configs/mae.py:quickstart.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir (pretrained if missing): "
                                "a local path or gs://BUCKET/path.")
_FINETUNE = flags.DEFINE_string("finetune_config", "configs/finetune.py",
                                "Fine-tuning config file; its quickstart recipe is used.")
_FT_EPOCHS = flags.DEFINE_float("finetune_epochs", 0.0, "Fine-tuning epochs (0 = the config's).")
_SEEDS = flags.DEFINE_integer("random_seeds", 3, "Random initialisations averaged.")
_SKIP_FT = flags.DEFINE_bool("skip_finetune", False,
                             "No fine-tuning on labels: kNN and the linear probe (and a BEiT-3 "
                             "run's retrieval and masked tokens) only.")
_RETRIEVAL_STEPS = flags.DEFINE_integer("retrieval_steps", 300,
                                        "BEiT-3: contrastive fine-tuning steps before retrieval.")
_RETRIEVAL_BATCH = flags.DEFINE_integer("retrieval_batch", 64,
                                        "BEiT-3: image-caption pairs per fine-tuning step.")
_RETRIEVAL_LR = flags.DEFINE_float("retrieval_lr", 1e-3,
                                   "BEiT-3: peak learning rate of the contrastive fine-tune.")
flags.mark_flags_as_required(["config", "workdir"])


def _finished(workdir) -> bool:
    return (workdir / "final_metrics.json").is_file()


def _frozen_scores(config, workdir: str, seeds: int) -> dict:
    """{'pretrained' | 'random_init' | 'raw_pixels': {'knn': top-1, 'linear_probe': top-1,
    'linear_probe_l2': chosen l2, and the same with '_cls' for the CLS token}}; random_init is
    the mean over `seeds` initialisations (each in 'random_init_runs')."""
    import jax
    import numpy as np
    from mim_jax import pretrained, sharding
    from mim_jax.evaluators import features, knn, probe
    from mim_jax.models.classifier import encoder_has_cls

    mesh = sharding.make_mesh()
    objective = pretrained.build_objective(config)
    data_cfg = config.data
    # Mean-pooled features always; the CLS token too where the encoder has one.
    pools = {"": "gap", "_cls": "cls"} if encoder_has_cls(objective.encoder) else {"": "gap"}
    feature_fns = {suffix: features.make_feature_fn(objective.encoder, pool, mesh, data_cfg)
                   for suffix, pool in pools.items()}
    splits = (data_cfg.split, data_cfg.eval_split)

    def scores(train, test, suffix=""):
        fit = probe.linear_probe(*train, *test)
        return {f"knn{suffix}": knn.knn_accuracy(*train, *test),
                f"linear_probe{suffix}": fit.accuracy, f"linear_probe{suffix}_l2": fit.l2}

    def encoder_scores(params, model_state):
        stats = features.encoder_batch_stats(model_state, key)
        out = {}
        for suffix, fn in feature_fns.items():
            train, test = (features.extract(fn, params, data_cfg, s, batch_size=500,
                                            mesh=mesh, batch_stats=stats) for s in splits)
            out.update(scores(train, test, suffix))
        return out

    key = objective.encoder_keys[0]
    encoder = pretrained.load_encoder(workdir)
    # An encoder with BatchNorm also needs the statistics of that checkpoint.
    state = ({"batch_stats": {key: encoder.batch_stats}} if encoder.batch_stats is not None
             else {})
    out = {"pretrained": encoder_scores(encoder.params, state)}
    # The objective's own init (BEiT rescales it after init), at other seeds than the run's.
    inits = (objective.init_variables(jax.random.key(1000 + s)) for s in range(seeds))
    runs = [encoder_scores(params[key], model_state) for params, model_state in inits]
    out["random_init"] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]
                          if not k.endswith("_l2")}
    out["random_init_runs"] = runs
    out["raw_pixels"] = scores(*(features.raw_pixels(data_cfg, s) for s in splits))
    return out


def _text_scores(config, workdir, seeds: int) -> dict:
    """BEiT-3: {'retrieval': {'pretrained', 'random_init' (mean of `seeds`),
    'random_init_runs'}, 'masked_tokens': {stream: {'accuracy', 'most_frequent_token'}}}."""
    import jax
    import numpy as np
    from mim_jax import checkpointing, pretrained
    from mim_jax.data import text as text_data
    from mim_jax.evaluators import masked_tokens, retrieval

    objective = pretrained.build_objective(config)
    tokenizer = text_data.load_tokenizer(config.text, text_data.build_dir_of(workdir))
    key = objective.encoder_keys[0]
    run_dir, step = pretrained.resolve_checkpoint(workdir)
    directory = run_dir / "checkpoints"
    params, model_state = checkpointing.restore_raw(
        directory, checkpointing.latest_step(directory) if step is None else step,
        ("params", "model_state"))

    def recall(params, seed):
        return retrieval.retrieval_scores(
            objective.encoder, params, config.data, config.text, tokenizer,
            steps=_RETRIEVAL_STEPS.value, batch_size=_RETRIEVAL_BATCH.value,
            learning_rate=_RETRIEVAL_LR.value, seed=seed, test_split=config.data.eval_split,
            split=config.data.split)

    out = {"retrieval": {"pretrained": recall(params[key], 0)}}
    runs = [recall(objective.init_variables(jax.random.key(1000 + s))[0][key], s)
            for s in range(seeds)]
    out["retrieval"]["random_init"] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    out["retrieval"]["random_init_runs"] = runs
    batches = masked_tokens.eval_batches(config, tokenizer,
                                         objective.stream_sizes(config.batch_size), steps=20)
    out["masked_tokens"] = masked_tokens.masked_token_accuracy(objective, params, model_state,
                                                               batches, config.data)
    return out


def _finetune(workdir: str, ft_config_path: str, pretrained: bool, epochs: float) -> dict:
    from mim_jax import train
    arg = f"quickstart,pretrained={workdir}" + (f",epochs={epochs}" if epochs else "")
    config = load_config(f"{ft_config_path}:{arg}", flag="--finetune_config")
    config.data.data_dir = _CONFIG.value.data.data_dir
    if not pretrained:
        config.finetune.pretrained = ""  # same encoder and budget, random initialisation
    out_dir = workdir / ("finetune_pretrained" if pretrained else "finetune_scratch")
    start = time.perf_counter()
    train.train_and_evaluate(config, out_dir)
    history = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "classification/top1" in record:
            history.append(record)
    return {"top1": history[-1]["classification/top1"], "epochs": config.num_epochs,
            "wall_seconds": time.perf_counter() - start, "workdir": str(out_dir)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mim_jax import reporting, train
    from mim_jax.evaluators.table import markdown_table
    logging.get_absl_handler().addFilter(reporting.QuietLibraries())
    config, workdir = _CONFIG.value, paths.resolve(_WORKDIR.value)
    result, walls = {"config": flags.FLAGS["config"].serialize(), "workdir": str(workdir)}, {}
    if not _finished(workdir):
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        walls["pretrain"] = time.perf_counter() - start
    start = time.perf_counter()
    result["frozen"] = _frozen_scores(config, workdir, _SEEDS.value)
    walls["knn_and_probe"] = time.perf_counter() - start
    if config.get("text") is not None:
        start = time.perf_counter()
        result.update(_text_scores(config, workdir, _SEEDS.value))
        walls["retrieval_and_masked_tokens"] = time.perf_counter() - start
    if not _SKIP_FT.value:
        result["finetune"] = {
            "pretrained": _finetune(workdir, _FINETUNE.value, True, _FT_EPOCHS.value),
            "scratch": _finetune(workdir, _FINETUNE.value, False, _FT_EPOCHS.value)}
        walls.update({f"finetune_{k}": v["wall_seconds"] for k, v in result["finetune"].items()})
    result["wall_seconds"] = walls
    table = markdown_table(result)
    summary = table + "\n\nwall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in walls.items())
    (workdir / "evaluation.json").write_text(json.dumps(result, indent=2))
    (workdir / "evaluation.md").write_text(summary + "\n")
    logging.info("Evaluation written to %s", workdir / "evaluation.md")
    print(summary)


def run():
    sys.path.insert(0, os.getcwd())  # configs/ import configs.common, as with mim_jax.main
    app.run(main)


if __name__ == "__main__":
    run()
