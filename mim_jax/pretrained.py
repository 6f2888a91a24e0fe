"""Pretrained weights: a mim_jax run's config, checkpoints and encoder, and the frozen weights
an objective declares (BEiT's tokenizer, VQ-KD's teacher, the encoder a classifier starts from),
read from mim_jax runs or from weights saved elsewhere: official, Hugging Face and timm files
and folders (convert.sources says which layout a path is in).

Objectives never read a file: each declares the frozen weights it needs
(objectives.base.Frozen). build_objective resolves the modules they run in (a mim_jax run's
recorded config says what they are) and load_frozen reads the weights, once, into a fresh run,
before the data is touched.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from mim_jax import checkpointing, convert, models, objectives, paths, workdir as workdir_lib
from mim_jax.convert import dall_e, official_vqkd, sizes, sources
from mim_jax.models import resize, tokenizers, vit
from mim_jax.models.tokenizers import vqkd as vqkd_tokenizer
from mim_jax.objectives import classification
from mim_jax.objectives.base import FrozenEncoder


# ---------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class PretrainedEncoder:
    """The encoder of a pretraining run: its module, parameters and the run's config."""
    module: Any  # flax.linen.Module, built from `config` exactly as pretraining built it
    params: Any  # numpy arrays
    config: Any  # ml_collections.ConfigDict of the pretraining run
    step: int
    objective: str
    # The encoder's BatchNorm statistics (the run's model_state['batch_stats'][encoder key]:
    # SparK's ResNets); None for encoders without any.
    batch_stats: Any = None


def resolve_checkpoint(path, step: Optional[int] = None):
    """A workdir, its checkpoints/ folder or one checkpoints/STEP folder (local or gs://)
    -> (workdir as an epath.Path, step)."""
    path = paths.resolve(path)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if path.name == "checkpoints":
        path = path.parent
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a mim_jax workdir (no config.json): pass the "
                         "--workdir of a pretraining run or one of its checkpoints/STEP folders.")
    return path, step


def read_run_config(workdir):
    """The config a run's checkpoints were written with (the newest recorded one)."""
    record = workdir_lib.latest_record(workdir) or epath.Path(workdir) / "config.json"
    return ml_collections.ConfigDict(json.loads(record.read_text()))


def check_shapes(params, expected, what: str) -> None:
    """Raises ValueError naming every parameter missing, unexpected or of another shape."""
    got = traverse_util.flatten_dict(params, sep="/")
    want = traverse_util.flatten_dict(expected, sep="/")
    problems = [f"{k} missing" for k in sorted(set(want) - set(got))]
    problems += [f"{k} unexpected" for k in sorted(set(got) - set(want))]
    problems += [f"{k} {tuple(np.shape(got[k]))} != {tuple(want[k].shape)}"
                 for k in sorted(set(got) & set(want)) if np.shape(got[k]) != tuple(want[k].shape)]
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


def load_encoder(path: str, step: Optional[int] = None) -> PretrainedEncoder:
    """The encoder (module + parameters, + BatchNorm statistics) of a mim_jax pretraining run.

    `path` is the run's workdir (latest checkpoint, or `step`), its checkpoints/ folder, or a
    checkpoints/STEP folder. Works for every objective (MAE, SimMIM with ViT or Swin, ...): the
    objective is rebuilt from the run's config.json and names its encoder. Raises ValueError
    listing the parameter names whose shapes do not match the encoder that config describes.
    """
    workdir, step = resolve_checkpoint(path, step)
    config = read_run_config(workdir)
    objective = build_objective(config)
    directory = workdir / "checkpoints"
    if step is None:
        step = checkpointing.latest_step(directory)
        if step is None:
            raise ValueError(f"{str(workdir)!r} has no complete checkpoint yet.")
    # One read of the checkpoint for both (each restore reads and verifies all of it).
    params, state = checkpointing.restore_raw(directory, step, ("params", "model_state"))
    key = objective.encoder_keys[0]
    expected = jax.eval_shape(objective.init, jax.random.key(0))[key]
    check_shapes(params.get(key, {}), expected, f"checkpoint {directory}/{step}")
    _, abstract_state = jax.eval_shape(objective.init_variables, jax.random.key(0))
    batch_stats = None
    if abstract_state.get("batch_stats", {}).get(key):  # e.g. SparK's ResNets
        batch_stats = (state.get("batch_stats") or {}).get(key) or None
    return PretrainedEncoder(module=objective.encoder, params=params[key], config=config,
                             step=step, objective=objective.name, batch_stats=batch_stats)


# ---------------------------------------------------------------- the mechanism

