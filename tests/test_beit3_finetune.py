"""Fine-tuning BEiT-3's Multiway encoder on labels: the classifier is unilm's
BEiT3ForImageClassification (vision path, no final LayerNorm, mean of the patch tokens,
fc_norm of eps 1e-5, linear head), the fine-tuning config of a BEiT-3 run builds it with the
run's text vocabulary and starts from the run's encoder, and its export is refused in one
line."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import beit3 as beit3_config
from configs import finetune as finetune_config
from mim_jax import checkpointing, export, models, pretrained
from mim_jax.models import classifier, multiway, resize
from test_beit3_objective import random_variables


def _tiny_model_block(**overrides):
    block = dict(name="multiway", variant="base", width=32, depth=2, num_heads=2, mlp_dim=64,
                 patch_size=4, max_text_positions=18, vocab_size=50)
    return ml_collections.ConfigDict(dict(block, **overrides))


def _layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_classifier_is_unilm_image_classification():
    """logits = head(fc_norm(mean of the patch tokens of the encoder without its final
    LayerNorm)), computed by hand from the encoder's output."""
    cfg = ml_collections.ConfigDict(dict(
        model=_tiny_model_block(), data=dict(image_size=16, channels=3),
        finetune=finetune_config.finetune_block(num_classes=5)))
    from mim_jax.objectives import classification
    obj = classification.build(cfg)
    shapes = jax.eval_shape(obj.init_variables, jax.random.key(0))[0]
    assert "norm" not in shapes["encoder"]  # normalised after pooling instead
    rng = np.random.default_rng(0)
    # Every tensor off its init (CLS token, LayerNorm scales included), so a pooled CLS token
    # or a final LayerNorm would show.
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape) + (
        1.0 if len(s.shape) == 1 else 0.0)).astype(np.float32), shapes)
    images = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    logits = obj.model.apply({"params": params}, images, train=False)

    plain = multiway.MultiwayEncoder(obj.encoder.config, final_norm=False)
    tokens = np.asarray(plain.apply({"params": params["encoder"]}, images)["encoder_out"],
                        np.float64)
    assert tokens.shape == (3, 1 + 16, 32)
    pooled = tokens[:, 1:].mean(axis=1)  # the patches; CLS left out
    fc = params["fc_norm"]
    normed = _layer_norm(pooled, fc["scale"], fc["bias"], 1e-5)
    expected = normed @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert obj.model.fc_norm_eps == 1e-5  # torch's nn.LayerNorm default (MAE's is 1e-6)


def _unilm_layer_id(name: str, num_max_layer: int) -> int:
    """unilm beit3/optim_factory.py get_num_layer_for_vit, on torchscale parameter names."""
    if "embed" in name or name in ("cls_token", "mask_token", "pos_embed") \
            or name.startswith("patch_embed"):
        return 0
    if "layers." in name:
        return int(name.split("layers.")[1].split(".")[0]) + 1
    return num_max_layer - 1


def test_layer_ids_follow_unilms_beit3_rule():
    """Embeddings (patch, text, both position tables, CLS and mask tokens) are layer 0,
    layer_i is i + 1, the final norm the top; the same number of values per layer as unilm's
    rule gives the torchscale tensors they convert to. In a classifier fc_norm and the head
    are the top, and each layer's lr scale is decay ** (depth + 1 - id)."""
    from mim_jax import optim
    from mim_jax.convert import torchscale_beit3
    encoder = models.multiway_from_config(_tiny_model_block(depth=3), 16, 3)
    shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes["params"])
    ids, top = optim.layer_ids(params)
    assert top == 4
    for name in ("patch_embed", "cls_token", "mask_token", "vision_pos_embed", "text_embed",
                 "text_pos_embed"):
        assert set(np.ravel(jax.tree.leaves(ids[name]))) == {0}, name
    for i in range(3):
        assert set(jax.tree.leaves(ids[f"layer_{i}"])) == {i + 1}
    assert set(jax.tree.leaves(ids["norm"])) == {top}

    ours, theirs = {}, {}
    for i, leaf in zip(jax.tree.leaves(ids), jax.tree.leaves(params)):
        ours[int(i)] = ours.get(int(i), 0) + leaf.size
    state = torchscale_beit3.beit3_params_to_torchscale(params, released=True)["model"]
    for name, value in state.items():
        layer = _unilm_layer_id(name, top + 1)
        theirs[layer] = theirs.get(layer, 0) + value.size
    assert ours == theirs

    model = classifier.Classifier(encoder=encoder.clone(final_norm=False), num_classes=5)
    cls_params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    scales = optim.layer_decay_scales(cls_params["params"], 0.5)
    assert scales["head"]["kernel"] == 1.0 and scales["fc_norm"]["scale"] == 1.0
    assert scales["encoder"]["text_embed"] == pytest.approx(0.5 ** 4)
    np.testing.assert_allclose(jax.tree.leaves(scales["encoder"]["layer_1"]), 0.5 ** 2)


