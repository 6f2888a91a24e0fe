"""Export a run's weights for PyTorch: Hugging Face transformers, timm, or the
official reference code's layout, as safetensors plus the config file the library reads.

    python -m mim_jax.export --workdir runs/mae_quickstart --to hf --out exports/mae_hf

writes OUT/model.safetensors, OUT/config.json (hf, timm) and OUT/mim_jax_export.json (the
run, step and model config it came from), from the newest good checkpoint or --step, and
prints how to load it. Which library class each objective's export is, and what is refused,
is tabled in docs/conversion.md. The hf and timm exports hold what the library's class has:
timm's the encoder alone; transformers' the encoder with the objective's head where the class
has one (MAE's decoder, SimMIM's head, BEiT's LM head; BEiT v2's CLS-pretraining head has no
counterpart there and is left out, which is printed). A fine-tuning run exports its whole
classifier to timm.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
from absl import app, flags, logging
from etils import epath

from mim_jax import checkpointing, convert, models, paths
from mim_jax.convert import (common, files, library_configs, mae_layout, official_mae,
                             official_vqkd, sources)
from mim_jax.models import resnet
from mim_jax.pretrained import read_run_config, resolve_checkpoint

FORMATS = ("hf", "timm", "official")
RECORD_NAME = sources.EXPORT_RECORD  # what the readers of weights look for


@dataclasses.dataclass
class Run:
    """What an export needs of a run: its config and the raw arrays of one checkpoint."""
    config: object  # ml_collections.ConfigDict of the run
    params: dict
    model_state: dict
    step: int
    source: str


@dataclasses.dataclass
class Export:
    tensors: Dict[str, np.ndarray]
    library_config: Optional[dict]  # written as config.json (hf, timm)
    loader: str  # Python that loads OUT, with {out} for the folder
    notes: List[str] = dataclasses.field(default_factory=list)


def read_run(path, step: Optional[int] = None) -> Run:
    """The config and checkpoint arrays of a run (a workdir, its checkpoints/ or one
    checkpoints/STEP folder): `step`, or the newest checkpoint that reads back intact (a
    damaged newer one is skipped with a warning)."""
    workdir, step = resolve_checkpoint(path, step)
    config = read_run_config(workdir)
    directory = workdir / "checkpoints"
    steps = checkpointing.all_steps(directory)
    if step is not None and step not in steps:
        raise ValueError(f"--step={step}: {str(workdir)!r} has checkpoints at steps "
                         f"{steps or 'none'}.")
    if not steps:
        raise ValueError(f"{str(workdir)!r} has no complete checkpoint yet.")
    problems = []
    for candidate in [step] if step is not None else steps[::-1]:
        try:
            params, state = checkpointing.restore_raw(directory, candidate,
                                                      ("params", "model_state"))
        except checkpointing.CheckpointError as err:
            if step is not None:
                raise ValueError(str(err)) from None
            logging.warning("Skipping step %d: %s", candidate, err)
            problems.append(f"step {candidate}: {err}")
            continue
        return Run(config=config, params=params, model_state=state, step=candidate,
                   source=str(workdir))
    raise ValueError(f"no checkpoint of {str(workdir)!r} reads back intact: "
                     + "; ".join(problems))


# ---------------------------------------------------------------- what an encoder is

def _objective(config) -> str:
    """The exporter's key: the pretraining objective, or 'finetune' for a classifier."""
    return "finetune" if config.get("finetune") is not None else config.objective.name


