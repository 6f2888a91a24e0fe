"""Every config in configs/ loads, is documented, and resolves every name it references."""
import glob
import os
import re
import subprocess
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from mim_jax import objectives, pretrained, train
from mim_jax.data import config as data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not os.path.basename(p).startswith(("_", "common")))


def _load(path, arg):
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


def _documented_args(module, name):
    """The config args used by the commands in the docstring: the ones users will type."""
    doc = module.__doc__ or ""
    args = re.findall(rf"--config configs/{name}\.py(?::(\S+))?", doc)
    return doc, sorted(set(a or None for a in args), key=str)


def _stand_in_teacher(cfg, tmp_path):
    """The docstrings name a teacher run (VQ-KD) that does not exist here: a workdir with only
    the config.json of the MAE run they name is enough to build the objective."""
    import json
    from configs import mae
    teacher = mae.get_config("quickstart" if cfg.data.name == "mnist5k" else None)
    workdir = tmp_path / "teacher"
    workdir.mkdir(exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(json.loads(teacher.to_json())))
    cfg.objective.teacher.checkpoint = str(workdir)


def _stand_in_text(cfg, tmp_path):
    """The recipes name a SentencePiece model and text files the user supplies (the released
    beit3.spm, a corpus): stand-ins that exist."""
    if cfg.text.spm_model != "quickstart":
        cfg.text.spm_model = str(tmp_path / "beit3.spm")
        (tmp_path / "beit3.spm").write_bytes(b"")
    if cfg.text.corpus == "files":
        cfg.text.files = str(tmp_path / "corpus.txt")
        (tmp_path / "corpus.txt").write_text("a text\n")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_docstring_commands_resolve(path, tmp_path):
    name = os.path.splitext(os.path.basename(path))[0]
    module, _ = _load(path, None)
    doc, args = _documented_args(module, name)
    assert "python -m mim_jax.main --config configs/" + name in doc
    assert args, "no runnable command in the docstring"
    for arg in args:
        arg = re.sub(r"pretrained=[^,]*", "", arg or "").strip(",") or None
        _, cfg = _load(path, arg)  # the pretraining runs the docstrings name do not exist here
        if cfg.get("objective") is not None and cfg.objective.get("teacher") is not None:
            _stand_in_teacher(cfg, tmp_path)
        if cfg.get("text") is not None:
            _stand_in_text(cfg, tmp_path)
        if cfg.get("finetune") is None:
            obj = pretrained.build_objective(cfg)  # objective, backbone and its variant
            assert obj.name == cfg.objective.name
        data_config.validate_data_config(cfg.data)  # dataset name is a known builder
        obj = train.validate_config(cfg)  # evaluators, numbers, the fine-tuning classifier
        assert obj.name in objectives.names() + ["finetune", "linear_probe"]


def test_mae_paper_recipe():
    _, c = _load(os.path.join(ROOT, "configs", "mae.py"), "variant=L/16,epochs=1600")
    assert (c.model.variant, c.num_epochs, c.warmup_epochs, c.batch_size) == ("L/16", 1600, 40,
                                                                               4096)
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay) == (0.9, 0.95, 0.05)
    assert c.optimizer.base_lr == 1.5e-4 and c.optimizer.lr_batch_divisor == 256
    assert (c.objective.mask_ratio, c.objective.norm_pix_loss) == (0.75, True)
    assert (c.objective.decoder_depth, c.objective.decoder_width) == (8, 512)
    assert tuple(c.data.crop_scale) == (0.2, 1.0) and c.data.interpolation == "bicubic"
    assert c.data.flip and c.data.image_size == 224


def test_unknown_config_argument_is_named():
    with pytest.raises(ValueError, match=r"config argument 'varient' is unknown; allowed"):
        _load(os.path.join(ROOT, "configs", "mae.py"), "varient=B/16")


def test_locked_config_rejects_typo_override():
    _, c = _load(os.path.join(ROOT, "configs", "mae.py"), "quickstart")
    c.lock()
    with pytest.raises(AttributeError, match="batch_sise"):
        c.batch_sise = 3
    with pytest.raises(AttributeError):
        c.model.drop_path = 0.1


# ------------------------------------------------ optional fields on the command line ---
# mim_jax.main reads the config with ml_collections' config_flags (locked config); these
# parse command lines the same way.

def _parse_command_line(config_arg, *overrides):
    argv = ["mim_jax.main", "--config", os.path.join(ROOT, "configs", config_arg), *overrides]
    flag_values = flags.FlagValues()  # Private flags: nothing leaks into absl's global FLAGS.
    holder = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                             flag_values=flag_values, lock_config=True,
                                             sys_argv=argv)
    flag_values(argv)
    return holder.value


