"""Each pretraining recipe starts where its official code starts: every initial tensor checked
against the rule read from the reference's init code (distribution, scale, truncation, zero or
non-zero bias). The recipe configs are used as they are, shrunk in depth and width only.

The rules, by reference:
* MAE: facebookresearch/mae models_mae.py, MaskedAutoencoderViT.initialize_weights and
  _init_weights: xavier-uniform Linear weights (qkv fused as one (D, 3D) matrix), zero
  biases; patch conv weight xavier-uniform on its (D, C*p*p) view, its bias left at torch's
  default; cls and mask tokens normal(.02); LayerNorm 1 / 0; fixed sin-cos positions.
* SimMIM ViT: microsoft/SimMIM models/simmim.py VisionTransformerForSimMIM._trunc_normal_
  (a=-std, b=std) with models/vision_transformer.py VisionTransformer._init_weights and
  fix_init_weight: Linear and patch-conv weights, cls and mask tokens from normal(.02) cut at
  +-1 std, zero biases; attn.proj and mlp.fc2 weights of block i (from 1) divided by
  sqrt(2 i); q / v biases zero; layer scale 0.1; shared relative position table zero. The
  1x1-conv decoder of models/simmim.py SimMIM is never re-initialised: torch's default.
* SimMIM Swin: models/swin_transformer.py SwinTransformer._init_weights (Linear only:
  timm trunc_normal_(.02), an untruncated normal in effect; zero biases), relative position
  tables trunc_normal_(.02), the patch conv at torch's default (no Conv2d branch),
  SwinTransformerForSimMIM's mask token trunc_normal_(.02); the decoder as for ViT.
* BEiT v2: microsoft/unilm beit2/modeling_pretrain.py
  VisionTransformerForMaskedImageModeling.__init__ (as SimMIM ViT, plus lm_head weight
  normal(.02) cut at +-1 std, zero bias) and VisionTransformerForMaskedImageModelingCLS: the
  cls_pt_layers are built after the init ran, so their Linear layers keep torch's default
  (weight and bias U(+-1/sqrt(fan_in))), then fix_init_cls_pt_weight divides their attn.proj
  and fc2 weights by sqrt(2 (early_layers + i + 1)).
* SparK: keyu-tian/SparK pretrain/decoder.py LightDecoder.initialize (Linear and Conv2d
  trunc_normal_(.02), zero bias; ConvTranspose2d kaiming_normal_(fan_out, relu), zero bias;
  BatchNorm 1 / 0), pretrain/spark.py SparK.__init__ (mask tokens trunc_normal_(.02, a=-.02,
  b=.02); densify projections at torch's default), and timm's ResNet (kaiming_normal_ fan_out
  convs, BatchNorm 1 / 0, each block's last BatchNorm scale 0).
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest

from conftest import recipe_config
from mim_jax import pretrained

TRUNC1_STD = 0.02 * 0.5396  # std of a normal(0, .02) cut at +-1 std


def normal(std):
    return ("normal", std)


def trunc1(scale=1.0):
    return ("trunc1", scale)


def uniform(bound):
    return ("uniform", bound)


def xavier(fan_in, fan_out):
    return uniform(math.sqrt(6.0 / (fan_in + fan_out)))


def torch_default(fan_in):
    return uniform(1.0 / math.sqrt(fan_in))


ZEROS, ONES = ("const", 0.0), ("const", 1.0)


def check_tensor(name, x, rule):
    x = np.asarray(x, np.float64).ravel()
    kind, value = rule
    n = x.size
    rel = max(0.05, 4.0 / math.sqrt(n))  # sampling error of a std estimate, generously
    if kind == "const":
        np.testing.assert_array_equal(x, np.float32(value), err_msg=name)
        return
    assert abs(x.mean()) < 5 * x.std() / math.sqrt(n) + 1e-12, f"{name}: mean {x.mean()}"
    if kind == "normal":
        assert abs(x.std() / value - 1) < rel, f"{name}: std {x.std():.5f}, expected {value}"
        if n >= 1000:  # untruncated: the tails go past 3 std
            assert np.abs(x).max() > 3 * value, f"{name}: max {np.abs(x).max()} (truncated?)"
    elif kind == "trunc1":
        bound = 0.02 * value
        assert np.abs(x).max() <= bound * (1 + 1e-6), f"{name}: max {np.abs(x).max()} > {bound}"
        assert abs(x.std() / (TRUNC1_STD * value) - 1) < rel, \
            f"{name}: std {x.std():.6f}, expected {TRUNC1_STD * value:.6f}"
    elif kind == "uniform":
        assert np.abs(x).max() <= value * (1 + 1e-6), f"{name}: max {np.abs(x).max()} > {value}"
        assert abs(x.std() / (value / math.sqrt(3)) - 1) < rel, \
            f"{name}: std {x.std():.5f}, expected {value / math.sqrt(3):.5f}"
    else:
        raise AssertionError(kind)


def check_all(params, rules):
    """Every tensor must match exactly one first rule (a regex on its path): nothing new slips
    through unchecked."""
    flat = {"/".join(getattr(k, "key", str(k)) for k in path): x
            for path, x in jax.tree_util.tree_leaves_with_path(params)}
    for name, x in flat.items():
        rule = next((r for pattern, r in rules if re.search(pattern, name)), None)
        assert rule is not None, f"{name} {x.shape}: no rule"
        check_tensor(name, x, rule(name, x) if callable(rule) else rule)
    return flat


def init_params(spec, **overrides):
    config = recipe_config(spec, **overrides)
    objective = pretrained.build_objective(config)
    params, _ = jax.jit(objective.init_variables)(jax.random.key(0))
    return config, params


def _block(name):
    return int(re.search(r"block_(\d+)", name).group(1))


def test_mae_init_is_the_official():
    config, params = init_params("configs/mae.py:variant=B/16", **{"model.depth": 2})
    D, p, C, mlp = 768, 16, 3, 3072
    d = config.objective.decoder_width
    check_all(params, [
        (r"patch_embed/kernel$", xavier(p * p * C, D)),
        (r"patch_embed/bias$", torch_default(p * p * C)),
        (r"(cls_token|mask_token)$", normal(0.02)),
        (r"^encoder/.*qkv/kernel$", xavier(D, 3 * D)),
        (r"^encoder/.*proj/kernel$", xavier(D, D)),
        (r"^encoder/.*fc1/kernel$", xavier(D, mlp)),
        (r"^encoder/.*fc2/kernel$", xavier(mlp, D)),
        (r"decoder_embed/kernel$", xavier(D, d)),
        (r"decoder_pred/kernel$", xavier(d, p * p * C)),
        (r"^decoder/.*qkv/kernel$", xavier(d, 3 * d)),
        (r"^decoder/.*proj/kernel$", xavier(d, d)),
        (r"^decoder/.*fc1/kernel$", xavier(d, 4 * d)),
        (r"^decoder/.*fc2/kernel$", xavier(4 * d, d)),
        (r"bias$", ZEROS),
        (r"scale$", ONES),
    ])


def _beit_vit_rules(depth_offset=1):
    """SimMIM-ViT / BEiT encoder: +-1-std truncated normal, depth rescale of proj and fc2."""
    def rescaled(name, x):
        return trunc1(1.0 / math.sqrt(2.0 * (_block(name) + depth_offset)))
    return [
        (r"^encoder/patch_embed/kernel$", trunc1()),
        (r"^encoder/(cls_token|mask_token)$", trunc1()),
        (r"^encoder/transformer/.*(attn/proj|fc2)/kernel$", rescaled),
        (r"^encoder/transformer/.*(qkv|fc1)/kernel$", trunc1()),
        (r"^encoder/rel_pos_bias/table$", ZEROS),
        (r"^encoder/transformer/.*/ls[12]$", ("const", 0.1)),
    ]


def test_simmim_vit_init_is_the_official():
    _, params = init_params("configs/simmim.py:model=vit_b", **{"model.depth": 3})
    check_all(params, _beit_vit_rules() + [
        (r"^decoder/kernel$", torch_default(768)),
        (r"^decoder/bias$", torch_default(768)),
        (r"bias$", ZEROS),
        (r"scale$", ONES),
    ])


def test_simmim_swin_init_is_the_official():
    config, params = init_params("configs/simmim.py:model=swin_b",
                                 **{"model.depths": (2, 2, 2, 2)})
    p, C = 4, 3
    width = params["decoder"]["kernel"].shape[-2]
    check_all(params, [
        (r"^encoder/patch_embed/(kernel|bias)$", torch_default(p * p * C)),
        (r"mask_token$", normal(0.02)),
        (r"relative_position_bias_table$", normal(0.02)),
        (r"^decoder/kernel$", torch_default(width)),
        (r"^decoder/bias$", torch_default(width)),
        (r"^encoder/.*kernel$", normal(0.02)),
        (r"bias$", ZEROS),
        (r"scale$", ONES),
    ])


def test_beit_v2_init_is_the_official():
    config, params = init_params("configs/beit.py:version=2",
                                 **{"model.depth": 4, "objective.early_layers": 2,
                                    "objective.tokenizer.checkpoint": None})
    early = config.objective.early_layers
    D, mlp = 768, 3072

    def head_rescaled(fan_in):
        def rule(name, x):
            return uniform(1.0 / math.sqrt(fan_in) / math.sqrt(2.0 * (early + 1 + _block(name))))
        return rule
    check_all(params, _beit_vit_rules() + [
        (r"^lm_head/kernel$", trunc1()),
        (r"^cls_head/.*attn/proj/kernel$", head_rescaled(D)),
        (r"^cls_head/.*fc2/kernel$", head_rescaled(mlp)),
        (r"^cls_head/.*(qkv|fc1)/kernel$", torch_default(D)),
        (r"^cls_head/.*(attn/proj|fc1)/bias$", torch_default(D)),
        (r"^cls_head/.*fc2/bias$", torch_default(mlp)),
        (r"^cls_head/.*/ls[12]$", ("const", 0.1)),
        (r"bias$", ZEROS),
        (r"scale$", ONES),
    ])


def test_spark_init_is_the_official():
    _, params = init_params("configs/spark.py:model=resnet50")
    shapes = {"/".join(getattr(k, "key", str(k)) for k in path): x.shape
              for path, x in jax.tree_util.tree_leaves_with_path(params)}

    def kaiming_fan_out(name, x):
        kh, kw, _, out = x.shape
        return normal(math.sqrt(2.0 / (kh * kw * out)))

    def upsample(name, x):  # ConvTranspose2d: torch's fan_out is in_channels x k x k
        return normal(math.sqrt(2.0 / (x.shape[0] * x.shape[1] * x.shape[-1])))

    def densify(name, x):  # torch's default, fan_in of the projection's kernel
        return torch_default(int(np.prod(shapes[re.sub(r"bias$", "kernel", name)][:3])))
    check_all(params, [
        (r"mask_token$", trunc1()),
        (r"densify.*/proj/(kernel|bias)$", densify),
        (r"^encoder/.*bn3/scale$", ZEROS),  # timm's ResNet: zero_init_last
        (r"^encoder/.*kernel$", kaiming_fan_out),
        (r"up.*/kernel$", upsample),
        (r"^decoder/.*kernel$", normal(0.02)),
        (r"bias$", ZEROS),
        (r"scale$", ONES),
    ])


@pytest.mark.parametrize("objective_spec", ["configs/simmim.py:model=vit_b",
                                            "configs/beit.py:version=2"])
def test_the_depth_rescale_divides_by_sqrt_2_layer(objective_spec):
    """The rescale is the step a sample std cannot tell from noise at the last block: compare
    the first and the last block directly (their ratio is sqrt(depth))."""
    overrides = {"model.depth": 8}
    if "beit" in objective_spec:
        overrides.update({"objective.tokenizer.checkpoint": None, "objective.early_layers": 4})
    _, params = init_params(objective_spec, **overrides)
    blocks = params["encoder"]["transformer"]
    first = np.std(np.asarray(blocks["block_0"]["fc2"]["kernel"]))
    last = np.std(np.asarray(blocks["block_7"]["fc2"]["kernel"]))
    assert abs(first / last / math.sqrt(8) - 1) < 0.03
