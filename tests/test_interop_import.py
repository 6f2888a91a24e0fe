"""Reading weights saved elsewhere into a run: Hugging Face and timm folders, official-layout
files as .safetensors or .pth, for finetune.pretrained, objective.teacher.checkpoint and
objective.tokenizer.checkpoint. Each source is built by its own library (random weights,
tiny sizes) or by mim_jax's exporters; what is read must be the source exactly."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mim_jax import convert, models, pretrained
from mim_jax.convert import official_vqkd, sources
from mim_jax.models import tokenizers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE, WIDTH, DEPTH, HEADS, MLP, PATCH = 32, 32, 2, 2, 64, 8
VIT = dict(name="vit", variant="Ti/8", width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP)


def _config(path, **model):
    return ml_collections.ConfigDict(dict(
        model=dict(VIT, **model) if model.get("name", "vit") == "vit" else model,
        data=dict(image_size=IMAGE, channels=3),
        finetune=dict(pretrained=str(path), pretrained_step=0, pool="gap")))


def _encoder(config, **options):
    return models.backbone_from_config(config.model, IMAGE, 3, **options)


def _target(config, **options):
    images = jnp.zeros((1, IMAGE, IMAGE, 3))
    return jax.eval_shape(_encoder(config, **options).init, jax.random.key(0), images)["params"]


def _fitted(path, **model):
    config = _config(path, **model)
    return pretrained.fitted_encoder_params(config, _target(config))


def _one_line_error(call, *parts):
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def _noisy(model, seed=0):
    """Every trainable tensor random and non-trivial: libraries start biases, norms and
    tokens at zeros and ones, which would hide a dropped or swapped tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model.float().eval()


def _images(channels=3, size=IMAGE):
    return np.random.default_rng(0).normal(size=(2, size, size, channels)).astype(np.float32)


def _torch_images(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _features(config, params, images, **options):
    return np.asarray(_encoder(config, **options).apply({"params": params}, images))


def _hf_vit_config(cls, **extra):
    sizes = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                 intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6)
    return cls(**dict(sizes, **extra))


def _hf_mae(tmp_path, **extra):
    config = _hf_vit_config(transformers.ViTMAEConfig, decoder_hidden_size=16,
                            decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                            decoder_intermediate_size=32, **extra)
    model = transformers.ViTMAEForPreTraining(config)
    # transformers 5.x random init leaves the fixed sin-cos table at zero: run its own.
    model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    model.vit.embeddings.initialize_weights()
    model = _noisy(model)
    folder = tmp_path / "hf_mae"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _timm():
    from timm_stub import import_timm
    return import_timm()


def _timm_folder(tmp_path, name, architecture, **args):
    timm = _timm()
    model = _noisy(timm.create_model(architecture, num_classes=0, **args))
    folder = tmp_path / name
    timm.models._hub.save_for_hf(model, folder, model_args=dict(num_classes=0, **args),
                                 safe_serialization=True)
    return model, folder


# ---------------------------------------------------------------- finetune.pretrained

def test_hugging_face_vit_mae_folder(tmp_path):
    """ViTMAEForPreTraining: its encoder, read back, is every tensor of the file."""
    model, folder = _hf_mae(tmp_path)
    fitted = _fitted(folder)
    back = convert.encoder_params_to_hf(fitted, image_size=IMAGE, prefix="vit.")
    state = {k: v.numpy() for k, v in model.state_dict().items() if k.startswith("vit.")}
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_allclose(back[key], value, atol=1e-6, err_msg=key)
    message = _one_line_error(lambda: _fitted(folder, width=64, num_heads=4),
                              f"finetune.pretrained='{folder}'", "model.width", "model.num_heads",
                              "/ model.variant")
    assert message.endswith("the weights are a ViT of width 32, depth 2, patch 8, 2 heads; "
                            "config.model has width 64, 4 heads (model.width, "
                            "model.num_heads / model.variant)."), message


