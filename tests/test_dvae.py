"""DALL-E dVAE encoder tokenizer: parity with OpenAI's reference `dall_e` package.

The reference installs without its declared dependencies (torchvision, blobfile, mypy are not
used by the encoder): pip install --no-deps dall-e==0.1 (it needs attrs and requests).
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mim_jax import pretrained
from mim_jax.convert import dall_e as convert
from mim_jax.models import tokenizers
from mim_jax.models.tokenizers import dvae

torch = pytest.importorskip("torch")
dall_e = pytest.importorskip("dall_e")

# The smallest model the reference's validators accept (n_hid >= 64, vocab >= 512); two blocks
# per group so both block kinds (with and without the id_path projection) are covered.
TINY = dict(n_hid=64, group_count=4, n_blk_per_group=2, vocab_size=512)
SIZE = 32  # grid 4


def tiny_cfg(**fields):
    return ml_collections.ConfigDict({"name": "dall_e", "input_size": SIZE, **TINY, **fields})


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = dall_e.Encoder(n_hid=TINY["n_hid"], n_blk_per_group=TINY["n_blk_per_group"],
                           vocab_size=TINY["vocab_size"])
    with torch.no_grad():  # the reference zeroes biases; random ones make them count
        for name, p in model.named_parameters():
            if name.endswith(".b"):
                p.normal_(std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def spec():
    return tokenizers.build(tiny_cfg(), image_size=SIZE, channels=3)


@pytest.fixture(scope="module")
def encode(spec):
    """spec.encode compiled once for the whole file (op-by-op convs compile slowly on CPU)."""
    return jax.jit(spec.encode)


def abstract_of(module, size=SIZE):
    return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def reference_logits(model, images):
    with torch.no_grad():
        x = dall_e.map_pixels(torch.from_numpy(images).permute(0, 3, 1, 2))
        return model(x).permute(0, 2, 3, 1).numpy()


def save_state_dict(state_dict, path):
    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, path)
    return str(path)


def test_logits_and_tokens_match_reference(reference, spec, encode):
    images = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    params = convert.params_from_official(reference.state_dict(), group_count=4,
                                          n_blk_per_group=2,
                                          expected=abstract_of(spec.module)["params"])
    logits = jax.jit(lambda p, x: spec.module.apply({"params": p}, dvae.map_pixels(x)))
    ours = np.asarray(logits(params, images))
    theirs = reference_logits(reference, images)
    assert ours.shape == (2, 4, 4, TINY["vocab_size"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # Same targets: the top-2 gaps are far above the float32 error, so argmax must agree.
    top2 = np.sort(theirs, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-4
    tokens = np.asarray(encode(params, images))
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, theirs.argmax(-1).reshape(2, -1))


def test_map_pixels_matches_reference():
    x = np.random.default_rng(1).random((1, 3, 5, 5), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(dvae.map_pixels(x)),
                               dall_e.utils.map_pixels(torch.from_numpy(x)).numpy(), atol=1e-7)


def test_state_dict_round_trip_through_torch_files(tmp_path, spec, reference):
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32),
                          abstract_of(spec.module)["params"])
    official = convert.params_to_official(params)
    assert sorted(official) == sorted(reference.state_dict())
    path = save_state_dict(official, tmp_path / "enc.pt")
    loaded = pretrained.load_tokenizer(tokenizers.build(tiny_cfg(checkpoint=path), SIZE, 3),
                                       abstract_of(spec.module))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    # The file is one the reference itself loads strictly.
    fresh = dall_e.Encoder(n_hid=64, n_blk_per_group=2, vocab_size=512)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)


def test_pickled_module_is_refused_with_the_extraction_command(tmp_path, monkeypatch,
                                                              reference, encode):
    """OpenAI ships encoder.pkl as a pickled module: refused in one line whose command, run as
    written, gives a file that loads and tokenizes like the reference."""
    pickled = tmp_path / "encoder.pkl"
    torch.save(reference, pickled)
    spec = tokenizers.build(tiny_cfg(checkpoint=str(pickled)), SIZE, 3)
    abstract = abstract_of(spec.module)
    with pytest.raises(ValueError) as err:
        pretrained.load_tokenizer(spec, abstract)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{pickled} holds a pickled dall_e.encoder.Encoder")
    assert "pip install --no-deps dall-e==0.1 attrs requests" in message
    assert convert.extraction_command("encoder.pkl") in convert.__doc__  # the documented one
    command = re.search(r'python -c "([^"]+)"', message).group(1)
    monkeypatch.chdir(tmp_path)
    exec(command, {})  # what the user runs, in the directory the message names the output in
    extracted = tmp_path / "dall_e_encoder.pt"
    params = pretrained.load_tokenizer(
        tokenizers.build(tiny_cfg(checkpoint=str(extracted)), SIZE, 3), abstract)
    images = np.random.default_rng(2).random((1, SIZE, SIZE, 3), dtype=np.float32)
    np.testing.assert_array_equal(
        np.asarray(encode(params, images)),
        reference_logits(reference, images).argmax(-1).reshape(1, -1))


def test_wrong_shapes_are_all_listed(tmp_path, spec, reference):
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    state["blocks.input.w"] = np.zeros((64, 4, 7, 7), np.float32)  # 4 input channels
    state["blocks.output.conv.w"] = np.zeros((256, 512, 1, 1), np.float32)  # vocab 256
    state["blocks.output.conv.b"] = np.zeros((256,), np.float32)
    path = save_state_dict(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        pretrained.load_tokenizer(tokenizers.build(tiny_cfg(checkpoint=path), SIZE, 3),
                                  abstract_of(spec.module))
    message = str(err.value)
    assert "(3 problems)" in message
    assert ("input/kernel: blocks.input.w (64, 4, 7, 7) converts to (7, 7, 4, 64), expected "
            "(7, 7, 3, 64)") in message
    assert "output/kernel: blocks.output.conv.w (256, 512, 1, 1)" in message
    assert "output/bias: blocks.output.conv.b (256,)" in message
    assert "group_" not in message


def test_structure_mismatch_names_the_missing_keys(tmp_path, reference):
    path = save_state_dict(reference.state_dict(), tmp_path / "enc.pt")
    spec = tokenizers.build(tiny_cfg(checkpoint=path, n_blk_per_group=3), SIZE, 3)
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.group_1\.block_3\.res_path"
                                         r"\.conv_1\.w'"):
        pretrained.load_tokenizer(spec, abstract_of(spec.module))


def test_default_size_has_the_official_parameters():
    """The released encoder: 53,786,240 parameters in 74 tensors, 14x14 tokens from 112 px."""
    spec = tokenizers.build(ml_collections.ConfigDict(dict(name="dall_e")), 224, 3)
    assert (spec.vocab_size, spec.grid) == (8192, 14)
    abstract = abstract_of(spec.module, 112)["params"]
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)) == 53_786_240
    official = dall_e.Encoder(device=torch.device("meta")).state_dict()  # shapes, no memory
    ours = {}
    for path, leaf in convert.common.plan_leaves(convert.plan()):
        node = abstract
        for part in path:
            node = node[part]
        theirs = leaf.to_theirs(np.broadcast_to(np.float32(0), node.shape))  # views: no copies
        ours.update({k: tuple(v.shape) for k, v in zip(leaf.keys, theirs)})
    assert ours == {k: tuple(v.shape) for k, v in official.items()}
    tokens = jax.eval_shape(lambda p, x: spec.encode(p, x), abstract,
                            jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert (tokens.shape, tokens.dtype) == ((2, 196), jnp.int32)


def test_grayscale_is_repeated(reference, encode):
    params = convert.params_from_official(reference.state_dict(), n_blk_per_group=2)
    gray = np.random.default_rng(3).random((2, SIZE, SIZE, 1), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(encode(params, gray)),
                                  np.asarray(encode(params, np.repeat(gray, 3, -1))))


def test_other_sizes_are_resized_close_to_pil_lanczos(reference, encode):
    """BEiT's reference resizes with PIL LANCZOS; ours stays within 10/255 of it, and within
    half a level (0.5/255) on average, on noise (the worst case for a resampler) and on a
    sharp edge, where lanczos overshoots [0, 1] by 0.08 unless clipped as PIL's 8 bits are."""
    from PIL import Image

    rng = np.random.default_rng(4)
    big = (rng.random((2, 2 * SIZE, 2 * SIZE, 3)) * 255).round().astype(np.uint8)
    big[1] = 0
    big[1, :, SIZE - 1:] = 255
    pil = np.stack([np.asarray(Image.fromarray(x).resize((SIZE, SIZE), Image.LANCZOS))
                    for x in big]).astype(np.float32) / 255
    ours = np.asarray(dvae.resize(big.astype(np.float32) / 255, SIZE))
    assert np.abs(ours - pil).max() < 10 / 255 and np.abs(ours - pil).mean() < 0.5 / 255
    params = convert.params_from_official(reference.state_dict(), n_blk_per_group=2)
    images = big.astype(np.float32) / 255
    np.testing.assert_array_equal(np.asarray(encode(params, images)),
                                  np.asarray(encode(params, dvae.resize(images, SIZE))))


@pytest.mark.parametrize("field, value, allowed", [
    ("n_hid", 30, "multiple of 4"),
    ("vocab_size", 1, ">= 2"),
    ("group_count", 0, ">= 1"),
    ("n_blk_per_group", 1.5, "integer >= 1"),
    ("input_size", 36, "multiple of 8"),
    ("checkpoint", 3, "path of a DALL-E encoder state dict"),
])
def test_bad_fields_name_field_value_and_rule(field, value, allowed):
    with pytest.raises(ValueError) as err:
        tokenizers.build(tiny_cfg(**{field: value}), SIZE, 3)
    message = str(err.value)
    assert message.startswith(f"objective.tokenizer.{field}={value!r} is not allowed")
    assert allowed in message


def test_missing_checkpoint_names_the_field(spec, tmp_path):
    for checkpoint in ("", str(tmp_path / "absent.pt")):
        tok = tokenizers.build(tiny_cfg(checkpoint=checkpoint), SIZE, 3)
        with pytest.raises(ValueError, match=rf"^{re.escape(repr(checkpoint))} is not a file; "
                                             rf"objective\.tokenizer\.checkpoint must name"):
            pretrained.load_tokenizer(tok, abstract_of(spec.module))