def build_objective(config) -> objectives.Objective:
    """objectives.build, with the frozen weights the objective needs resolved to the modules
    they run in (their weights are read by load_frozen)."""
    return objectives.build(config, resolve=lambda need: _RESOLVE[need.kind](config, need))


def load_frozen(config, objective, params, model_state):
    """(params, model_state) of a fresh run (host arrays) with every frozen part the objective
    declares read in. Raises ValueError naming the config field when one cannot be read."""
    variables = {"params": params, "model_state": model_state}
    for need in objective.frozen.values():
        variables = _LOAD[need.kind](config, need, variables)
    return variables["params"], variables["model_state"]


def _block(config, source: str):
    """The config block at a dotted path ('objective.teacher'), None where it is missing."""
    return functools.reduce(lambda c, k: None if c is None else c.get(k), source.split("."),
                            config)


def _at(tree, path):
    return functools.reduce(lambda t, k: t[k], path, tree)


def _replaced(tree, path, value):
    """`tree` with the entry at `path` replaced by `value` (dicts copied, not modified)."""
    if not path:
        return value
    return dict(tree, **{path[0]: _replaced(tree[path[0]], path[1:], value)})


# ---------------------------------------------------------------- tokenizers

def tokenizer(tok_cfg, image_size: int, channels: int) -> tokenizers.TokenizerSpec:
    """The tokenizer objective.tokenizer names; for a mim_jax VQ-KD run, the one it recorded."""
    if tok_cfg.get("name") == "vqkd":
        tok_cfg = _recorded_vqkd_block(vqkd_tokenizer.get_field(tok_cfg, "checkpoint")) \
            or tok_cfg
    return tokenizers.build(tok_cfg, image_size, channels)


def _recorded_vqkd_block(path) -> Optional[dict]:
    """The tokenizer block (with its input size made explicit) of an existing mim_jax VQ-KD
    run, or None when `path` is not one (an official file, or not there yet)."""
    field = vqkd_tokenizer.FIELD
    if not path or not epath.Path(path).is_dir():
        return None
    try:
        workdir, _ = resolve_checkpoint(path)
        config = read_run_config(workdir)
    except (ValueError, OSError) as e:
        raise ValueError(f"{field}.checkpoint={path!r}: {e}") from None
    if config.get("objective", {}).get("name") != "vqkd":
        raise ValueError(f"{field}.checkpoint={path!r} is a {config.objective.get('name')!r} "
                         "run, not a VQ-KD one (objective.name='vqkd').")
    recorded = dict(config.objective.get("tokenizer") or {})
    recorded["image_size"] = recorded.get("image_size") or config.data.image_size
    return dict(recorded, name="vqkd", checkpoint=path)


def load_tokenizer(spec: tokenizers.TokenizerSpec, abstract) -> dict:
    """The weights of a tokenizer (spec.config['checkpoint']), every shape checked against
    `abstract` (jax.eval_shape of its module's init)."""
    if spec.name == "dall_e":
        return _dall_e_params(spec.config, abstract)
    return _vqkd_params(spec.config, abstract)


def _dall_e_params(cfg, abstract) -> dict:
    """Official encoder state dict file -> params (host float32 numpy)."""
    checkpoint = cfg["checkpoint"]
    # No field-name prefix on these errors: the caller adds objective.tokenizer.checkpoint.
    if not checkpoint or not epath.Path(checkpoint).is_file():
        raise ValueError(f"{checkpoint!r} is not a file; objective.tokenizer.checkpoint must name "
                         f"a DALL-E encoder state dict (mim_jax/convert/dall_e.py says how to "
                         f"extract one from OpenAI's encoder.pkl).")
    if set(abstract) == {"params"}:
        abstract = abstract["params"]
    return dall_e.params_from_official(
        dall_e.load_state_dict(checkpoint), group_count=cfg["group_count"],
        n_blk_per_group=cfg["n_blk_per_group"], expected=abstract, target="objective.tokenizer")


def _vqkd_params(cfg, abstract) -> dict:
    """An official-layout VQ-KD file, .pth or .safetensors (teacher and other keys ignored),
    or a mim_jax VQ-KD run."""
    field, path = vqkd_tokenizer.FIELD, cfg["checkpoint"]
    if not path:
        raise ValueError(f"{field}.checkpoint is unset: pass an official VQ-KD file (.pth or "
                         ".safetensors) or a mim_jax VQ-KD run (its --workdir).")
    if epath.Path(path).is_file():
        return official_vqkd.params_from_official(
            convert.read_weights(path), num_heads=cfg["num_heads"],
            decoder_num_heads=cfg["decoder_heads"], expected=abstract)
    params = vqkd_params_from_run(path)
    params = {k: params[k] for k in abstract if k in params}
    check_shapes(params, abstract, f"{field}.checkpoint={path!r}")
    return params