def test_hugging_face_vit_folder_matches_its_features(tmp_path):
    """ViTModel (learned positions): our encoder computes the library's features."""
    model = _noisy(transformers.ViTModel(_hf_vit_config(transformers.ViTConfig)))
    folder = tmp_path / "hf_vit"
    model.save_pretrained(folder, safe_serialization=True)
    config = _config(folder, pos_embed="learned")
    params = pretrained.fitted_encoder_params(config, _target(config))
    images = _images()
    with torch.no_grad():
        ref = model(pixel_values=_torch_images(images)).last_hidden_state.numpy()
    np.testing.assert_allclose(_features(config, params, images), ref, atol=1e-5)
    # Its learned table would be dropped by a model with fixed positions: refused.
    _one_line_error(lambda: _fitted(folder), "with learned positions", "(model.pos_embed)")


def test_hugging_face_beit_folder_matches_its_features(tmp_path):
    """BeitForMaskedImageModeling: relative position bias per layer, layer scale, q/v biases."""
    config = _hf_vit_config(transformers.BeitConfig, use_relative_position_bias=True,
                            layer_scale_init_value=0.1, use_mask_token=True)
    model = _noisy(transformers.BeitForMaskedImageModeling(config))
    folder = tmp_path / "hf_beit"
    model.save_pretrained(folder, safe_serialization=True)
    beit = dict(pos_embed="none", qkv_bias="qv", layer_scale_init=0.1, rel_pos_bias="per_layer")
    config = _config(folder, **beit)
    params = pretrained.fitted_encoder_params(config, _target(config))
    images = _images()
    with torch.no_grad():
        hidden = model.beit(pixel_values=_torch_images(images)).last_hidden_state
        ref = model.layernorm(hidden).numpy()
    np.testing.assert_allclose(_features(config, params, images), ref, atol=1e-5)
    _one_line_error(lambda: _fitted(folder, **dict(beit, layer_scale_init=None)),
                    "with layer scale", "(model.layer_scale_init)")


def test_hugging_face_swin_folder(tmp_path):
    hf_config = transformers.SwinConfig(embed_dim=16, depths=[1, 2], num_heads=[2, 4],
                                        window_size=4, image_size=IMAGE, patch_size=4)
    model = _noisy(transformers.SwinModel(hf_config))
    folder = tmp_path / "hf_swin"
    model.save_pretrained(folder, safe_serialization=True)
    swin = dict(name="swin", variant="T", embed_dim=16, depths=(1, 2), num_heads=(2, 4),
                window_size=4, patch_size=4)
    fitted = _fitted(folder, **swin)
    back = convert.swin_params_to_hf({"encoder": fitted}, config=convert.config_from_hf(
        hf_config), prefix="")
    state = model.state_dict()
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)
    _one_line_error(lambda: _fitted(folder, **dict(swin, depths=(2, 2))),
                    "depths (1, 2)", "depths (2, 2) (model.depths / model.variant)")
    _one_line_error(lambda: _fitted(folder), "the weights are a Swin in the Hugging Face Swin "
                    "layout; config.model.name is 'vit' (model.name)")


