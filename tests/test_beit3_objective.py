"""BEiT-3's masked data modeling objective on a tiny Multiway model (width 64, 2 layers,
32 px images in 8 px patches, a 100-token vocabulary) with a tiny random VQ-KD tokenizer:
the loss of each stream and of a mixed batch, the text and image masks, that only masked
positions count, that Adam lowers the loss, that padding changes nothing, and the config
errors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import adam_losses
from mim_jax import pretrained
from mim_jax.objectives import beit3
from mim_jax.objectives.base import make_rngs

VOCAB, T, B = 100, 16, 4
BOS, PAD, EOS, MASK = 0, 1, 2, VOCAB - 1


def tiny_config(**objective):
    obj = dict(name="beit3",
               tokenizer=dict(name="vqkd", patch_size=8, width=32, depth=1, num_heads=2,
                              mlp_dim=64, n_codes=32, code_dim=8),
               # 6 of the 16 patches, in blocks of at least 2
               image_mask=dict(ratio=0.4, min_num_patches=2),
               text=dict(vocab_size=VOCAB, max_length=T))
    for key, value in objective.items():
        if isinstance(value, dict):
            obj[key] = dict(obj.get(key, {}), **value)
        else:
            obj[key] = value
    return ml_collections.ConfigDict(dict(
        data=dict(image_size=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3),
        model=dict(name="multiway", variant="base", width=64, depth=2, num_heads=4,
                   mlp_dim=128, patch_size=8),
        objective=obj))


def texts(rng, batch, length, lengths=None):
    """bos, random ordinary tokens, eos, then padding (pad ids, padding True)."""
    lengths = rng.integers(3, length + 1, batch) if lengths is None else np.asarray(lengths)
    ids = rng.integers(3, VOCAB - 1, (batch, length)).astype(np.int32)
    padding = np.arange(length)[None] >= lengths[:, None]
    ids[:, 0] = BOS
    ids[np.arange(batch), lengths - 1] = EOS
    ids[padding] = PAD
    return ids, padding


def random_variables(obj, seed: int = 0):
    """(params, model_state) of the objective's init shapes, drawn in numpy: LayerNorm scales
    1, biases 0, other tensors N(0, 0.02**2) (compiling the init would take longer than every
    test here that runs the model)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, np.float32)
        if name.endswith("['bias']"):
            return np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    shapes = jax.eval_shape(obj.init_variables, jax.random.key(0))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    obj = pretrained.build_objective(tiny_config())
    params, state = random_variables(obj)
    rng = np.random.default_rng(0)
    ids, padding = texts(rng, B, T, lengths=[16, 10, 5, 12])
    pair_ids, pair_padding = texts(rng, B, T, lengths=[7, 16, 9, 3])
    batch = dict(image=rng.standard_normal((B, 32, 32, 3)).astype(np.float32),
                 text_ids=ids, text_padding=padding,
                 pair_image=rng.standard_normal((B, 32, 32, 3)).astype(np.float32),
                 pair_text_ids=pair_ids, pair_text_padding=pair_padding)
    # The tokenizer's ids, as a batch tokenized ahead of time carries them.
    encode = jax.jit(lambda images: obj.frozen["tokenizer"].part.encode(
        state["tokenizer"], jnp.clip(images * 0.5 + 0.5, 0, 1)))
    tokens = dict(image_tokens=encode(batch["image"]),
                  pair_image_tokens=encode(batch["pair_image"]))
    run = jax.jit(lambda params, batch, key, masks: obj.loss_fn(
        params, state, batch, make_rngs(key), train=False, with_outputs=True, masks=masks))
    return obj, params, state, batch, tokens, run


def _part(batch, stream, tokens=None):
    keys = beit3.STREAM_KEYS[stream]
    out = {k: batch[k] for k in keys}
    if tokens and stream in ("image", "pair"):
        name = f"{'pair_' if stream == 'pair' else ''}image_tokens"
        out[name] = tokens[name]
    return out