def _optional_fields(cfg, prefix=""):
    """Dotted paths of the fields whose type admits None (see data.config.optional_field)."""
    paths = []
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            paths += _optional_fields(value, f"{prefix}{key}.")
            continue
        field_type = cfg.get_type(key)
        if isinstance(field_type, tuple) and type(None) in field_type:
            paths.append(prefix + key)
    return paths


DATA_OPTIONAL = {"data.data_dir", "data.manual_dir", "data.folder", "data.crop_scale",
                 "data.randaugment"}
BACKBONE_OPTIONAL = {"model.patch_size"}
VIT_OPTIONAL = BACKBONE_OPTIONAL | {"model.width", "model.depth", "model.num_heads",
                                    "model.mlp_dim", "model.layer_scale_init"}
SWIN_OPTIONAL = BACKBONE_OPTIONAL | {"model.embed_dim", "model.depths", "model.num_heads"}


@pytest.mark.parametrize("config_arg,expected", [
    ("mae.py", DATA_OPTIONAL | VIT_OPTIONAL),
    ("mae.py:quickstart", DATA_OPTIONAL | VIT_OPTIONAL),
    ("simmim.py", DATA_OPTIONAL | SWIN_OPTIONAL),
    ("simmim.py:model=vit_b", DATA_OPTIONAL | VIT_OPTIONAL),
    ("finetune.py", DATA_OPTIONAL | VIT_OPTIONAL),
    ("linear_probe.py", DATA_OPTIONAL | VIT_OPTIONAL),
])
def test_every_optional_field_can_be_unset_from_command_line(config_arg, expected):
    path, _, arg = config_arg.partition(":")
    _, cfg = _load(os.path.join(ROOT, "configs", path), arg or None)
    assert set(_optional_fields(cfg)) == expected
    parsed = _parse_command_line(config_arg, *(f"--config.{p}=None" for p in sorted(expected)))
    for field in expected:
        holder, name = parsed, field
        while "." in name:
            head, name = name.split(".", 1)
            holder = holder[head]
        assert holder[name] is None, field
    data_config.validate_data_config(parsed.data)  # No crop and no RandAugment are valid.


def test_crop_scale_none_from_command_line():
    cfg = _parse_command_line("mae.py", "--config.data.crop_scale=None")
    assert cfg.data.crop_scale is None
    assert cfg.is_locked  # As mim_jax.main makes it.
    data_config.validate_data_config(cfg.data)


@pytest.mark.parametrize("text", ["(0.3,1.0)", "0.3,1.0", "(0.3, 1)"])
def test_crop_scale_tuple_from_command_line(text):
    cfg = _parse_command_line("mae.py", f"--config.data.crop_scale={text}")
    assert tuple(cfg.data.crop_scale) == (0.3, 1.0) and isinstance(cfg.data.crop_scale, tuple)
    data_config.validate_data_config(cfg.data)


def test_optional_field_defaults_are_unchanged():
    assert data_config.default_data_config().crop_scale == (0.2, 1.0)
    assert data_config.default_data_config().randaugment is None
    assert _parse_command_line("mae.py").data.crop_scale == (0.2, 1.0)  # No override given.
    assert _parse_command_line("mae.py:quickstart").data.crop_scale == (0.6, 1.0)
    ft = _parse_command_line("finetune.py")
    assert ft.data.randaugment == "rand-m9-mstd0.5-inc1"
    assert _parse_command_line("simmim.py:model=vit_b").model.layer_scale_init == 0.1


def test_optional_fields_keep_their_type_on_the_command_line():
    cfg = _parse_command_line(
        "finetune.py", "--config.data.randaugment=None", "--config.data.data_dir=2024",
        "--config.model.width=64", "--config.model.layer_scale_init=1")
    assert cfg.data.randaugment is None  # Not the text 'None'.
    assert cfg.data.data_dir == "2024"  # A str field keeps digits as text.
    assert cfg.model.width == 64 and cfg.model.layer_scale_init == 1.0
    assert isinstance(cfg.model.layer_scale_init, float)
    cfg = _parse_command_line("mae.py:quickstart",
                              "--config.data.randaugment=rand-m9-mstd0.5-inc1")
    assert cfg.data.randaugment == "rand-m9-mstd0.5-inc1"
    cfg = _parse_command_line("simmim.py:quickstart,model=swin", "--config.model.depths=(2,2)",
                              "--config.model.num_heads=None")
    assert cfg.model.depths == (2, 2) and cfg.model.num_heads is None
    with pytest.raises(flags.IllegalFlagValueError, match="config.model.width=abc"):
        _parse_command_line("mae.py", "--config.model.width=abc")
    # Type checks of config files stay: an optional tuple takes a tuple or None only.
    _, c = _load(os.path.join(ROOT, "configs", "mae.py"), None)
    with pytest.raises(TypeError):
        c.data.crop_scale = "0.3,1.0"