def _vit_kind(model_cfg) -> str:
    """'plain' (MAE's ViT: sin-cos positions, q/k/v biases, nothing else) or 'beit' (BEiT's
    options: relative positions, layer scale, q/v biases)."""
    plain = (model_cfg.get("qkv_bias", "qkv") == "qkv"
             and model_cfg.get("rel_pos_bias", "none") == "none"
             and not model_cfg.get("layer_scale_init")
             and model_cfg.get("pos_embed", "sincos") == "sincos")
    if not model_cfg.get("cls_token", True):
        raise ValueError("model.cls_token=False: the libraries' ViTs all have a CLS token.")
    if plain:
        return "plain"
    if model_cfg.get("qkv_bias", "qkv") == "qkv":
        raise ValueError(f"model.qkv_bias='qkv' with BEiT's options (rel_pos_bias="
                         f"{model_cfg.get('rel_pos_bias', 'none')!r}, layer_scale_init="
                         f"{model_cfg.get('layer_scale_init')!r}, pos_embed="
                         f"{model_cfg.get('pos_embed', 'sincos')!r}): BEiT layouts have q and "
                         f"v biases only.")
    return "beit"


def _arch(config):
    return models.backbone_from_config(config.model, config.data.image_size,
                                       config.data.get("channels", 3)).config


def _beit_options(model_cfg) -> dict:
    return dict(abs_pos=model_cfg.get("pos_embed", "sincos") != "none",
                rel_pos=model_cfg.get("rel_pos_bias", "none"),
                layer_scale=model_cfg.get("layer_scale_init"))


def _norm(config) -> dict:
    return dict(mean=tuple(config.data.get("mean", (0.5,) * 3)),
                std=tuple(config.data.get("std", (0.5,) * 3)))


# ---------------------------------------------------------------- the exports

def _hf(name: str, cls: str, extra: str = "") -> str:
    return (f"import transformers\nmodel = transformers.{cls}.from_pretrained('{{out}}'"
            f"{extra})  # {name}")


def _timm_loader(logits: bool = False) -> str:
    use = "logits: model(images)" if logits else "features: model.forward_features(images)"
    return ("import timm\nmodel = timm.create_model('local-dir:{out}', pretrained=True)  "
            f"# {use}")


def _official_loader(what: str) -> str:
    return ("from safetensors.torch import load_file\nstate_dict = load_file('{out}/"
            f"model.safetensors')\nmodel.load_state_dict(state_dict)  # model: {what}")


def _mae(run: Run, fmt: str) -> Export:
    config, params = run.config, run.params
    arch = _arch(config)
    if _vit_kind(config.model) != "plain":
        raise ValueError("an MAE encoder with BEiT's options has no MAE layout.")
    if fmt == "official":
        return Export(convert.mae_params_to_official(params, image_size=arch.image_size), None,
                      _official_loader("models_mae.MaskedAutoencoderViT of the same size"))
    if fmt == "timm":
        tensors = mae_layout.export_encoder(params["encoder"], official_mae.LAYOUT,
                                            arch.image_size)
        return Export(tensors, library_configs.timm_vit(arch, **_norm(config)), _timm_loader())
    obj = config.objective
    decoder_mlp = int(obj.decoder_width * obj.get("decoder_mlp_ratio", 4.0))
    hf_config = library_configs.hf_vit_mae(
        arch, decoder_width=obj.decoder_width, decoder_depth=obj.decoder_depth,
        decoder_heads=obj.decoder_heads, decoder_mlp_dim=decoder_mlp,
        mask_ratio=obj.mask_ratio, norm_pix_loss=bool(obj.get("norm_pix_loss", False)))
    return Export(convert.mae_params_to_hf(params, image_size=arch.image_size), hf_config,
                  _hf("encoder + decoder; ViTMAEModel reads the encoder",
                      "ViTMAEForPreTraining"))