def test_each_stream_alone_and_mixed(tiny):
    obj, params, _, batch, tokens, run = tiny
    key = jax.random.key(1)
    mixed = {**batch, **tokens}
    loss, aux = run(params, mixed, key, {})
    assert np.isfinite(float(loss))
    alone = {}
    for stream in beit3.STREAMS:
        # Alone, the images are tokenized by the frozen tokenizer inside the loss.
        alone[stream], stream_aux = run(params, _part(batch, stream), key, {})
        assert np.isfinite(float(alone[stream]))
        assert set(stream_aux["outputs"]) == {stream}
    # Each stream draws the same masks alone or mixed, and the tokenizer gives the ids the
    # mixed batch carries: with weights 1 / 1 / 1 the mixed loss is the sum.
    np.testing.assert_allclose(float(loss), sum(float(v) for v in alone.values()), rtol=1e-5)
    m = aux["metrics"]
    np.testing.assert_allclose(float(m["pair_loss"]),
                               float(m["pair_text_loss"] + m["pair_image_loss"]), rtol=1e-6)
    # Untrained: about log(vocab) per prediction.
    assert abs(float(m["image_loss"]) - np.log(32)) < 1.0
    assert abs(float(m["text_loss"]) - np.log(VOCAB)) < 1.0
    for name in ("image", "text", "pair_text", "pair_image"):
        assert 0 <= float(m[f"{name}_accuracy_most_frequent_token"]) <= 1


def test_image_masks_are_blocks_of_the_ratio_and_follow_the_key(tiny):
    _, params, _, batch, tokens, run = tiny
    mixed = {**batch, **tokens}
    _, a = run(params, mixed, jax.random.key(1), {})
    _, again = run(params, mixed, jax.random.key(1), {})
    _, other = run(params, mixed, jax.random.key(2), {})
    image_mask = np.asarray(a["outputs"]["image"]["mask"])
    pair_mask = np.asarray(a["outputs"]["pair"]["image_mask"])
    assert (image_mask.sum(1) == 6).all() and (pair_mask.sum(1) == 6).all()  # round(0.4 * 16)
    assert not np.array_equal(image_mask, pair_mask)  # each stream draws its own
    np.testing.assert_array_equal(image_mask, again["outputs"]["image"]["mask"])
    assert not np.array_equal(image_mask, other["outputs"]["image"]["mask"])


def _mask_text(ratio, **text):
    cfg = beit3.TextConfig(vocab_size=VOCAB, **text)
    return jax.jit(functools.partial(beit3.mask_text, ratio=ratio, text=cfg))


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_text_mask_ratio_and_never_special_tokens(ratio):
    ids, padding = texts(np.random.default_rng(1), 4096, 64)
    tm = jax.tree.map(np.asarray, _mask_text(ratio)(jax.random.key(0), ids, padding))
    special = padding | np.isin(ids, [BOS, EOS, PAD])
    assert not (tm.mask & special).any()
    np.testing.assert_array_equal(tm.inputs[special], ids[special])
    maskable = (~special).sum(1)
    count = tm.mask.sum(1)
    # floor(ratio * n + u): one of the two integers around ratio * n, ratio on average
    assert ((count == np.floor(ratio * maskable)) | (count == np.floor(ratio * maskable) + 1)).all()
    assert abs(count.sum() / maskable.sum() - ratio) < 0.005
    # positions / valid list exactly the masked tokens
    rows = np.arange(len(ids))[:, None]
    assert tm.positions.shape[1] == beit3.text_mask_slots(64, ratio)
    np.testing.assert_array_equal(tm.valid.sum(1), count)
    assert tm.mask[rows, tm.positions][tm.valid].all()


def test_text_mask_is_a_function_of_the_key():
    ids, padding = texts(np.random.default_rng(2), 64, 32)
    mask_text = _mask_text(0.15)
    a, b = mask_text(jax.random.key(3), ids, padding), mask_text(jax.random.key(3), ids, padding)
    c = mask_text(jax.random.key(4), ids, padding)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.mask, c.mask)