def test_timm_vit_and_beit_folders_match_their_features(tmp_path):
    """timm's own folders (save_for_hf: config.json with architecture and model_args, and
    model.safetensors): a ViT with learned positions and a mean-pooling BEiT, whose norm
    belongs to its classifier, so the encoder ends without one."""
    sizes = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                 num_heads=HEADS, mlp_ratio=MLP / WIDTH)
    model, folder = _timm_folder(tmp_path, "timm_vit", "vit_tiny_patch16_224", **sizes)
    config = _config(folder, pos_embed="learned")
    params = pretrained.fitted_encoder_params(config, _target(config))
    images = _images()
    with torch.no_grad():
        ref = model.forward_features(_torch_images(images)).numpy()
    np.testing.assert_allclose(_features(config, params, images), ref, atol=1e-5)

    model, folder = _timm_folder(tmp_path, "timm_beit", "beit_base_patch16_224", **sizes)
    config = _config(folder, pos_embed="none", qkv_bias="qv", layer_scale_init=0.1,
                     rel_pos_bias="per_layer")
    params = pretrained.fitted_encoder_params(config, _target(config, final_norm=False))
    assert "norm" not in params
    with torch.no_grad():
        ref = model.forward_features(_torch_images(images)).numpy()
    np.testing.assert_allclose(_features(config, params, images, final_norm=False), ref,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_timm_convnet_folders(tmp_path, name):
    """timm ResNet / ConvNeXt folders: the encoder and BatchNorm statistics, every tensor."""
    if name == "resnet":
        sizes = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
        arch = dict(name="resnet", variant="50", depths=(1, 1, 1, 1), widths=(8, 16, 32, 64))
        wrong = dict(arch, widths=(8, 16, 32, 32))
        model, folder = _timm_folder(tmp_path, name, "resnet50", **sizes)
    else:
        sizes = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
        arch = dict(name="convnext", variant="T", **sizes)
        wrong = dict(arch, depths=(1, 1, 2, 1))
        model, folder = _timm_folder(tmp_path, name, "convnext_tiny", **sizes)
    config = _config(folder, **arch)
    encoder = _encoder(config)
    variables = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
    stats = variables.get("batch_stats")
    fitted = pretrained.fitted_encoder_params(config, variables["params"], stats)
    got = {"params": {"encoder": fitted[0] if stats else fitted}}
    if stats:
        got["batch_stats"] = {"encoder": fitted[1]}
    back = convert.convnet_variables_to_timm(got, config=encoder.config)
    state = model.state_dict()
    for key, value in back.items():
        if not key.startswith("head.") and not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)
    config = _config(folder, **wrong)
    _one_line_error(lambda: pretrained.fitted_encoder_params(
        config, jax.eval_shape(_encoder(config).init, jax.random.key(0),
                               jnp.zeros((1, IMAGE, IMAGE, 3)))["params"],
        stats and jax.eval_shape(_encoder(config).init, jax.random.key(0),
                                 jnp.zeros((1, IMAGE, IMAGE, 3)))["batch_stats"]),
        "(model.widths / model.variant)" if name == "resnet" else
        "(model.depths / model.variant)")


def _random_vit_params(config, seed=0):
    encoder = _encoder(config)
    params = encoder.init(jax.random.key(seed), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [np.asarray(x) + rng.normal(0, 0.05, np.shape(x)).astype(
        np.float32) for x in leaves])