def _beit_encoder(run: Run, fmt: str, params: dict, vocab_size: Optional[int] = None,
                  notes: Optional[List[str]] = None) -> Export:
    """A BEiT-style ViT (with the LM head under params['lm_head'] for BEiT's hf export)."""
    config = run.config
    arch, options = _arch(config), _beit_options(config.model)
    notes = notes or []
    if fmt == "timm":
        encoder = {k: v for k, v in params["encoder"].items() if k != "mask_token"}
        tensors = {k: v for k, v in convert.beit_params_to_official({"encoder": encoder}).items()
                   if not k.endswith("relative_position_index")}  # timm recomputes them
        return Export(tensors, library_configs.timm_beit(arch, **options, **_norm(config)),
                      _timm_loader(), notes)
    hf_config = library_configs.hf_beit(arch, **options,
                                        mask_token="mask_token" in params["encoder"],
                                        vocab_size=vocab_size)
    cls = "BeitForMaskedImageModeling" if vocab_size else "BeitModel"
    extra = "" if vocab_size else ", add_pooling_layer=False"
    return Export(convert.beit_params_to_hf(params), hf_config,
                  _hf("BEiT-style ViT", cls, extra), notes)


def _simmim(run: Run, fmt: str) -> Export:
    config, params = run.config, run.params
    is_swin = config.model.get("name", "vit") == "swin"
    arch = _arch(config)
    if fmt == "official":
        tensors = convert.simmim_params_to_official(params, swin_config=arch if is_swin else None)
        return Export(tensors, None, _official_loader(
            "SimMIM's SwinTransformerForSimMIM / VisionTransformerForSimMIM wrapped in SimMIM"))
    if is_swin:
        if fmt == "timm":
            raise ValueError("--to=timm: a Swin exports to 'hf' or 'official'.")
        return Export(convert.swin_params_to_hf(params, config=arch),
                      library_configs.hf_swin(arch, masked_image_modeling=True),
                      _hf("Swin + SimMIM head; SwinModel reads the encoder",
                          "SwinForMaskedImageModeling"))
    if _vit_kind(config.model) == "plain":
        if fmt == "timm":
            encoder = {k: v for k, v in params["encoder"].items() if k != "mask_token"}
            tensors = mae_layout.export_encoder(encoder, official_mae.LAYOUT, arch.image_size)
            return Export(tensors, library_configs.timm_vit(arch, **_norm(config)),
                          _timm_loader())
        return Export(convert.simmim_params_to_hf_vit(params, image_size=arch.image_size),
                      library_configs.hf_vit_simmim(arch),
                      _hf("ViT + SimMIM head; ViTModel reads the encoder",
                          "ViTForMaskedImageModeling"))
    notes = ["SimMIM's 1x1-conv head is in the 'official' export only."]
    return _beit_encoder(run, fmt, {"encoder": params["encoder"]}, notes=notes)


def _beit(run: Run, fmt: str) -> Export:
    params = run.params
    if fmt == "official":
        return Export(convert.beit_params_to_official(params), None, _official_loader(
            "unilm's VisionTransformerForMaskedImageModeling (beit / beit2)"))
    notes = []
    if "cls_head" in params and fmt == "hf":
        notes.append("BEiT v2's CLS-pretraining head has no transformers counterpart: left "
                     "out (it is in the 'official' export).")
    if fmt == "timm":
        return _beit_encoder(run, fmt, {"encoder": params["encoder"]}, notes=notes)
    head = {k: params[k] for k in ("encoder", "lm_head")}
    vocab = int(np.shape(params["lm_head"]["kernel"])[-1])
    return _beit_encoder(run, fmt, head, vocab_size=vocab, notes=notes)


def _vqkd(run: Run, fmt: str) -> Export:
    if fmt != "official":
        raise ValueError(f"--to={fmt}: a VQ-KD tokenizer exports to 'official' only (unilm's "
                         "beit2 VQKD); transformers and timm have no such model.")
    codebook = run.model_state.get("codebook")
    if codebook is None or not bool(np.asarray(codebook["initted"])):
        raise ValueError(f"the codebook of step {run.step} was never initialised (no training "
                         "step ran).")
    params = {k: v for k, v in run.params.items() if k != "codebook"}
    return Export(official_vqkd.params_to_official(params, codebook), None,
                  _official_loader("unilm beit2's VQKD (teacher keys are not exported)"))


