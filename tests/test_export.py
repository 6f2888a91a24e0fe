"""python -m mim_jax.export: every objective's export is loaded by the library itself
(transformers' from_pretrained, timm's create_model('local-dir:...')) and gives the features
of mim_jax's encoder on the same images; official layouts read back to the same parameters."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed", allow_module_level=True)
from timm_stub import import_timm  # noqa: E402

timm = import_timm()

from conftest import tiny_mae_config, tiny_train_config  # noqa: E402
from mim_jax import convert, export, models, objectives, train  # noqa: E402
from mim_jax.convert import files, official_vqkd  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE, BATCH = 32, 2
BEIT_MODEL = dict(name="vit", variant="Ti/4", width=64, depth=2, num_heads=4, mlp_dim=128,
                  pos_embed="none", rel_pos_bias="shared", qkv_bias="qv", layer_scale_init=0.1,
                  init_style="beit")
SWIN_MODEL = dict(name="swin", variant="T", embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                  window_size=4)


def _perturbed(tree, seed=0):
    """Every leaf moved off its init (zeros / ones would hide a dropped or swapped tensor)."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda a: (np.asarray(a, np.float32)
                                   + 0.05 * rng.randn(*np.shape(a)).astype(np.float32)), tree)


def _config(model, objective, image_size=IMAGE):
    return ml_collections.ConfigDict(dict(
        data=dict(image_size=image_size, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        model=dict(model), objective=dict(objective)))


def _images(size=IMAGE):
    return np.random.RandomState(1).randn(BATCH, size, size, 3).astype(np.float32)


def _torch(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _run(config, params, model_state=None):
    return export.Run(config=config, params=params, model_state=model_state or {}, step=7,
                      source="/runs/test")


def _export(run, fmt, out):
    made = export.export_run(run, fmt)
    written = export.write(made, run, fmt, out)
    return made, written


def _loaded_strictly(cls, out, **kwargs):
    model, info = cls.from_pretrained(out, output_loading_info=True,
                                      attn_implementation="eager", **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _timm(out):
    return timm.create_model(f"local-dir:{out}", pretrained=True).eval()


def _close(theirs, ours, atol=1e-5):
    theirs = np.asarray(theirs.detach().numpy() if hasattr(theirs, "detach") else theirs)
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- MAE

@pytest.fixture(scope="module")
def mae_run():
    config = tiny_mae_config()
    config.data.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    obj = objectives.build(config)
    params = _perturbed(obj.init(jax.random.key(0)))
    features = obj.encoder.apply({"params": params["encoder"]}, _images())
    return _run(config, params), features


def test_mae_to_hf_is_a_vitmae_with_its_decoder(mae_run, tmp_path):
    run, features = mae_run
    _, written = _export(run, "hf", tmp_path)
    assert written == ["model.safetensors", "config.json", "mim_jax_export.json"]
    _loaded_strictly(transformers.ViTMAEForPreTraining, tmp_path)
    encoder = transformers.ViTMAEModel.from_pretrained(tmp_path, mask_ratio=0.0,
                                                       attn_implementation="eager").eval()
    noise = torch.arange(64.0).repeat(BATCH, 1)  # ascending: every patch kept, in order
    with torch.no_grad():
        _close(encoder(_torch(_images()), noise=noise).last_hidden_state, features)


def test_mae_to_timm_is_a_vision_transformer(mae_run, tmp_path):
    run, features = mae_run
    _export(run, "timm", tmp_path)
    with torch.no_grad():
        _close(_timm(tmp_path).forward_features(_torch(_images())), features)
    record = json.loads((tmp_path / "mim_jax_export.json").read_text())
    assert record["format"] == "timm" and record["step"] == 7 and record["model"]["width"] == 64


def test_mae_to_official_reads_back_to_the_same_parameters(mae_run, tmp_path):
    run, _ = mae_run
    _export(run, "official", tmp_path)
    back = convert.mae_params_from_official(convert.read_weights(tmp_path), num_heads=4,
                                            decoder_num_heads=4)
    jax.tree.map(np.testing.assert_array_equal, back, run.params)


def test_half_precision_export_loads(mae_run, tmp_path):
    run, features = mae_run
    made = export.export_run(run, "timm")
    export.write(made, run, "timm", tmp_path, dtype="bfloat16")
    stored = convert.read_weights(tmp_path)
    assert str(stored["blocks.0.attn.qkv.weight"].dtype) == "bfloat16"
    with torch.no_grad():
        _close(_timm(tmp_path).forward_features(_torch(_images())), features, atol=0.1)
    with pytest.raises(ValueError, match="dtype='int8'; allowed"):
        export.write(made, run, "timm", tmp_path, dtype="int8")


# ---------------------------------------------------------------- BEiT-style ViTs

def _beit_encoder_params(seed=0):
    """A BEiT-style ViT's module and perturbed parameters. BEiT layouts store q and v biases
    only (a key bias adds the same score to every key, which the softmax ignores), so the key
    part of each fused bias is kept at zero to compare parameters after a round trip."""
    module = models.vit_from_config(ml_collections.ConfigDict(BEIT_MODEL), IMAGE, 3,
                                    use_mask_token=True)
    params = _perturbed(module.init(jax.random.key(seed), _images())["params"], seed)
    for block in params["transformer"].values():
        block["attn"]["qkv"]["bias"][1] = 0.0  # (q, k, v) x heads x head width
    return module, params


@pytest.fixture(scope="module")
def simmim_vit_run():
    module, encoder = _beit_encoder_params()
    config = _config(BEIT_MODEL, dict(name="simmim", mask_ratio=0.6, mask_patch_size=8))
    decoder = _perturbed({"kernel": np.zeros((1, 1, 64, 4 * 4 * 3)),
                          "bias": np.zeros(4 * 4 * 3)}, 1)
    params = {"encoder": encoder, "decoder": decoder}
    return _run(config, params), module.apply({"params": encoder}, _images())


def test_simmim_vit_to_hf_is_a_beit_model(simmim_vit_run, tmp_path):
    run, features = simmim_vit_run
    made, _ = _export(run, "hf", tmp_path)
    assert any("head" in note for note in made.notes)
    model = _loaded_strictly(transformers.BeitModel, tmp_path, add_pooling_layer=False)
    with torch.no_grad():
        _close(model(_torch(_images())).last_hidden_state, features)


def test_simmim_vit_to_timm_is_a_beit(simmim_vit_run, tmp_path):
    run, features = simmim_vit_run
    _export(run, "timm", tmp_path)
    with torch.no_grad():
        _close(_timm(tmp_path).forward_features(_torch(_images())), features)


def test_simmim_vit_to_official_reads_back(simmim_vit_run, tmp_path):
    run, _ = simmim_vit_run
    _export(run, "official", tmp_path)
    back = convert.simmim_params_from_official(convert.read_weights(tmp_path), num_heads=4)
    jax.tree.map(np.testing.assert_array_equal, back, run.params)


def test_plain_simmim_vit_to_hf_and_timm(tmp_path):
    """The SimMIM quickstart's ViT: sin-cos positions, q/k/v biases, a mask token."""
    config = _config(dict(name="vit", variant="Ti/4", width=64, depth=2, num_heads=4,
                          mlp_dim=128), dict(name="simmim", mask_ratio=0.5, mask_patch_size=8))
    obj = objectives.build(config)
    params = _perturbed(obj.init(jax.random.key(4)), 4)
    features = obj.encoder.apply({"params": params["encoder"]}, _images())
    run = _run(config, params)
    _export(run, "hf", tmp_path / "hf")
    _loaded_strictly(transformers.ViTForMaskedImageModeling, tmp_path / "hf")
    model = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False,
                                                  attn_implementation="eager").eval()
    with torch.no_grad():
        _close(model(_torch(_images())).last_hidden_state, features)
    back = convert.simmim_params_from_hf_vit(convert.read_weights(tmp_path / "hf"), num_heads=4)
    np.testing.assert_array_equal(back["decoder"]["kernel"], params["decoder"]["kernel"])
    _export(run, "timm", tmp_path / "timm")
    with torch.no_grad():
        _close(_timm(tmp_path / "timm").forward_features(_torch(_images())), features)
    with pytest.raises(ValueError, match="sin-cos position embedding"):
        export.export_run(run, "official")  # the official SimMIM ViT has none


def test_beit_to_hf_keeps_the_lm_head(tmp_path):
    module, encoder = _beit_encoder_params(2)
    lm_head = _perturbed({"kernel": np.zeros((64, 96)), "bias": np.zeros(96)}, 3)
    config = _config(BEIT_MODEL, dict(name="beit"))
    run = _run(config, {"encoder": encoder, "lm_head": lm_head})
    _export(run, "hf", tmp_path)
    model = _loaded_strictly(transformers.BeitForMaskedImageModeling, tmp_path)
    features = np.asarray(module.apply({"params": encoder}, _images()))
    ours = features[:, 1:] @ lm_head["kernel"] + lm_head["bias"]
    with torch.no_grad():
        _close(model(_torch(_images())).logits, ours, atol=2e-5)
    _export(run, "official", tmp_path / "official")
    back = convert.beit_params_from_official(convert.read_weights(tmp_path / "official"),
                                             num_heads=4)
    jax.tree.map(np.testing.assert_array_equal, back, run.params)


# ---------------------------------------------------------------- Swin

@pytest.fixture(scope="module")
def swin_run():
    config = _config(SWIN_MODEL, dict(name="simmim", mask_ratio=0.6, mask_patch_size=8))
    obj = objectives.build(config)
    params = _perturbed(obj.init(jax.random.key(0)))
    features = obj.encoder.apply({"params": params["encoder"]}, _images())
    return _run(config, params), np.asarray(features).reshape(BATCH, -1, 32)


def test_swin_to_hf_is_a_swin_with_the_simmim_head(swin_run, tmp_path):
    run, features = swin_run
    _export(run, "hf", tmp_path)
    _loaded_strictly(transformers.SwinForMaskedImageModeling, tmp_path)
    model = transformers.SwinModel.from_pretrained(tmp_path, add_pooling_layer=False,
                                                   attn_implementation="eager").eval()
    with torch.no_grad():
        _close(model(_torch(_images())).last_hidden_state, features)


def test_swin_to_official_reads_back_and_timm_is_refused(swin_run, tmp_path):
    run, _ = swin_run
    _export(run, "official", tmp_path)
    state = convert.read_weights(tmp_path)
    back = convert.simmim_params_from_official(
        state, swin_config=convert.swin_config_from_official(state))
    jax.tree.map(np.testing.assert_array_equal, back, run.params)
    with pytest.raises(ValueError, match="a Swin exports to 'hf' or 'official'"):
        export.export_run(run, "timm")


# ---------------------------------------------------------------- SparK's ConvNets

@pytest.mark.parametrize("model", [
    dict(name="resnet", variant="50", depths=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
    dict(name="convnext", variant="T", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))])
def test_spark_encoders_to_timm(model, tmp_path):
    size = 64
    config = _config(model, dict(name="spark"), image_size=size)
    backbone = models.backbone_from_config(config.model, size, 3)
    variables = _perturbed(backbone.init(jax.random.key(0), _images(size)))
    params = {"encoder": variables["params"]}
    state = {}
    if "batch_stats" in variables:  # running variances must stay positive
        stats = jax.tree.map(np.abs, variables["batch_stats"])
        state, variables = {"batch_stats": {"encoder": stats}}, dict(variables,
                                                                      batch_stats=stats)
    run = _run(config, params, state)
    ours = backbone.apply(variables, _images(size))[-1]
    _export(run, "timm", tmp_path)
    with torch.no_grad():
        theirs = _timm(tmp_path).forward_features(_torch(_images(size))).permute(0, 2, 3, 1)
    _close(theirs, ours, atol=1e-4)
    with pytest.raises(ValueError, match="--to=hf: SparK"):
        export.export_run(run, "hf")
    if model["name"] == "resnet":  # the quickstart's narrow stem: the official layout only
        run.config.model.stem_width = 16
        with pytest.raises(ValueError, match="stem_width=16, but timm's ResNet stem is 64"):
            export.export_run(run, "timm")


# ---------------------------------------------------------------- VQ-KD

def test_vqkd_to_official_is_the_official_state_dict(tmp_path):
    from test_vqkd import official_state_dict
    state = official_state_dict()
    params = official_vqkd.params_from_official(state, num_heads=2, decoder_num_heads=2)
    codebook = official_vqkd.codebook_state_from_official(state)
    params = {k: v for k, v in params.items() if k != "codebook"}
    run = _run(_config(dict(name="vit"), dict(name="vqkd")), params, {"codebook": codebook})
    _export(run, "official", tmp_path)
    written = convert.read_weights(tmp_path)
    ours_keys = {k for k in state if not k.startswith(("teacher", "scaling_layer", "loss"))}
    assert set(written) == ours_keys
    # The EMA's own running sums (quantize.embedding.cluster_size / embed_avg / initted) are
    # rebuilt from the codebook and its counts: mim_jax keeps one set of statistics.
    rebuilt = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
               "quantize.embedding.initted")
    for key in ours_keys - set(rebuilt):
        np.testing.assert_array_equal(written[key], np.asarray(state[key], np.float32),
                                      err_msg=key)
    with pytest.raises(ValueError, match="official' only"):
        export.export_run(run, "hf")


# ---------------------------------------------------------------- the command

@pytest.mark.slow
def test_export_command_on_a_run(tfds_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_train_config(tfds_dir), workdir)
    out = tmp_path / "timm"
    command = [sys.executable, "-m", "mim_jax.export", f"--workdir={workdir}", "--to=timm",
               f"--out={out}", "--step=4"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "from step 4 of" in done.stdout and "local-dir:" in done.stdout
    assert json.loads((out / "mim_jax_export.json").read_text())["step"] == 4
    assert set(convert.read_weights(out)) >= {"cls_token", "pos_embed", "norm.weight"}
    bad = subprocess.run(command[:-1] + ["--step=5"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("mim_jax.export: --step=5:")
    # A bit flipped in the newest checkpoint: the export takes the one before, or names it.
    from test_faults import _flip_one_bit, _largest_file
    _flip_one_bit(_largest_file(os.path.join(workdir, "checkpoints", "8", "default")))
    assert export.read_run(workdir).step == 4
    with pytest.raises(ValueError, match="damaged"):
        export.read_run(workdir, 8)


def test_runs_without_an_export_are_refused_with_one_line(mae_run):
    run, _ = mae_run
    with pytest.raises(ValueError, match=r"--to='onnx'; allowed: \['hf', 'timm', 'official'\]"):
        export.export_run(run, "onnx")


def _finetuned_run(model, image_size, seed=0):
    """A fine-tuning run's config and perturbed classifier (10 classes), random init."""
    from configs import finetune as finetune_config
    from mim_jax import pretrained
    config = finetune_config.get_config("quickstart")
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model)
        config.data.update(image_size=image_size, channels=3)
    obj = pretrained.build_objective(config)
    params, state = obj.init_variables(jax.random.key(seed))
    params = _perturbed(params, seed)
    if state.get("batch_stats"):  # running variances must stay positive
        state = dict(state, batch_stats=jax.tree.map(np.abs, _perturbed(state["batch_stats"])))
    images = _images(image_size)
    logits = obj.model.apply({"params": params, **state}, images, train=False)
    return _run(config, params, state), images, np.asarray(logits)


@pytest.mark.parametrize("model,size", [
    (dict(name="vit", variant="Ti/4", width=64, depth=2, num_heads=4, mlp_dim=128), IMAGE),
    (dict(name="resnet", variant="50", depths=(1, 1, 1, 1), widths=(8, 16, 32, 64)), 64),
    (dict(name="convnext", variant="T", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)), 64)])
def test_a_fine_tuned_classifier_is_the_same_timm_classifier(model, size, tmp_path):
    run, images, logits = _finetuned_run(model, size)
    made, _ = _export(run, "timm", tmp_path)
    assert "model(images)" in made.loader
    with torch.no_grad():
        _close(_timm(tmp_path)(_torch(images)), logits, atol=1e-4)
    with pytest.raises(ValueError, match="a fine-tuned classifier exports to 'timm'"):
        export.export_run(run, "hf")


def test_a_fine_tuned_swin_or_cls_pooled_vit_is_refused():
    vit_cls, _, _ = _finetuned_run(dict(name="vit", variant="Ti/4", width=64, depth=2,
                                        num_heads=4, mlp_dim=128), IMAGE)
    vit_cls.config.finetune.pool = "cls"
    with pytest.raises(ValueError, match=r"a fine-tuned vit \(pool='cls'\) has no timm export"):
        export.export_run(vit_cls, "timm")


@pytest.mark.parametrize("fmt,dtype", [("hf", "float32"), ("timm", "float32"),
                                       ("official", "float32"), ("hf", "float16")])
def test_an_export_is_read_back_into_fine_tuning_unchanged(mae_run, fmt, dtype, tmp_path):
    from configs import finetune as finetune_config
    from mim_jax import pretrained
    run, _ = mae_run
    export.write(export.export_run(run, fmt), run, fmt, tmp_path, dtype=dtype)
    config = finetune_config.get_config(f"quickstart,pretrained={tmp_path}")
    with config.unlocked():
        config.model.update(run.config.model)  # the tiny MAE's sizes, as recorded
        config.data.image_size = IMAGE
    target = pretrained.build_objective(config).init(jax.random.key(0))["encoder"]
    loaded = pretrained.fitted_encoder_params(config, jax.tree.map(np.asarray, target))
    # Global-pool fine-tuning has fc_norm instead of the encoder's final norm: all else equal
    # (float16: to its rounding).
    assert set(run.params["encoder"]) - set(loaded) == {"norm"}
    original = {k: v for k, v in run.params["encoder"].items() if k in loaded}
    atol = 0 if dtype == "float32" else 2e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=0),
                 loaded, original)