def test_official_mae_file_in_bfloat16_safetensors(tmp_path):
    """An official-layout MAE encoder written by mim_jax's exporter as bfloat16 safetensors:
    read and upcast, equal to the parameters rounded to bfloat16."""
    import ml_dtypes
    config = _config("")
    params = _random_vit_params(config)
    path = tmp_path / "mae_encoder.safetensors"
    convert.write_safetensors(convert.mae_params_to_official({"encoder": params},
                                                             image_size=IMAGE), path,
                              dtype="bfloat16")
    fitted = _fitted(path)
    for got, want in zip(jax.tree.leaves(fitted), jax.tree.leaves(params)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_an_exported_folder_records_its_heads(tmp_path):
    """mim_jax_export.json names the run's model: the heads come from it, not config.model."""
    config = _config("", num_heads=4)
    params = _random_vit_params(config)
    folder = tmp_path / "exported"
    folder.mkdir()
    convert.write_safetensors(convert.mae_params_to_official({"encoder": params},
                                                             image_size=IMAGE),
                              folder / "model.safetensors")
    (folder / sources.EXPORT_RECORD).write_text(json.dumps(dict(
        format="official", objective="mae", model=dict(VIT, num_heads=4), step=8,
        data=dict(image_size=IMAGE, channels=3, mean=[0.5] * 3, std=[0.25] * 3))))
    for got, want in zip(jax.tree.leaves(_fitted(folder, num_heads=4)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
    _one_line_error(lambda: _fitted(folder), "4 heads; config.model has 2 heads "
                    "(model.num_heads / model.variant)")


def test_a_file_holding_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    _one_line_error(lambda: _fitted(path), f"finetune.pretrained='{path}'",
                    "torch.nn.modules.linear.Linear", "does not unpickle")


# ---------------------------------------------------------------- teachers and tokenizers

def _vqkd_config(teacher, tmp_path, **teacher_fields):
    from configs import vqkd as vqkd_config
    c = vqkd_config.get_config("quickstart")
    c.objective.teacher.update(checkpoint=str(teacher), **teacher_fields)
    c.objective.tokenizer.update(width=32, depth=1, num_heads=2, mlp_dim=64, decoder_width=32,
                                 decoder_heads=2, decoder_mlp_dim=64, n_codes=16)
    c.data.data_dir = str(tmp_path)
    return c


def test_teacher_from_a_hugging_face_folder(tmp_path):
    """VQ-KD's teacher from a ViTMAE folder, no variant needed: its config.json gives the
    heads and input size; the weights reach the model state unchanged."""
    model, folder = _hf_mae(tmp_path, num_channels=1, image_size=28, patch_size=4)
    c = _vqkd_config(folder, tmp_path)
    objective = pretrained.build_objective(c)
    fresh = jax.eval_shape(objective.init_variables, jax.random.key(0))
    fresh = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), fresh)
    _, state = pretrained.load_frozen(c, objective, *fresh)
    want = convert.mae_params_from_hf(
        {k: v for k, v in model.state_dict().items() if k.startswith("vit.")},
        num_heads=HEADS)["encoder"]
    assert jax.tree.structure(state["teacher"]) == jax.tree.structure(want)
    for got, ref in zip(jax.tree.leaves(state["teacher"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, ref)
    c.objective.teacher.variant = "S/4"  # width 384: the folder's 32 does not fit
    _one_line_error(lambda: pretrained.build_objective(c),
                    "objective.teacher.checkpoint=", "objective.teacher.variant='S/4' has "
                    "width 384")


def test_teacher_from_a_timm_folder(tmp_path):
    """A timm ViT folder as the teacher: learned positions, heads and input from its
    config.json (pretrained_cfg's mean / std, not the data's)."""
    from mim_jax.convert import timm_vit
    model, folder = _timm_folder(tmp_path, "timm_vit", "vit_tiny_patch16_224", img_size=28,
                                 patch_size=4, in_chans=1, embed_dim=WIDTH, depth=DEPTH,
                                 num_heads=HEADS, mlp_ratio=MLP / WIDTH)
    c = _vqkd_config(folder, tmp_path)
    objective = pretrained.build_objective(c)
    teacher = objective.frozen["teacher"].part  # the FrozenEncoder resolved from the folder
    assert teacher.module.pos_embed == "learned" and teacher.image_size == 28
    assert tuple(teacher.mean) == (0.5,) and tuple(teacher.std) == (0.5,)
    fresh = jax.eval_shape(objective.init_variables, jax.random.key(0))
    fresh = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), fresh)
    _, state = pretrained.load_frozen(c, objective, *fresh)
    want = timm_vit.vit_params_from_timm(model.state_dict(), num_heads=HEADS)["encoder"]
    for got, ref in zip(jax.tree.leaves(state["teacher"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, ref)


def test_vqkd_tokenizer_from_official_safetensors(tmp_path):
    """objective.tokenizer.checkpoint: an official-layout VQ-KD as .safetensors."""
    from configs import vqkd as vqkd_config
    cfg = vqkd_config.tokenizer_config(quickstart=True)
    cfg.update(width=32, depth=1, num_heads=2, mlp_dim=64, n_codes=16, image_size=16)
    spec = tokenizers.build(cfg, 16, 1)
    images = jnp.zeros((1, 16, 16, 1))
    params = jax.tree.map(np.asarray, spec.module.init(jax.random.key(0), images)["params"])
    path = tmp_path / "vqkd.safetensors"
    convert.write_safetensors(official_vqkd.params_to_official(params), path)
    cfg.checkpoint = str(path)
    spec = tokenizers.build(cfg, 16, 1)
    loaded = pretrained.load_tokenizer(spec, jax.eval_shape(
        spec.module.init, jax.random.key(0), images)["params"])
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