def _spark(run: Run, fmt: str) -> Export:
    if fmt == "hf":
        raise ValueError("--to=hf: SparK's ResNet / ConvNeXt export to 'timm' (SparK's own "
                         "releases are timm files, so 'official' writes the same).")
    config = run.config
    arch = _arch(config)
    variables = {"params": {"encoder": run.params["encoder"]}}
    stats = (run.model_state.get("batch_stats") or {}).get("encoder")
    if stats:
        variables["batch_stats"] = {"encoder": stats}
    tensors = convert.convnet_variables_to_timm(variables, config=arch)
    if fmt == "official":
        return Export(tensors, None, _official_loader(
            f"timm's {'ResNet' if isinstance(arch, resnet.ResNetConfig) else 'ConvNeXt'} "
            "of the same size (num_classes=0)"))
    notes = []
    if isinstance(arch, resnet.ResNetConfig):
        if arch.stem_width != 64:
            raise ValueError(f"--to=timm: model.stem_width={arch.stem_width}, but timm's ResNet "
                             "stem is 64 wide; --to=official writes the same layout without "
                             "timm's config.")
        if arch.stem_stride != 4:
            notes.append(f"model.stem_stride={arch.stem_stride}: timm's ResNet stem downsamples "
                         "4x, so timm computes this encoder's features at 1/"
                         f"{4 // arch.stem_stride} of the resolution it was pretrained at.")
    return Export(tensors, library_configs.timm_convnet(
        arch, image_size=config.data.image_size, **_norm(config)), _timm_loader(), notes)


def _finetuned(run: Run, fmt: str) -> Export:
    """A fine-tuned classifier (encoder, pooling, head) as the timm model that computes the
    same logits: a ViT with global average pooling (fc_norm, no final norm), a ResNet or a
    ConvNeXt."""
    config, params = run.config, run.params
    if config.model.get("name") == "multiway":
        raise ValueError(f"--to={fmt}: a fine-tuned Multiway (BEiT-3) classifier has no export "
                         "in any format; exported fine-tuned classifiers: a MAE-style ViT with "
                         "pool='gap', a ResNet, a ConvNeXt (--to=timm).")
    if fmt != "timm":
        raise ValueError(f"--to={fmt}: a fine-tuned classifier exports to 'timm' (its "
                         "encoder alone: export the pretraining run it started from).")
    arch, name = _arch(config), config.model.get("name", "vit")
    classes = int(np.shape(params["head"]["kernel"])[-1])
    if name in ("resnet", "convnext"):
        variables = {"params": {k: params[k] for k in ("encoder", "fc_norm", "head")
                                if k in params}}
        stats = (run.model_state.get("batch_stats") or {}).get("encoder")
        if stats:
            variables["batch_stats"] = {"encoder": stats}
        if isinstance(arch, resnet.ResNetConfig) and arch.stem_width != 64:
            raise ValueError(f"--to=timm: model.stem_width={arch.stem_width}, but timm's "
                             "ResNet stem is 64 wide.")
        timm_config = library_configs.timm_convnet(arch, image_size=config.data.image_size,
                                                   num_classes=classes, **_norm(config))
        return Export(convert.convnet_variables_to_timm(variables, config=arch), timm_config,
                      _timm_loader(logits=True))
    pool = config.finetune.get("pool", "gap")
    if name != "vit" or _vit_kind(config.model) != "plain" or pool != "gap":
        raise ValueError(f"a fine-tuned {name} (pool={pool!r}) has no timm export; exported "
                         "fine-tuned classifiers: a MAE-style ViT with pool='gap', a ResNet, "
                         "a ConvNeXt.")
    encoder, depth, heads = mae_layout.unscanned(params["encoder"], "encoder")
    plan = {"encoder": {k: v for k, v in official_mae.LAYOUT.encoder(depth, heads).items()
                        if k != "norm"},  # global pooling: fc_norm takes the final norm's place
            "fc_norm": common.layernorm("fc_norm"), "head": common.linear("head")}
    tensors = common.dump(plan, dict(encoder=encoder, fc_norm=params["fc_norm"],
                                     head=params["head"]), "fine-tuned ViT")
    tensors["pos_embed"] = mae_layout.sincos_table(arch.width, arch.num_patches)
    return Export(tensors, library_configs.timm_vit(arch, num_classes=classes, **_norm(config)),
                  _timm_loader(logits=True))


