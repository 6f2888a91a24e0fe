"""Each pretraining recipe optimises as its official code: which tensors are weight-decayed, and
the learning rate at given steps of an ImageNet-1K run (1,281,167 images).

Official rules (read from the reference code):
* MAE (facebookresearch/mae main_pretrain.py): timm's add_weight_decay without a skip list: no
  decay for 1-D tensors and biases only, so the cls and mask tokens are decayed.
  util/lr_sched.py adjust_learning_rate, per iteration: lr x t / warmup, then a half cosine
  from lr to min_lr over the remaining epochs.
* SimMIM (microsoft/SimMIM optimizer.py build_pretrain_optimizer / get_pretrain_param_groups):
  1-D tensors, biases and `encoder.` + the encoder's no_weight_decay() (Swin: mask_token,
  absolute_pos_embed; ViT: pos_embed, cls_token); the keyword list never matches, so Swin's
  relative position tables, and the ViT's mask token and shared table, are decayed.
  lr_scheduler.py: lr x bs/512 (main_simmim.py); 800 epochs: MultiStepLRScheduler warming up
  from WARMUP_LR (5e-7 x bs/512) over 10 epochs, x0.1 at epoch 700; 100 epochs: timm's
  CosineLRScheduler(t_initial=all steps, lr_min=MIN_LR, warmup_lr_init=WARMUP_LR), whose cosine
  runs over all steps with the warmup overriding the first ones.
* BEiT v1 / v2 (microsoft/unilm beit/optim_factory.py get_parameter_groups with
  modeling_pretrain.py no_weight_decay = {pos_embed, cls_token}): the mask token and the shared
  relative position table are decayed. utils.py cosine_scheduler: warmup
  np.linspace(0, lr, warmup_iters) (reaching lr on the warmup's last step), then a cosine from
  lr to min_lr over the remaining iterations.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest

from conftest import recipe_config
from mim_jax import optim, pretrained, workdir

IMAGENET = 1_281_167


def _decayed(config):
    objective = pretrained.build_objective(config)
    params, _ = jax.eval_shape(objective.init_variables, jax.random.key(0))
    mask = optim.decay_mask(params, tuple(config.optimizer.get("no_decay",
                                                               optim.DEFAULT_NO_DECAY)))
    return {"/".join(getattr(k, "key", str(k)) for k in path): bool(v)
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}


WEIGHT_DECAY = [
    # (recipe, overrides, decayed paths (regex), undecayed paths (regex))
    ("configs/mae.py:variant=B/16", {"model.depth": 2},
     [r"^encoder/cls_token$", r"^decoder/mask_token$", r"qkv/kernel$", r"decoder_pred/kernel$"],
     [r"/bias$", r"/scale$"]),
    ("configs/simmim.py:model=vit_b", {"model.depth": 2},
     [r"^encoder/mask_token$", r"^encoder/rel_pos_bias/table$", r"^decoder/kernel$",
      r"patch_embed/kernel$"],
     [r"^encoder/cls_token$", r"/ls[12]$", r"/bias$", r"/scale$"]),
    ("configs/simmim.py:model=swin_b", {"model.depths": (2, 2, 2, 2)},
     [r"relative_position_bias_table$", r"reduction/kernel$", r"^decoder/kernel$"],
     [r"^encoder/mask_token$", r"/bias$", r"/scale$"]),
    ("configs/beit.py:version=2", {"model.depth": 4, "objective.early_layers": 2,
                                   "objective.tokenizer.checkpoint": None},
     [r"^encoder/mask_token$", r"^encoder/rel_pos_bias/table$", r"^lm_head/kernel$",
      r"^cls_head/.*fc1/kernel$"],
     [r"^encoder/cls_token$", r"/ls[12]$", r"/bias$", r"/scale$"]),
    ("configs/spark.py:model=resnet50", {},
     [r"^encoder/.*conv1/kernel$", r"^densify_1/proj/kernel$", r"^decoder/proj/kernel$"],
     [r"mask_token$", r"/bias$", r"/scale$"]),
]


@pytest.mark.parametrize("spec,overrides,decayed,undecayed", WEIGHT_DECAY,
                         ids=[w[0].split("/")[1] for w in WEIGHT_DECAY])
def test_weight_decay_follows_the_reference(spec, overrides, decayed, undecayed):
    mask = _decayed(recipe_config(spec, **overrides))
    for pattern in decayed:
        hits = [k for k in mask if re.search(pattern, k)]
        assert hits and all(mask[k] for k in hits), (pattern, {k: mask[k] for k in hits})
    for pattern in undecayed:
        hits = [k for k in mask if re.search(pattern, k)]
        assert hits and not any(mask[k] for k in hits), (pattern, {k: mask[k] for k in hits})
    # And the reference's general rule: every other tensor of 2 or more dimensions decays.
    for name, decays in mask.items():
        if not any(re.search(p, name) for p in undecayed) and "kernel" in name:
            assert decays, name


def _our_lr(config, steps):
    steps_per_epoch = IMAGENET // config.batch_size
    total = int(round(config.num_epochs * steps_per_epoch))
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    peak = optim.peak_learning_rate(config.optimizer, config.batch_size)
    schedule = optim.schedule_from_config(config.optimizer, peak, total, warmup,
                                          steps_per_epoch)
    return np.array([float(schedule(t)) for t in steps]), steps_per_epoch, total, warmup


def test_simmim_800_epochs_steps_down_at_700():
    config = recipe_config("configs/simmim.py:model=swin_b,epochs=800")
    n = IMAGENET // 2048
    warmup_t, milestone = 10 * n, 700 * n
    base, warmup_lr = 1e-4 * 2048 / 512, 5e-7 * 2048 / 512
    steps = [0, 1, warmup_t // 2, warmup_t - 1, warmup_t, milestone - 1, milestone, 800 * n - 1]

    def official(t):  # timm-style MultiStepLRScheduler of the reference's lr_scheduler.py
        if t < warmup_t:
            return warmup_lr + t * (base - warmup_lr) / warmup_t
        return base * 0.1 ** sum(t >= m for m in [milestone])
    ours, *_ = _our_lr(config, steps)
    np.testing.assert_allclose(ours, [official(t) for t in steps], rtol=1e-5)


def test_simmim_100_epochs_cosine_over_all_steps():
    config = recipe_config("configs/simmim.py:model=swin_b,epochs=100")
    n = IMAGENET // 2048
    total, warmup_t = 100 * n, 10 * n
    base, warmup_lr, lr_min = 2e-4 * 4, 1e-6 * 4, 1e-5 * 4
    steps = [0, 7, warmup_t - 1, warmup_t, total // 2, total - 1]

    def official(t):  # timm CosineLRScheduler(t_initial=total, warmup_prefix=False)
        if t < warmup_t:
            return warmup_lr + t * (base - warmup_lr) / warmup_t
        return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / total))
    ours, *_ = _our_lr(config, steps)
    np.testing.assert_allclose(ours, [official(t) for t in steps], rtol=1e-5)


def test_mae_warmup_then_cosine():
    config = recipe_config("configs/mae.py:variant=B/16,epochs=800")
    ours, n, total, warmup = _our_lr(config, [0, 100, 40 * 312 - 1, 40 * 312, 400 * 312])
    lr = 1.5e-4 * 4096 / 256

    def official(t):  # util/lr_sched.py adjust_learning_rate at epoch = t / n
        epoch = t / n
        if epoch < 40:
            return lr * epoch / 40
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 40) / (800 - 40)))
    np.testing.assert_allclose(ours, [official(t) for t in [0, 100, 40 * 312 - 1, 40 * 312,
                                                           400 * 312]], rtol=1e-5)


def test_beit_cosine_after_warmup():
    """BEiT's warmup is np.linspace(0, lr, W), reaching lr at step W-1; ours reaches it at
    step W (a relative difference of 1/W in the warmup, documented). After it, equal."""
    config = recipe_config("configs/beit.py:version=2")
    n = IMAGENET // config.batch_size
    total, warmup = int(config.num_epochs) * n, 10 * n
    base, final = 1.5e-3, 1e-5
    steps = [warmup, warmup + 1000, (total + warmup) // 2, total - 1]
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total - warmup) /
                                                       (total - warmup)))
    ours, *_ = _our_lr(config, steps)
    np.testing.assert_allclose(ours, [cosine[t - warmup] for t in steps], rtol=1e-5)
    warm, *_ = _our_lr(config, [warmup // 2])
    assert abs(warm[0] / (base * (warmup // 2) / (warmup - 1)) - 1) < 2.0 / warmup


def test_an_older_mae_run_is_told_that_the_decay_rule_changed():
    new = workdir.flatten(recipe_config("configs/mae.py:quickstart"))
    old = {k: v for k, v in new.items() if k != "optimizer.no_decay"}  # recorded before it
    assert workdir.changed_fields(old, new) == [
        "optimizer.no_decay: ['cls_token', 'mask_token', 'pos_embed', "
        "'relative_position_bias_table', 'rel_pos_bias/table'] -> []"]


def test_spark_lr_and_weight_decay_follow_lr_wd_annealing():
    """keyu-tian/SparK pretrain/utils/lr_control.py lr_wd_annealing: warmup from 0.005 x peak,
    then 0.001 + 0.999 x half cosine over (max_it - 1 - wp_it) iterations; weight decay on a
    cosine from wd to wd_end over max_it - 1. Ours spans the lr cosine over max_it - wp_it
    (a relative difference below 1 / max_it, documented); the weight decay is the same."""
    config = recipe_config("configs/spark.py:model=resnet50")
    steps = [0, 500, 40 * 312 - 1, 40 * 312 + 10, 800 * 312, 1600 * 312 - 2]
    ours, n, total, warmup = _our_lr(config, steps)
    peak = 2e-4 * 4096 / 256

    def official(t):
        if t < warmup:
            return peak * (0.005 + 0.995 * t / warmup)
        ratio = (t - warmup) / (total - 1 - warmup)
        return peak * (0.001 + 0.999 * (0.5 + 0.5 * math.cos(math.pi * ratio)))
    np.testing.assert_allclose(ours, [official(t) for t in steps], rtol=2e-4)
    wd = optim.weight_decay_rule(config.optimizer, total)
    for t in [0, 1000, total // 2, total - 1]:
        expected = 0.2 + (0.04 - 0.2) * (0.5 + 0.5 * math.cos(math.pi * t / (total - 1)))
        assert float(wd(t)) == pytest.approx(expected, rel=1e-5)