def vqkd_params_from_run(path: str, step: Optional[int] = None) -> dict:
    """The trained tokenizer of a mim_jax VQ-KD run: its params plus the EMA codebook, which
    the run keeps in model_state. Raises ValueError naming the problem."""
    field = vqkd_tokenizer.FIELD
    try:
        workdir, step = resolve_checkpoint(path, step)
        config = read_run_config(workdir)
    except (ValueError, OSError) as e:
        raise ValueError(f"{field}.checkpoint={path!r}: {e}") from None
    name = config.get("objective", {}).get("name")
    if name != "vqkd":
        raise ValueError(f"{field}.checkpoint={path!r} is a {name!r} run, not a VQ-KD one "
                         "(objective.name='vqkd').")
    directory = workdir / "checkpoints"
    if step is None:
        step = checkpointing.latest_step(directory)
        if step is None:
            raise ValueError(f"{field}.checkpoint={path!r} has no complete checkpoint yet.")
    params, state = checkpointing.restore_raw(directory, step, ("params", "model_state"))
    codebook = state["codebook"]
    if not bool(np.asarray(codebook["initted"])):
        raise ValueError(f"{field}.checkpoint={path!r}: the codebook of step {step} was never "
                         "initialised (no training step ran).")
    return dict(params, codebook=codebook["embedding"])


def _resolve_tokenizer(config, need):
    return tokenizer(_block(config, need.source), config.data.image_size, config.data.channels)


def _load_tokenizer(config, need, variables):
    block = _block(config, need.source)
    abstract = jax.eval_shape(lambda: _at(variables, need.into))
    try:
        loaded = load_tokenizer(need.part, abstract)
    except (OSError, ValueError) as e:
        raise ValueError(f"{need.source}.checkpoint={block.get('checkpoint')!r}: {e}") from e
    return _replaced(variables, need.into, loaded)


# ---------------------------------------------------------------- what weights must fit

# An encoder description entry (convert.sizes) -> the config field that sets it.
_MODEL_FIELDS = {
    "width": "model.width", "embed_dim": "model.embed_dim", "depth": "model.depth",
    "depths": "model.depths", "patch_size": "model.patch_size", "num_heads": "model.num_heads",
    "mlp_dim": "model.mlp_dim", "stem_width": "model.stem_width", "widths": "model.widths",
    "dims": "model.dims", "channels": "data.channels", "positions": "model.pos_embed",
    "qkv_bias": "model.qkv_bias", "layer_scale": "model.layer_scale_init",
    "rel_pos_bias": "model.rel_pos_bias", "vocab_size": "model.vocab_size"}
# The entries a model.variant sets (which the fields above override).
_VARIANT_SIZES = ("width", "embed_dim", "depth", "depths", "patch_size", "num_heads", "mlp_dim",
                  "stem_width", "widths", "dims")


def _check_fits(found: tuple, wanted: tuple, against: str = "config.model",
                fields=None) -> None:
    """Raises ValueError, one line, where an encoder (found: (kind, sizes) of the weights,
    convert.sizes) is not the one `against` describes (wanted), naming what differs and the
    fields that set it: `fields` (entry -> field) or config.model's."""
    (found_kind, found_sizes), (wanted_kind, wanted_sizes) = found, wanted
    weights = sizes.describe(found_kind, found_sizes)
    if found_kind != wanted_kind:
        raise ValueError(f"the weights are {weights}; {against} is a "
                         f"{sizes.KINDS[wanted_kind]} (model.name).")
    differ = sizes.differences(found_sizes, wanted_sizes)
    if not differ:
        return
    if fields is None:
        names = ", ".join(dict.fromkeys(_MODEL_FIELDS[k] for k in differ))
        if any(k in _VARIANT_SIZES for k in differ):
            names += " / model.variant"
    else:
        names = ", ".join(dict.fromkeys(fields(k) for k in differ))
    raise ValueError(f"the weights are {sizes.describe(found_kind, found_sizes, differ)}; "
                     f"{against} has {sizes.describe_fields(wanted_sizes, differ)} ({names}).")


def _vit_config_sizes(arch: vit.ViTConfig) -> dict:
    return dict(width=arch.width, depth=arch.depth, patch_size=arch.patch_size,
                num_heads=arch.num_heads, mlp_dim=arch.mlp_dim, channels=arch.channels)