def test_text_replacement_is_80_10_10():
    ids, padding = texts(np.random.default_rng(5), 4096, 64)
    tm = jax.tree.map(np.asarray, _mask_text(0.15)(jax.random.key(1), ids, padding))
    inputs, original = tm.inputs[tm.mask], ids[tm.mask]
    assert inputs.size > 15000  # proportions within 0.01 are > 4 standard deviations
    to_mask = inputs == MASK
    unchanged = inputs == original
    random = ~to_mask & ~unchanged
    assert abs(to_mask.mean() - 0.8) < 0.01
    # a random draw equal to the original token reads as unchanged (1 in 96)
    assert abs(unchanged.mean() - 0.1) < 0.01
    assert abs(random.mean() - 0.1) < 0.01
    assert not np.isin(inputs[random], [BOS, EOS, PAD, MASK]).any()
    assert (inputs[random] < VOCAB).all()
    # other schemes: all mask tokens, all random
    all_mask = _mask_text(0.15, random_token_prob=0.0, unchanged_prob=0.0)(
        jax.random.key(1), ids, padding)
    assert (np.asarray(all_mask.inputs)[np.asarray(all_mask.mask)] == MASK).all()


def test_only_masked_positions_count(tiny):
    obj, params, state, batch, tokens, run = tiny
    key = jax.random.key(1)
    mixed = {**batch, **tokens}
    _, aux = run(params, mixed, key, {})
    for stream, name in (("image", "image"), ("pair", "pair_image")):
        mask = np.asarray(aux["outputs"][stream][f"{'image_' if stream == 'pair' else ''}mask"])
        labels = np.array(mixed[f"{name}_tokens"])
        metric = f"{name}_loss"
        for where, changes in ((~mask, False), (mask, True)):
            changed = labels.copy()
            changed[where] = (changed[where] + 1) % 32
            _, other = run(params, {**mixed, f"{name}_tokens": changed}, key, {})
            assert (float(other["metrics"][metric]) != float(aux["metrics"][metric])) == changes

    # Text: the loss is the cross-entropy of the full logits at the masked tokens only.
    text = _part(batch, "text")
    loss, aux = run(params, text, key, {})
    tm = aux["outputs"]["text"]["text_mask"]
    _, logits = obj.model.apply({"params": params}, text_ids=tm.inputs,
                                text_padding_mask=text["text_padding"])
    logp = jax.nn.log_softmax(np.asarray(logits), -1)
    ce = -np.take_along_axis(np.asarray(logp), text["text_ids"][..., None], -1)[..., 0]
    mask = np.asarray(tm.mask)
    assert 0 < mask.sum() < (~text["text_padding"]).sum()
    np.testing.assert_allclose(float(loss), ce[mask].mean(), rtol=1e-5)


def test_adam_lowers_the_loss_on_a_fixed_batch(tiny):
    obj, params, _, batch, tokens, _ = tiny
    losses = adam_losses(obj, params, {**batch, **tokens}, make_rngs(jax.random.key(0)),
                         lr=1e-3, steps=8)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_padding_does_not_change_the_other_tokens(tiny):
    obj, params, _, batch, _, _ = tiny
    ids, padding = batch["text_ids"], batch["text_padding"]
    # Four more padded tokens holding arbitrary ids.
    wide_ids = np.concatenate([ids, np.full((B, 4), 7, np.int32)], axis=1)
    wide_padding = np.concatenate([padding, np.ones((B, 4), bool)], axis=1)
    apply = jax.jit(functools.partial(obj.model.apply, {"params": params}))
    for images in (None, batch["pair_image"]):
        narrow = apply(images, ids, text_padding_mask=padding)
        wide = apply(images, wide_ids, text_padding_mask=wide_padding)
        keep = ~padding
        np.testing.assert_allclose(np.asarray(wide[1])[:, :T][keep], np.asarray(narrow[1])[keep],
                                   atol=1e-5)
        if images is not None:
            np.testing.assert_allclose(wide[0], narrow[0], atol=1e-5)


