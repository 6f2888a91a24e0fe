"""VQ-KD (BEiT v2 tokenizer): official checkpoint layout, quantiser updates, the trainable
objective and the frozen tokenizer's encode()."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import vqkd as vqkd_config
from mim_jax import data, pretrained
from mim_jax.convert import official_vqkd
from mim_jax.convert.files import load_torch_state_dict
from mim_jax.models.tokenizers import build as build_tokenizer
from mim_jax.models.tokenizers import vqkd
from mim_jax.objectives import make_rngs
from mim_jax.objectives import vqkd as vqkd_objective

torch = pytest.importorskip("torch")
F = torch.nn.functional

# A tiny official-layout VQ-KD: 16 px RGB, patch 4 (4 x 4 grid), encoder 2 x 32 (2 heads),
# decoder 1 x 32, 16 codes of dim 8, teacher width 24.
TINY = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
            decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64,
            n_codes=16, code_dim=8, teacher_dim=24, mean=(0.5,) * 3, std=(0.5,) * 3)


def _tok_cfg(**overrides):
    return ml_collections.ConfigDict({**vqkd_config.tokenizer_config().to_dict(), **TINY,
                                      **overrides})


def _official_vit(sd, g, prefix, width, depth, mlp, in_ch, patch, tokens):
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    sd[f"{prefix}cls_token"], sd[f"{prefix}pos_embed"] = r(1, 1, width), r(1, tokens + 1, width)
    sd[f"{prefix}patch_embed.proj.weight"] = r(width, in_ch, patch, patch)
    sd[f"{prefix}patch_embed.proj.bias"] = r(width)
    for i in range(depth):
        p = f"{prefix}blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = 1 + r(width), r(width)
        sd[f"{p}attn.qkv.weight"] = r(3 * width, width)
        sd[f"{p}attn.q_bias"], sd[f"{p}attn.v_bias"] = r(width), r(width)
        sd[f"{p}attn.proj.weight"], sd[f"{p}attn.proj.bias"] = r(width, width), r(width)
        sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"] = r(mlp, width), r(mlp)
        sd[f"{p}mlp.fc2.weight"], sd[f"{p}mlp.fc2.bias"] = r(width, mlp), r(width)
    sd[f"{prefix}fc_norm.weight"], sd[f"{prefix}fc_norm.bias"] = 1 + r(width), r(width)


def official_state_dict(seed=0):
    """Random tensors under the official key names and shapes of TINY (+ teacher keys)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    t = TINY
    grid = t["image_size"] // t["patch_size"]
    sd = {}
    _official_vit(sd, g, "encoder.", t["width"], t["depth"], t["mlp_dim"], 3, t["patch_size"],
                  grid * grid)
    _official_vit(sd, g, "decoder.", t["decoder_width"], t["decoder_depth"],
                  t["decoder_mlp_dim"], t["code_dim"], 1, grid * grid)
    for name, width, out in (("encode_task_layer", t["width"], t["code_dim"]),
                             ("decode_task_layer", t["decoder_width"], t["teacher_dim"])):
        sd[f"{name}.0.weight"], sd[f"{name}.0.bias"] = r(width, width), r(width)
        sd[f"{name}.2.weight"], sd[f"{name}.2.bias"] = r(out, width), r(out)
    codes = F.normalize(torch.randn(t["n_codes"], t["code_dim"], generator=g), dim=-1)
    sd["quantize.embedding.weight"] = codes
    sd["quantize.embedding.cluster_size"] = torch.rand(t["n_codes"], generator=g)
    sd["quantize.embedding.embed_avg"] = codes.clone()
    sd["quantize.embedding.initted"] = torch.tensor([1.0])
    sd["quantize.cluster_size"] = torch.rand(t["n_codes"], generator=g) * 5
    sd["teacher_model.visual.proj"] = r(5, 5)  # ignored, as the reference's loader does
    sd["scaling_layer.shift"] = r(1, 3, 1, 1)
    return sd