@pytest.fixture(scope="module")
def beit3_run(tmp_path_factory):
    """A tiny BEiT-3 run (the quickstart config shrunk): config.json and one checkpoint of
    random weights."""
    c = beit3_config.get_config("quickstart")
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.objective.tokenizer.update(width=32, depth=1, num_heads=2, mlp_dim=64, decoder_width=32,
                                 decoder_heads=2, decoder_mlp_dim=64, n_codes=64)
    run = tmp_path_factory.mktemp("beit3_run")
    (run / "config.json").write_text(c.to_json())
    params, state = random_variables(pretrained.build_objective(c))
    ckpt = checkpointing.Checkpointer(str(run), asynchronous=False)
    ckpt.maybe_save(3, {"params": params, "model_state": state}, force=True)
    ckpt.close()
    return run


def test_finetuning_a_beit3_run_starts_from_its_encoder(beit3_run):
    """configs/finetune.py:quickstart,pretrained=RUN builds the run's Multiway encoder (its
    text vocabulary too) and the trainer's starting weights are the run's, bar the final
    LayerNorm that global pooling leaves out."""
    cfg = finetune_config.get_config(f"quickstart,pretrained={beit3_run}")
    assert cfg.model.name == "multiway" and cfg.model.width == 32 and cfg.model.depth == 2
    assert cfg.model.vocab_size == beit3_config.QUICKSTART_VOCAB_SIZE
    assert (cfg.data.image_size, cfg.data.channels) == (28, 1)
    assert tuple(cfg.optimizer.no_decay) == beit3_config.NO_DECAY
    obj = pretrained.build_objective(cfg)
    assert obj.name == "finetune" and isinstance(obj.encoder, multiway.MultiwayEncoder)
    params, state = jax.eval_shape(obj.init_variables, jax.random.key(0))
    params, _ = pretrained.load_frozen(cfg, obj, params, state)
    run_encoder = pretrained.load_encoder(str(beit3_run))
    assert run_encoder.objective == "beit3" and run_encoder.step == 3
    expected = {k: v for k, v in run_encoder.params.items() if k != "norm"}
    assert "norm" in run_encoder.params
    assert jax.tree.structure(params["encoder"]) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


def test_a_run_of_another_text_vocabulary_is_named(beit3_run):
    cfg = finetune_config.get_config(f"quickstart,pretrained={beit3_run}")
    cfg.model.vocab_size = 64
    obj = pretrained.build_objective(cfg)
    params, state = jax.eval_shape(obj.init_variables, jax.random.key(0))
    with pytest.raises(ValueError, match=r"text vocabulary of 1002.*text vocabulary of 64 "
                                         r"\(model\.vocab_size\)"):
        pretrained.load_frozen(cfg, obj, params, state)


def test_quickstart_and_imagenet_recipes_build_the_multiway_classifier():
    from mim_jax import train
    scratch = finetune_config.get_config("quickstart,model=multiway")
    assert scratch.model.vocab_size == beit3_config.QUICKSTART_VOCAB_SIZE
    assert train.validate_config(scratch).name == "finetune"
    base = finetune_config.get_config("model=beit3_b")
    assert (base.model.variant, base.model.vocab_size, base.model.drop_path_rate) == (
        "base", beit3_config.RELEASED_VOCAB_SIZE, 0.15)
    assert (base.num_epochs, base.batch_size, base.optimizer.layer_decay) == (50.0, 1024, 0.65)
    # unilm's lr is absolute: 7e-4 whatever the batch.
    assert base.optimizer.base_lr * base.batch_size / base.optimizer.lr_batch_divisor == 7e-4
    large = finetune_config.get_config("model=beit3_l,batch=512")
    assert large.optimizer.base_lr * 512 / large.optimizer.lr_batch_divisor == 2e-4


def test_missing_vocabulary_is_named():
    block = _tiny_model_block()
    block.vocab_size = None
    with pytest.raises(ValueError, match=r"^model\.vocab_size is unset"):
        models.backbone_from_config(block, 16, 3)
    with pytest.raises(ValueError, match=r"^model\.vocab_size=50 but the text vocabulary has "
                                         r"60 ids"):
        models.multiway_from_config(_tiny_model_block(), 16, 3, vocab_size=60)


def test_vision_positions_are_resized_keeping_the_unused_rows_and_cls():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((3 + 16, 8)).astype(np.float32)  # 4 x 4 grid
    target = {"vision_pos_embed": jax.ShapeDtypeStruct((3 + 36, 8), jnp.float32)}
    fitted, notes = resize.fit_encoder_params({"vision_pos_embed": table}, target)
    out = fitted["vision_pos_embed"]
    assert out.shape == (39, 8) and "resized" in notes[0]
    np.testing.assert_array_equal(out[:3], table[:3])
    np.testing.assert_allclose(out[3:], resize.resize_grid(table[3:], 6))


def test_a_finetuned_multiway_classifier_export_is_refused_in_one_line():
    config = ml_collections.ConfigDict(dict(model=_tiny_model_block(),
                                            data=dict(image_size=16, channels=3),
                                            finetune=finetune_config.finetune_block()))
    run = export.Run(config=config, params={}, model_state={}, step=1, source="run")
    for fmt in export.FORMATS:
        with pytest.raises(ValueError) as err:
            export.export_run(run, fmt)
        assert "Multiway (BEiT-3) classifier has no export" in str(err.value)
        assert "\n" not in str(err.value)