def test_forward_flops_by_stream():
    obj = pretrained.build_objective(tiny_config())
    flops = obj.forward_flops
    assert {k.split("/")[0] for k in flops} == set(beit3.STREAMS)
    assert obj.flops_per_image == pytest.approx(3 * sum(flops.values()))
    # Streams without weight are not run: the others share the batch.
    text_only = pretrained.build_objective(tiny_config(loss_weights=dict(image=0.0, pair=0.0)))
    assert set(text_only.forward_flops) == {"text/encoder", "text/text_head"}
    assert text_only.forward_flops["text/encoder"] == pytest.approx(3 * flops["text/encoder"])


def test_the_encoder_of_a_run_config_reads_the_objectives_vocabulary():
    # The benchmark's model description (flops.backbone_arch) resolves the encoder without
    # building the objective: the Multiway text embedding's size is objective.text's.
    from mim_jax import flops
    config = tiny_config()
    arch = flops.backbone_arch(config)
    assert arch.vocab_size == config.objective.text.vocab_size
    assert arch.width == config.model.width


def test_a_stream_without_weight_is_not_run(tiny):
    _, params, state, batch, tokens, _ = tiny
    obj = pretrained.build_objective(tiny_config(loss_weights=dict(text=0.0, pair=0.0)))
    with pytest.raises(ValueError, match=r"holds no stream with a positive"):
        obj.loss_fn(params, state, _part(batch, "text"), make_rngs(jax.random.key(0)), False)


@pytest.mark.parametrize("objective, error", [
    (dict(text=dict(mask_ratio=1.0)), r"^objective\.text\.mask_ratio=1\.0 must be .*\(0, 1\)"),
    (dict(text=dict(pair_mask_ratio=0)), r"^objective\.text\.pair_mask_ratio=0 must be"),
    (dict(image_mask=dict(ratio=1.5)), r"^objective\.image_mask\.ratio=1\.5 must be"),
    (dict(image_mask=dict(min_num_patches=7)), r"^objective\.image_mask\.min_num_patches=7 "
                                               r"must be an integer in \[1, 6\]"),
    (dict(loss_weights=dict(text=-1.0)), r"^objective\.loss_weights\.text=-1\.0 must be .*>= 0"),
    (dict(loss_weights=dict(image=0, text=0, pair=0)), r"^objective\.loss_weights=.*at least "
                                                       r"one stream needs a positive weight"),
    (dict(loss_weights=dict(audio=1.0)), r"^objective\.loss_weights\.audio is not a stream"),
    (dict(text=dict(mask_id=VOCAB)), r"^objective\.text\.mask_id=100 must be an id in "
                                     r"\[0, vocab_size=100\)"),
    (dict(text=dict(eos_id=1)), r"^objective\.text: .* must be four different ids"),
    (dict(text=dict(max_length=2000)), r"^objective\.text\.max_length=2000 must be <= 1022"),
    (dict(text=dict(random_token_prob=0.6, unchanged_prob=0.6)),
     r"^objective\.text\.random_token_prob \+ objective\.text\.unchanged_prob = 1\.2"),
    (dict(text=dict(max_len=8)), r"^objective\.text\.max_len is not a field; allowed"),
    (dict(mask_pair_images="yes"), r"^objective\.mask_pair_images='yes' must be True or False"),
    (dict(mix=dict(video=1)), r"^objective\.mix\.video is not a stream"),
    (dict(mix=dict(text=-1)), r"^objective\.mix\.text=-1 must be an integer >= 0"),
    (dict(mix=dict(text=0.5)), r"^objective\.mix\.text=0\.5 must be an integer >= 0"),
    (dict(mix=dict(image=0, text=0, pair=0)), r"^objective\.mix=.*at least one stream"),
    (dict(mix=dict(text=2), loss_weights=dict(text=0.0)),
     r"^objective\.mix\.text=2 feeds a stream whose objective\.loss_weights\.text=0"),
])
def test_config_errors_name_the_field(objective, error):
    with pytest.raises(ValueError, match=error):
        pretrained.build_objective(tiny_config(**objective))