def test_misspelt_none_is_refused_naming_the_field():
    cfg = _parse_command_line("mae.py", "--config.data.crop_scale=none")
    with pytest.raises(ValueError, match=r"data\.crop_scale=\('none',\).*or None to disable"):
        data_config.validate_data_config(cfg.data)


_MAIN_FLAGS_SCRIPT = """
import sys
from absl import flags
import mim_jax.main  # Defines --config exactly as the entry point does.
flags.FLAGS(sys.argv)
c = flags.FLAGS.config
print(repr((c.data.crop_scale, c.data.randaugment, c.model.width)))
"""


def test_entry_point_flags_take_none():
    """With mim_jax.main's own flag, in a fresh interpreter: the None parser must be known by
    the time config_flags reads overrides, i.e. once the config file has been loaded."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-c", _MAIN_FLAGS_SCRIPT, "--config", "configs/finetune.py",
         "--workdir", "unused", "--config.data.crop_scale=None",
         "--config.data.randaugment=None", "--config.model.width=None"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == repr((None, None, None))


def test_simmim_quickstart_is_the_vit_with_reference_mask_geometry():
    """The quickstart masks 8 px cells = 2 x 2 patches of 4 px, as the reference's ViT-B/16
    recipe masks 32 px cells = 2 x 2 patches (README: with 1-patch cells the encoder does not
    beat its random init); the Swin variant stays available."""
    from configs import simmim
    vit_cfg = simmim.get_config("quickstart")
    assert vit_cfg.model.name == "vit" and vit_cfg.model.patch_size in (None, 4)
    assert vit_cfg.objective.mask_patch_size == 2 * 4 and vit_cfg.data.image_size == 32
    assert vit_cfg.objective.mask_ratio == 0.5
    assert simmim.get_config("quickstart,model=vit").to_dict() == vit_cfg.to_dict()
    assert simmim.get_config("quickstart,model=swin").model.name == "swin"
    with pytest.raises(ValueError, match="model='vit_b' with quickstart"):
        simmim.get_config("quickstart,model=vit_b")


def test_spark_finetune_recipes_are_the_references_table():
    _, r50 = _load(os.path.join(ROOT, "configs", "finetune.py"), "model=resnet50")
    assert (r50.model.name, r50.model.variant, r50.model.drop_path_rate) == ("resnet", "50", 0.05)
    assert (r50.batch_size, r50.num_epochs, r50.warmup_epochs) == (2048, 300, 5)
    o = r50.optimizer
    assert (o.name, o.base_lr, o.layer_decay, o.weight_decay) == ("lamb", 2e-3, 0.7, 0.02)
    assert (o.trust_ratio, o.bias_correction, o.warmup_start_factor) == ("all", False, 0.005)
    assert o.min_lr == 0.001 * 2e-3 * 2048 / 256 and o.grad_clip_norm == 0.0
    f = r50.finetune
    assert (f.loss, f.mixup, f.cutmix, f.label_smoothing, f.ema_decay) == ("bce", 0.1, 1.0,
                                                                           0.1, 0.9999)
    _, cs = _load(os.path.join(ROOT, "configs", "finetune.py"), "model=convnext_s")
    assert (cs.model.name, cs.model.variant, cs.model.drop_path_rate) == ("convnext", "S", 0.3)
    assert (cs.optimizer.name, cs.optimizer.base_lr, cs.optimizer.layer_decay) == ("adamw",
                                                                                   2e-4, 0.7)
    assert (cs.batch_size, cs.num_epochs, cs.finetune.loss, cs.finetune.mixup) == (
        4096, 400, "softmax_ce", 0.8)
    train.validate_config(r50), train.validate_config(cs)


def test_linear_probe_pools_what_the_encoder_has():
    """MAE's probe reads the CLS token; a ConvNet has none and averages its last map."""
    path = os.path.join(ROOT, "configs", "linear_probe.py")
    assert _load(path, "quickstart")[1].finetune.pool == "cls"
    for model in ("resnet", "convnext"):
        assert _load(path, f"quickstart,model={model}")[1].finetune.pool == "gap"


def test_finetuning_a_swin_quickstart_run_builds_its_swin(tmp_path):
    """`python -m mim_jax.evaluate` on the Swin quickstart fine-tunes with the run's model: the
    fine-tuning quickstart takes the Swin quickstart's data and model, not the ViT's."""
    import json

    from configs import finetune, simmim
    run = tmp_path / "swin_run"
    run.mkdir()
    (run / "config.json").write_text(simmim.get_config("quickstart,model=swin").to_json())
    cfg = finetune.get_config(f"quickstart,pretrained={run}")
    assert cfg.model.name == "swin" and tuple(cfg.model.num_heads) == (3, 6)
    assert cfg.data.image_size == json.loads((run / "config.json").read_text())["data"][
        "image_size"]
