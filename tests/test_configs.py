"""Every config in configs/ loads, is documented, and resolves every name it references."""
import glob
import os
import re

import pytest

from mim_jax import objectives, train
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


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_docstring_commands_resolve(path):
    name = os.path.splitext(os.path.basename(path))[0]
    module, _ = _load(path, None)
    doc, args = _documented_args(module, name)
    assert "python -m mim_jax.main --config configs/" + name in doc
    assert args, "no runnable command in the docstring"
    for arg in args:
        arg = re.sub(r"pretrained=[^,]*", "", arg or "").strip(",") or None
        _, cfg = _load(path, arg)  # the pretraining runs the docstrings name do not exist here
        if cfg.get("finetune") is None:
            obj = objectives.build(cfg)  # objective, backbone and its variant
            assert obj.name == cfg.objective.name
        data_config.validate_data_config(cfg.data)  # dataset name is a known builder
        task = train.validate_config(cfg)  # evaluators, numbers, the fine-tuning classifier
        assert task.objective.name in objectives.names() + ["finetune", "linear_probe"]


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