def _torch_vit(sd, prefix, x, depth, heads, patch):
    """The reference's VisionTransformer (use_mean_pooling, return_patch_tokens) in torch ops."""
    p = lambda name: sd[prefix + name]
    x = F.conv2d(x, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p("cls_token").expand(x.shape[0], -1, -1), x], 1) + p("pos_embed")
    b, n, w = x.shape
    ln = lambda y, name: F.layer_norm(y, (w,), p(f"{name}.weight"), p(f"{name}.bias"), 1e-6)
    for i in range(depth):
        q = f"blocks.{i}."
        bias = torch.cat([p(q + "attn.q_bias"), torch.zeros(w), p(q + "attn.v_bias")])
        qkv = F.linear(ln(x, q + "norm1"), p(q + "attn.qkv.weight"), bias)
        qkv = qkv.reshape(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (w // heads) ** -0.5).softmax(-1)
        y = (attn @ qkv[2]).transpose(1, 2).reshape(b, n, w)
        x = x + F.linear(y, p(q + "attn.proj.weight"), p(q + "attn.proj.bias"))
        y = F.gelu(F.linear(ln(x, q + "norm2"), p(q + "mlp.fc1.weight"), p(q + "mlp.fc1.bias")))
        x = x + F.linear(y, p(q + "mlp.fc2.weight"), p(q + "mlp.fc2.bias"))
    return ln(x[:, 1:], "fc_norm")


def _torch_task(sd, name, x):
    x = torch.tanh(F.linear(x, sd[f"{name}.0.weight"], sd[f"{name}.0.bias"]))
    return F.linear(x, sd[f"{name}.2.weight"], sd[f"{name}.2.bias"])


def _tiny_module(with_decoder=True):
    cfg = vqkd.validate(_tok_cfg(), 3)
    return vqkd.build_model(cfg, TINY["image_size"], 3, with_decoder=with_decoder,
                            teacher_dim=TINY["teacher_dim"])


def _abstract(module):
    images = jnp.zeros((1, TINY["image_size"], TINY["image_size"], 3))
    return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def test_official_checkpoint_round_trip_and_parity(tmp_path):
    sd = official_state_dict()
    path = str(tmp_path / "vqkd.pth")
    torch.save({"model": sd}, path)
    loaded = load_torch_state_dict(path)  # weights_only=True, 'model' unwrapped
    module = _tiny_module()
    params = official_vqkd.params_from_official(loaded, num_heads=2, decoder_num_heads=2,
                                                expected=_abstract(module))
    # Same tokens and same decoder output as the reference's computation on the same weights.
    images = np.random.default_rng(0).uniform(size=(3, 16, 16, 3)).astype(np.float32)
    ids = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # the reference's [-1, 1]
    with torch.no_grad():
        z = F.normalize(_torch_task(sd, "encode_task_layer",
                                    _torch_vit(sd, "encoder.", x, 2, 2, 4)), dim=-1)
        codes = sd["quantize.embedding.weight"]
        dist = (z ** 2).sum(-1, keepdim=True) + (codes ** 2).sum(-1) - 2 * z @ codes.T
        ref_ids = dist.argmin(-1)
        grid = codes[ref_ids].reshape(3, 4, 4, 8).permute(0, 3, 1, 2)
        ref_rec = _torch_task(sd, "decode_task_layer", _torch_vit(sd, "decoder.", grid, 1, 2, 1))
    np.testing.assert_array_equal(np.asarray(ids), ref_ids.numpy())
    rec = module.apply({"params": params}, jnp.asarray(params["codebook"])[ids],
                       method="decode")
    np.testing.assert_allclose(np.asarray(rec), ref_rec.numpy(), atol=1e-4, rtol=1e-4)
    # Export restores every tensor (the k-bias slot and the reference's unused buffers aside).
    state = official_vqkd.codebook_state_from_official(loaded)
    assert state["cluster_size"].shape == (16,) and bool(state["initted"])
    back = official_vqkd.params_to_official(params, state)
    skip = ("teacher_model.", "scaling_layer.", "quantize.embedding.cluster_size",
            "quantize.embedding.embed_avg")
    for key, value in sd.items():
        if not key.startswith(skip):
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    assert set(back) == {k for k in sd if not k.startswith(("teacher_model.", "scaling_layer."))}


def test_wrong_shapes_list_every_mismatched_name(tmp_path):
    path = str(tmp_path / "vqkd.pth")
    torch.save({"model": official_state_dict()}, path)
    # A tokenizer config that does not describe the file: wider encoder, bigger codebook.
    spec = build_tokenizer(_tok_cfg(checkpoint=path, width=48, n_codes=32), 16, 3)
    with pytest.raises(ValueError) as err:
        pretrained.load_tokenizer(spec, _abstract(spec.module))
    message = str(err.value)
    for name in ("encoder/patch_embed/kernel", "encoder/pos_embed", "encoder/norm/scale",
                 "encoder/transformer/block_1/fc1/kernel", "encode_task_layer/fc1/kernel",
                 "codebook"):
        assert name in message, name
    assert "decoder/" not in message  # the frozen tokenizer has no decoder


def test_encode_ids_shape_range_and_jit():
    spec = build_tokenizer(_tok_cfg(), 32, 3)  # resized from 32 px to its own 16 px
    params = spec.module.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
    images = jax.random.uniform(jax.random.key(2), (5, 32, 32, 3))
    ids = jax.jit(spec.encode)(params, images)
    assert ids.shape == (5, spec.grid ** 2) == (5, 16) and ids.dtype == jnp.int32
    assert 0 <= int(ids.min()) and int(ids.max()) < spec.vocab_size == 16
    np.testing.assert_array_equal(ids, spec.encode(params, images))


def test_ema_update_moves_assigned_codes_toward_their_mean():
    rng = np.random.default_rng(0)
    emb = vqkd.l2norm(jnp.asarray(rng.normal(size=(4, 8)), jnp.float32))
    z = vqkd.l2norm(emb[0] + 0.5 * jnp.asarray(rng.normal(size=(6, 8)), jnp.float32))
    ids = jnp.zeros((6,), jnp.int32)
    new, size, counts = vqkd_objective.ema_update(emb, jnp.zeros(4), z, ids, 0.99)
    mean = vqkd.l2norm(z.mean(0))
    expected = vqkd.l2norm(0.99 * emb[0] + 0.01 * mean)
    np.testing.assert_allclose(new[0], expected, atol=1e-6)
    assert float(new[0] @ mean) > float(emb[0] @ mean)  # moved toward the assigned features
    np.testing.assert_allclose(new[1:], emb[1:], atol=1e-6)  # unused codes stay
    np.testing.assert_allclose(size, [0.06, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(jnp.linalg.norm(new, axis=-1), 1.0, atol=1e-6)
    assert counts.tolist() == [6, 0, 0, 0]


def test_kmeans_init_picks_codes_from_the_data():
    rng = np.random.default_rng(1)
    centres = vqkd.l2norm(jnp.asarray(rng.normal(size=(4, 16)), jnp.float32))
    samples = vqkd.l2norm(jnp.repeat(centres, 50, 0)
                          + 0.05 * jnp.asarray(rng.normal(size=(200, 16)), jnp.float32))
    kmeans = jax.jit(vqkd_objective.kmeans, static_argnums=(2, 3))
    start, _ = kmeans(jax.random.key(0), samples, 6, 0)  # no iteration: the drawn samples
    assert np.all(np.max(np.asarray(start @ samples.T), 1) > 1 - 1e-5)
    means, bins = kmeans(jax.random.key(0), samples, 6, 10)
    assert float(bins.sum()) == 200
    ids = np.asarray(jnp.argmax(samples @ means.T, -1))
    for k in range(6):  # converged: every used code is the unit mean of its samples
        if bins[k]:
            np.testing.assert_allclose(means[k], vqkd.l2norm(samples[ids == k].mean(0)),
                                       atol=1e-5)
    fit = lambda codes: float(jnp.mean(jnp.max(samples @ codes.T, -1)))
    assert fit(means) > fit(start)  # Lloyd steps improve the fit to the data
    # More codes than samples: codes are drawn from the samples themselves.
    few = samples[:3]
    means, _ = vqkd_objective.kmeans(jax.random.key(1), few, 5, 0)
    assert np.all(np.max(np.asarray(means @ few.T), 1) > 1 - 1e-5)


def _teacher_run(tmp_path):
    """A mim_jax pretraining workdir holding only config.json: enough to build the teacher's
    module; its (random-init) parameters are built directly instead of loaded."""
    from configs import mae as mae_config
    c = mae_config.get_config("quickstart")
    c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    workdir = tmp_path / "teacher"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(json.loads(c.to_json())))
    return str(workdir)


def _vqkd_quickstart(tmp_path, tfds_dir):
    c = vqkd_config.get_config("quickstart")
    c.objective.teacher.checkpoint = _teacher_run(tmp_path)
    c.objective.tokenizer.update(width=32, depth=1, num_heads=2, mlp_dim=64, decoder_width=32,
                                 decoder_heads=2, decoder_mlp_dim=64, n_codes=64)
    c.data.data_dir = tfds_dir
    return c


def test_config_errors_are_one_line(tmp_path, tfds_dir):
    c = _vqkd_quickstart(tmp_path, tfds_dir)
    for field, value, match in (
            ("objective.teacher.checkpoint", None, "objective.teacher.checkpoint is unset"),
            ("objective.teacher.checkpoint", str(tmp_path), "is unusable"),
            ("objective.decay", 1.0, r"objective.decay=1.0 .* in \(0, 1\)"),
            ("objective.tokenizer.patch_size", 7, "not one token per cell"),
            ("objective.tokenizer.mean", (0.5, 0.5), "objective.tokenizer.mean")):
        bad = ml_collections.ConfigDict(c.to_dict())
        holder, name = bad, field
        while "." in name:
            head, name = name.split(".", 1)
            holder = holder[head]
        holder[name] = value
        with pytest.raises(ValueError, match=match) as err:
            pretrained.build_objective(bad)
        assert "\n" not in str(err.value)


def test_training_restarts_dead_codes_and_raises_the_cosine(tmp_path, tfds_dir):
    """60 Adam steps on real digits: after k-means init a random encoder uses about a third of
    the 64 codes per batch; dead-code restarts bring that near all of them, and the decoder's
    cosine to the (random-init) teacher rises. A faster EMA (0.9) makes dead codes show in
    tens of steps instead of hundreds (the quickstart keeps the reference's 0.99)."""
    import optax
    c = _vqkd_quickstart(tmp_path, tfds_dir)
    c.objective.update(decay=0.9, dead_code_threshold=1.0)
    objective = pretrained.build_objective(c)
    params, model_state = jax.jit(objective.init_variables)(jax.random.key(0))
    images = data.normalize_images(data.fixed_eval_images(c.data, 256), c.data)
    tx = optax.adam(2e-3)

    @jax.jit
    def step(params, opt_state, model_state, batch, key):
        (_, aux), grads = jax.value_and_grad(objective.loss_fn, has_aux=True)(
            params, model_state, {"image": batch}, make_rngs(key), True)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    opt_state, history = tx.init(params), []
    for i in range(60):
        batch = images[(i % 8) * 32:(i % 8 + 1) * 32]
        params, opt_state, aux = step(params, opt_state, model_state, batch, jax.random.key(i))
        model_state = aux["model_state"]
        history.append({k: float(v) for k, v in aux["metrics"].items()})
    assert bool(model_state["codebook"]["initted"])
    mean = lambda key, steps: float(np.mean([h[key] for h in steps]))
    assert history[0]["codebook_usage"] == 1.0  # k-means on this very batch
    early, late = history[2:8], history[-6:]
    assert mean("codebook_usage", early) < 0.6 and mean("codebook_usage", late) > 0.85
    assert mean("perplexity", late) > 15 > mean("perplexity", early)
    assert history[-1]["codebook_usage_ema"] >= 0.9
    assert mean("cosine", late) > history[0]["cosine"] + 0.5


def test_teacher_from_an_official_mae_file(tmp_path, tfds_dir):
    """A converted reference encoder as the teacher: an official MAE .pth (here a random tiny
    one written by our exporter) with its variant; its weights reach the model state exactly,
    and a file of another size fails with one line naming the field."""
    from mim_jax import convert
    from mim_jax.models import vit
    c = _vqkd_quickstart(tmp_path, tfds_dir)
    teacher_vit = vit.ViT(vit.resolve_vit_config("Ti/4", 28, 1))
    params = teacher_vit.init(jax.random.key(3), np.zeros((1, 28, 28, 1), np.float32))["params"]
    path = str(tmp_path / "mae_pretrain_tiny.pth")
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in
                          convert.mae_params_to_official({"encoder": params},
                                                         image_size=28).items()}}, path)
    c.objective.teacher.update(checkpoint=path, variant="Ti/4")
    obj = pretrained.build_objective(c)
    fresh = obj.init_variables(jax.random.key(0))
    _, state = pretrained.load_frozen(c, obj, *fresh)
    for a, b in zip(jax.tree.leaves(state["teacher"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c.objective.teacher.variant = "S/4"  # width 384: the file's 192 does not fit
    with pytest.raises(ValueError, match=r"^objective\.teacher\.checkpoint=.* is unusable: .*"):
        pretrained.load_frozen(c, pretrained.build_objective(c), *fresh)


def test_beit_v2_takes_the_tokenizer_of_a_vqkd_run(tmp_path, tfds_dir):
    """A mim_jax VQ-KD run as BEiT v2's tokenizer: the sizes that run recorded build it (not
    the BEiT config's own), and its params with the EMA codebook are what a fresh BEiT run's
    model_state starts from."""
    from configs import beit as beit_config
    from mim_jax import checkpointing
    c = _vqkd_quickstart(tmp_path, tfds_dir)
    run = tmp_path / "tokenizer_run"
    run.mkdir()
    (run / "config.json").write_text(c.to_json())
    params, state = jax.jit(pretrained.build_objective(c).init_variables)(jax.random.key(0))
    codes = jax.random.normal(jax.random.key(1), state["codebook"]["embedding"].shape)
    state = dict(state, codebook=dict(state["codebook"], embedding=codes,
                                      initted=jnp.asarray(True)))
    ckpt = checkpointing.Checkpointer(str(run), asynchronous=False)
    ckpt.maybe_save(3, {"params": params, "model_state": state}, force=True)
    ckpt.close()

    beit_cfg = beit_config.get_config("quickstart")
    beit_cfg.objective.tokenizer.checkpoint = str(run)
    beit = pretrained.build_objective(beit_cfg)
    assert beit.model.vocab_size == 64  # the run's n_codes, not the config's 256
    _, loaded = pretrained.load_frozen(beit_cfg, beit, *beit.init_variables(jax.random.key(2)))
    tokenizer = loaded["tokenizer"]
    assert set(tokenizer) == {"encoder", "encode_task_layer", "codebook"}  # no decoder
    np.testing.assert_array_equal(tokenizer["codebook"], codes)
    for part in ("encoder", "encode_task_layer"):
        for a, b in zip(jax.tree.leaves(tokenizer[part]), jax.tree.leaves(params[part])):
            np.testing.assert_array_equal(a, b)