def test_model_errors_name_the_field():
    config = tiny_config()
    config.model.num_heads = 5
    with pytest.raises(ValueError, match=r"^model\.width=64 is not divisible by num_heads=5"):
        pretrained.build_objective(config)
    config = tiny_config()
    config.model.name = "vit"
    with pytest.raises(ValueError, match=r"^model\.name='vit': BEiT-3 needs"):
        pretrained.build_objective(config)


def test_batch_errors_name_the_key(tiny):
    obj, params, state, batch, _, _ = tiny
    rngs = make_rngs(jax.random.key(0))
    long_ids = np.zeros((B, T + 1), np.int32)
    with pytest.raises(ValueError, match=r"batch\['text_ids'\] holds 17 tokens per text; "
                                         r"objective\.text\.max_length=16"):
        obj.loss_fn(params, state, dict(text_ids=long_ids, text_padding=long_ids > 0), rngs,
                    False)
    with pytest.raises(ValueError, match=r"the pair stream needs all of"):
        obj.loss_fn(params, state, {"pair_image": batch["pair_image"]}, rngs, False)


def test_the_batch_splits_by_the_mix_into_the_fields_the_step_reads():
    obj = pretrained.build_objective(tiny_config(mix=dict(image=2, text=1, pair=1)))
    assert obj.stream_sizes(8) == {"image": 4, "text": 2, "pair": 2}
    fields = obj.batch_fields(8)
    assert {k: (f.shape, f.dtype, f.high) for k, f in fields.items()} == {
        "image": ((4, 32, 32, 3), jnp.uint8, 256),
        "text_ids": ((2, T), jnp.int32, VOCAB), "text_padding": ((2, T), jnp.bool_, 2),
        "pair_image": ((2, 32, 32, 3), jnp.uint8, 256),
        "pair_text_ids": ((2, T), jnp.int32, VOCAB), "pair_text_padding": ((2, T), jnp.bool_, 2)}
    with pytest.raises(ValueError, match=r"^batch_size=6 does not split in the proportions of "
                                         r"objective\.mix=.*a multiple of 4"):
        obj.stream_sizes(6)
    # A stream without weight gets no share unless one is set.
    texts_only = pretrained.build_objective(tiny_config(loss_weights=dict(image=0, pair=0)))
    assert texts_only.stream_sizes(3) == {"image": 0, "text": 3, "pair": 0}
    assert sorted(texts_only.batch_fields(3)) == ["text_ids", "text_padding"]
    config = tiny_config()
    config.batch_size = 7
    with pytest.raises(ValueError, match=r"^batch_size=7 does not split"):
        pretrained.build_objective(config)


def test_the_text_data_and_tokenizer_must_be_the_models():
    from types import SimpleNamespace
    from mim_jax.data import text as text_data

    config = tiny_config()
    config.text = text_data.default_text_config()
    config.text.max_len = T + 1
    with pytest.raises(ValueError, match=r"^text\.max_len=17 must equal "
                                         r"objective\.text\.max_length=16"):
        pretrained.build_objective(config)
    config.text.max_len = T
    obj = pretrained.build_objective(config)
    tokenizer = SimpleNamespace(vocab_size=VOCAB, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                                mask_id=MASK)
    obj.check_text_tokenizer(tokenizer)  # the same ids: fine
    tokenizer.vocab_size = 1002
    with pytest.raises(ValueError, match=r"^objective\.text\.vocab_size=100 but the tokenizer "
                                         r"of text\.spm_model has vocab_size 1002"):
        obj.check_text_tokenizer(tokenizer)