EXPORTERS: Dict[str, Callable[[Run, str], Export]] = {
    "mae": _mae, "simmim": _simmim, "beit": _beit, "vqkd": _vqkd, "spark": _spark,
    "finetune": _finetuned}


def export_run(run: Run, fmt: str) -> Export:
    """The tensors (float32), config file and loading snippet of `run` in format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"--to={fmt!r}; allowed: {list(FORMATS)}.")
    objective = _objective(run.config)
    if objective not in EXPORTERS:
        raise ValueError(f"objective {objective!r} has no export; exported: {list(EXPORTERS)}.")
    return EXPORTERS[objective](run, fmt)


def _plain(block):
    return block.to_dict() if hasattr(block, "to_dict") else block


def write(export: Export, run: Run, fmt: str, out, dtype: str = "float32") -> List[str]:
    """Writes the export into folder `out` (made if missing); returns the files written."""
    out = epath.Path(paths.resolve(out))
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"mim_jax_source": run.source, "mim_jax_step": str(run.step)}
    files.write_safetensors(export.tensors, out / files.SAFETENSORS_NAME, dtype=dtype,
                            metadata=metadata)
    written = [files.SAFETENSORS_NAME]
    if export.library_config is not None:
        config = dict(export.library_config)
        if fmt == "hf":
            config["torch_dtype"] = dtype
        paths.write_whole(out / files.HF_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        written.append(files.HF_CONFIG_NAME)
    objective = run.config.get("objective") or {}
    record = dict(format=fmt, objective=_objective(run.config), source=run.source,
                  step=run.step, dtype=dtype, model=_plain(run.config.get("model")),
                  tokenizer=_plain(objective.get("tokenizer")),
                  data={k: run.config.data.get(k) for k in ("image_size", "channels", "mean",
                                                             "std")})
    paths.write_whole(out / RECORD_NAME, json.dumps(record, indent=2, default=list) + "\n")
    return written + [RECORD_NAME]


# ---------------------------------------------------------------- command line

def define_flags() -> None:
    """The command line's flags; defined when run as a program only, so importing this module
    beside another entry point's flags (--out) never collides."""
    flags.DEFINE_string("workdir", None, "The pretraining run (its workdir, checkpoints/ or "
                        "checkpoints/STEP folder; local or gs://).")
    flags.DEFINE_enum("to", None, FORMATS, "hf (transformers), timm, or official (the "
                      "reference code's state dict).")
    flags.DEFINE_string("out", None, "Folder to write (made if missing).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")
    flags.DEFINE_enum("dtype", "float32", files.FLOAT_DTYPES, "Dtype of the written weights.")
    flags.mark_flags_as_required(["workdir", "to", "out"])


FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax reports every restore at INFO
    try:
        run = read_run(FLAGS.workdir, FLAGS.step)
        export = export_run(run, FLAGS.to)
        written = write(export, run, FLAGS.to, FLAGS.out, FLAGS.dtype)
    except (ValueError, OSError) as err:
        sys.exit(f"mim_jax.export: {err}")
    out = paths.resolve(FLAGS.out)
    count = sum(int(np.prod(np.shape(v))) for v in export.tensors.values())
    print(f"Wrote {', '.join(written)} to {out}: {len(export.tensors)} tensors, "
          f"{count:,} values, {FLAGS.dtype}, from step {run.step} of {run.source}.")
    for note in export.notes:
        print(f"Note: {note}")
    print("Load it with:\n" + export.loader.format(out=out))


if __name__ == "__main__":
    define_flags()
    app.run(main)