def _vit_encoder_of_weights(weights: sources.Weights, wanted: dict, against: str,
                            fields=None) -> dict:
    """The ViT encoder of a file, its sizes checked against `wanted` (width, depth,
    patch_size, num_heads, ...) before it is converted with the heads its records give, else
    wanted's: no layout stores them."""
    if weights.backbone != "vit":
        raise ValueError(f"the weights are {weights.description}; {against} is a ViT.")
    heads = sources.recorded_vit_heads(weights)
    found = dict(sizes.vit_sizes_of_state(weights.state), num_heads=heads)
    _check_fits(("vit", found), ("vit", wanted), against, fields)
    return sources.vit_encoder(weights, heads or wanted["num_heads"])


# ---------------------------------------------------------------- teachers

def _resolve_teacher(config, need) -> FrozenEncoder:
    """The encoder of a mim_jax pretraining run (module from its config.json), or of a ViT's
    weights (a file, or a Hugging Face / timm / exported folder: _teacher_of_weights)."""
    teacher_cfg, field = _block(config, need.source), f"{need.source}.checkpoint"
    path = teacher_cfg.get("checkpoint") if teacher_cfg is not None else None
    if not path or not isinstance(path, str):
        raise ValueError(f"{field} is unset: pass the --workdir of a mim_jax "
                         "pretraining run, e.g. --config.objective.teacher.checkpoint="
                         "runs/mae_quickstart.")
    step = teacher_cfg.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"{need.source}.step={step!r} must be None (latest) or an "
                         "integer >= 0.")
    try:
        if sources.is_weights(path):
            module, data = _teacher_of_weights(teacher_cfg, config.data, need.source, path)
        else:
            workdir, _ = resolve_checkpoint(path, step)
            run = read_run_config(workdir)
            if run.get("finetune") is not None:
                raise ValueError("it is a fine-tuning run, not a pretraining one")
            module = build_objective(run).encoder
            data = run.data
    except (ValueError, OSError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{field}={path!r} is unusable: {e}") from None
    return FrozenEncoder(module=module, image_size=data.image_size, mean=data.mean,
                         std=data.std, channels=data.get("channels", 3), source=path)


def _teacher_of_weights(teacher_cfg, data_cfg, source: str, path: str):
    """-> (module, data block) of the ViT a weights file or folder holds: the ViT its tensors
    describe, fed images of the size, mean and std its records give (<source>.image_size /
    mean / std first, the data's last). Heads come from its records, else from
    <source>.variant (e.g. 'B/16'), whose sizes must then be the file's."""
    weights = sources.read(path)
    variant = teacher_cfg.get("variant")
    heads = sources.recorded_vit_heads(weights)
    if variant:
        encoder = _vit_encoder_of_weights(weights, vit.parse_variant(variant),
                                          f"{source}.variant={variant!r}",
                                          fields=lambda key: f"{source}.variant")
    elif heads is None:
        raise ValueError(f"{source}.variant is unset and the weights do not record their "
                         "head count: set it (e.g. 'B/16').")
    else:
        encoder = sources.vit_encoder(weights, heads)
    recorded = sources.recorded_input(weights)
    pick = lambda name: teacher_cfg.get(name) or recorded.get(name) or data_cfg.get(name)
    data = ml_collections.ConfigDict(dict(
        image_size=pick("image_size"), mean=tuple(pick("mean")), std=tuple(pick("std")),
        channels=sizes.vit_sizes(encoder)["channels"]))
    if not data.image_size:
        raise ValueError(f"{source}.image_size is unset")
    return _vit_like(encoder, data.image_size), data


def _vit_like(encoder, image_size: int):
    """The ViT module an encoder parameter tree belongs to, at `image_size`."""
    found = sizes.vit_sizes(encoder)
    model = ml_collections.ConfigDict(dict(
        variant=f"B/{found['patch_size']}",  # every size is set below; this names the patch
        width=found["width"], depth=found["depth"], num_heads=found["num_heads"],
        mlp_dim=found["mlp_dim"], pos_embed=found["positions"],
        qkv_bias="qkv" if found["qkv_bias"] else "none",
        layer_scale_init=0.1 if found["layer_scale"] else None,  # only matters at init
        rel_pos_bias=("shared" if "rel_pos_bias" in encoder else
                      "per_layer" if found["rel_pos_bias"] else "none")))
    return models.vit_from_config(model, image_size, found["channels"],
                                  final_norm="norm" in encoder)


def _load_teacher(config, need, variables):
    teacher_cfg, abstract = _block(config, need.source), _at(variables, need.into)
    path = teacher_cfg.checkpoint
    try:
        if sources.is_weights(path):  # positions resized to the teacher's input size
            encoder = sources.vit_encoder(sources.read(path), need.part.module.config.num_heads)
            loaded, _ = resize.fit_encoder_params(encoder, abstract)
        else:
            loaded = load_encoder(path, teacher_cfg.get("step")).params
            check_shapes(loaded, abstract, "its encoder")
    except Exception as e:  # any unreadable / damaged / mismatched checkpoint: one line
        raise ValueError(f"{need.source}.checkpoint={path!r} is unusable: {e}") from None
    return _replaced(variables, need.into, loaded)


# ---------------------------------------------------------------- a classifier's encoder

def fitted_encoder_params(config, target_params, target_batch_stats=None):
    """finetune.pretrained -> encoder parameters fitted to `target_params` (the encoder of
    config.model: positions / relative tables resized, shared bias copied per layer).

    finetune.pretrained is a mim_jax run, or weights saved elsewhere (a file, or a Hugging
    Face / timm / exported folder: _encoder_of_weights). Either way the encoder must be the
    one config.model describes, sizes and options, which is checked before anything is
    fitted, with one line naming the fields that differ.

    With `target_batch_stats` (the encoder's BatchNorm statistics: ResNets) returns
    (params, batch_stats), the statistics the pretraining run kept (SparK's model_state)."""
    path = config.finetune.pretrained
    stats = None
    try:
        if sources.is_weights(path):
            (source, stats), origin = _encoder_of_weights(config, path), path
        else:
            pretrained = load_encoder(path, config.finetune.get("pretrained_step") or None)
            source, origin = pretrained.params, f"{path} (step {pretrained.step}, " \
                                                f"{pretrained.objective})"
            stats = pretrained.batch_stats
        _check_fits(sizes.encoder_sizes(source), sizes.encoder_sizes(target_params))
        params, notes = resize.fit_encoder_params(source, target_params)
        if target_batch_stats:
            if not stats:
                raise ValueError("the encoder has BatchNorm layers but the checkpoint keeps "
                                 "no statistics for them (model_state['batch_stats']).")
            stats, stat_notes = resize.fit_encoder_params(stats, target_batch_stats)
            notes += [f"batch_stats {n}" for n in stat_notes]
    except ValueError as e:  # named after the field, so main prints one actionable line
        raise ValueError(f"finetune.pretrained={path!r}: {e}") from e
    logging.info("Encoder loaded from %s%s", origin,
                 " with its BatchNorm statistics" if target_batch_stats else "")
    for note in notes:
        logging.info("  %s", note)
    return (params, stats) if target_batch_stats is not None else params


def _encoder_of_weights(config, path: str):
    """-> (encoder params, BatchNorm statistics or None) of a weights file or folder in any
    layout convert.sources reads, at the size it was saved (fit_encoder_params adapts
    positions and tables). A ViT's sizes are checked before conversion, which needs heads:
    the file's records give them, else config.model does."""
    weights = sources.read(path)
    name = config.model.get("name", "vit")
    if weights.backbone != name:
        raise ValueError(f"the weights are {weights.description}; config.model.name is "
                         f"{name!r} (model.name).")
    if name in classification.CONVNETS:
        arch = classification.encoder_from_config(config, for_probe=False).config
        variables = sources.convnet_variables(weights, arch)
        return variables["params"]["encoder"], variables.get("batch_stats", {}).get("encoder")
    if name == "swin":
        return sources.swin_encoder(weights, sources.swin_config(weights)), None
    arch = models.vit_from_config(config.model, config.data.image_size,
                                  config.data.channels).config
    return _vit_encoder_of_weights(weights, _vit_config_sizes(arch), "config.model"), None


def _load_encoder(config, need, variables):
    """The pretrained encoder fitted into need.into, with its BatchNorm statistics (ConvNets)
    where the model keeps them."""
    target = _at(variables, need.into)
    stats = variables["model_state"].get("batch_stats", {}).get("encoder")
    if not stats:
        return _replaced(variables, need.into, fitted_encoder_params(config, target))
    encoder, stats = fitted_encoder_params(config, target, stats)
    variables = _replaced(variables, need.into, encoder)
    return _replaced(variables, ("model_state", "batch_stats", "encoder"), stats)


# Frozen.kind -> how its module is resolved at build time, and how its weights are read.
_RESOLVE = {"tokenizer": _resolve_tokenizer, "teacher": _resolve_teacher,
            "encoder": lambda config, need: None}  # the objective's own encoder
_LOAD = {"tokenizer": _load_tokenizer, "teacher": _load_teacher, "encoder": _load_encoder}
