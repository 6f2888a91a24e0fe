"""VQ-KD (BEiT v2, Peng et al. 2022): train the visual tokenizer by distilling a frozen teacher.

images -> tokenizer encoder -> l2-normalised features z -> nearest code (straight-through)
-> decoder -> 1 - cosine(prediction, teacher patch features), averaged over tokens, plus the
commitment term beta * mean((sg[code] - z)^2) (beta 1, as the reference).

As the reference (unilm/beit2 norm_ema_quantizer.py), codes are not trained by the optimizer:
per training step, with counts n_k of the batch's tokens assigned to code k and their sum s_k,
  cluster_size <- decay * cluster_size + (1 - decay) * n_k        (usage statistics)
  e_k <- l2norm(decay * e_k + (1 - decay) * l2norm(s_k / n_k))    (codes with n_k = 0 keep e_k)
and on the first training batch the codebook is initialised by cosine k-means (reference: 10
Lloyd iterations from randomly drawn features; empty clusters keep their centre). Both run on
device inside the jitted step (k-means under lax.cond on the `initted` flag).

Dead codes: the reference has NO restart. Here `dead_code_threshold` > 0 (0 = off = the
reference) replaces, after each update, every code whose EMA usage count is below the threshold
by a random feature of the batch and sets its count to the threshold: small data and small
codebooks collapse otherwise. Our k-means init also sets cluster_size to the k-means cluster
sizes (the reference puts them in an unused buffer and starts its usage statistics at 0), so a
restart threshold does not wipe the fresh codebook on step 1.

State: params = the tokenizer without its codebook (encoder, encode_task_layer, decoder,
decode_task_layer); model_state = {'codebook': {'embedding' [K, D], 'cluster_size' [K],
'initted' bool}, 'teacher': frozen teacher encoder params}.

The teacher is the encoder of any mim_jax pretraining run (objective.teacher.checkpoint: its
workdir or a checkpoints/STEP folder), rebuilt from that run's config; its target is its final
(normalised) output at the patch tokens, CLS dropped, which must lie on the tokenizer's grid.
The reference's CLIP teacher additionally projects with its `proj` matrix; ours has none.
Images reach the teacher normalised with the teacher run's own data mean / std. A converted
reference encoder works too: objective.teacher.checkpoint = an official MAE .pth file, with
objective.teacher.variant (e.g. 'B/16') and optionally image_size / mean / std (default: the
data's). So do Hugging Face ViTMAE / ViT / BEiT and timm ViT / BEiT folders, which record their
sizes (mim_jax.pretrained, docs/conversion.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mim_jax.models import vit
from mim_jax.models.classifier import encoder_has_cls
from mim_jax.models.tokenizers import vqkd as tok
from mim_jax.objectives.base import Frozen, FrozenEncoder, Objective, make_rngs

FIELD = "objective"
_DEFAULTS = dict(beta=1.0, decay=0.99, kmeans_init=True, kmeans_iters=10,
                 dead_code_threshold=0.0)
# A code counts as used "by EMA count" when its count is at least this fraction of an even
# share of a batch's tokens (an EMA count never returns to exactly 0).
USAGE_FLOOR = 0.01


# ---------------------------------------------------------------- the quantiser's updates

def kmeans(key, samples, n_codes: int, iters: int):
    """Cosine k-means (the reference's init): -> (unit centres [K, D], cluster sizes [K])."""
    n = samples.shape[0]
    idx = (jax.random.permutation(key, n)[:n_codes] if n >= n_codes
           else jax.random.randint(key, (n_codes,), 0, n))

    def step(_, carry):
        means, _ = carry
        buckets = jnp.argmax(samples @ means.T, axis=-1)
        bins = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), buckets, n_codes)
        sums = jax.ops.segment_sum(samples, buckets, n_codes)
        new = tok.l2norm(sums / jnp.maximum(bins, 1.0)[:, None])
        return jnp.where((bins == 0)[:, None], means, new), bins

    return jax.lax.fori_loop(0, iters, step, (samples[idx], jnp.zeros((n_codes,), jnp.float32)))


def ema_update(embedding, cluster_size, z, ids, decay: float):
    """One EMA step of the codebook on features z [N, D] assigned to ids [N] (reference's
    NormEMAVectorQuantizer, training branch). Returns (embedding, cluster_size, counts)."""
    k = embedding.shape[0]
    counts = jax.ops.segment_sum(jnp.ones(ids.shape, jnp.float32), ids, k)
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    means = tok.l2norm(jax.ops.segment_sum(z, ids, k) / jnp.maximum(counts, 1.0)[:, None])
    means = jnp.where((counts == 0)[:, None], embedding, means)
    return tok.l2norm(decay * embedding + (1.0 - decay) * means), cluster_size, counts


def restart_dead_codes(key, embedding, cluster_size, z, threshold: float):
    """Codes with an EMA count below `threshold` take random features of the batch."""
    dead = cluster_size < threshold
    picks = z[jax.random.randint(key, dead.shape, 0, z.shape[0])]
    return (jnp.where(dead[:, None], picks, embedding),
            jnp.where(dead, jnp.maximum(threshold, cluster_size), cluster_size))


def codebook_metrics(counts, cluster_size, tokens: int, threshold: float = 0.0) -> dict:
    """Usage in the batch, usage by EMA count (at least USAGE_FLOOR of an even share of the
    batch's tokens, and above the restart threshold, where restarted codes sit), perplexity."""
    k = counts.shape[0]
    p = counts / tokens
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    floor = max(USAGE_FLOOR * tokens / k, threshold)
    return {"codebook_usage": jnp.mean(counts > 0),
            "codebook_usage_ema": jnp.mean(cluster_size >= floor),
            "perplexity": jnp.exp(entropy)}


# ---------------------------------------------------------------- config

def _check(obj_cfg, name, ok, allowed):
    value = obj_cfg.get(name, _DEFAULTS[name])
    if not ok(value):
        raise ValueError(f"{FIELD}.{name}={value!r} is not allowed; it must be {allowed}.")
    return value


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(obj_cfg) -> dict:
    return dict(
        beta=_check(obj_cfg, "beta", lambda v: _number(v) and v >= 0, "a number >= 0"),
        decay=_check(obj_cfg, "decay", lambda v: _number(v) and 0 < v < 1, "in (0, 1)"),
        kmeans_init=_check(obj_cfg, "kmeans_init", lambda v: isinstance(v, bool), "True/False"),
        kmeans_iters=_check(obj_cfg, "kmeans_iters", lambda v: isinstance(v, int)
                            and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
        dead_code_threshold=_check(obj_cfg, "dead_code_threshold",
                                   lambda v: _number(v) and v >= 0, "a number >= 0 (0 = off)"))


def needs(config) -> dict:
    """The frozen teacher objective.teacher names, kept in model_state['teacher']."""
    del config
    return {"teacher": Frozen(kind="teacher", source=f"{FIELD}.teacher",
                              into=("model_state", "teacher"))}


class Teacher:
    """The frozen teacher encoder (mim_jax.pretrained resolves objective.teacher into a
    FrozenEncoder), checked against the tokenizer's grid and the data's channels."""

    def __init__(self, encoder: FrozenEncoder, channels: int, grid: int):
        self.module, self.image_size = encoder.module, encoder.image_size
        self.mean, self.std = encoder.mean, encoder.std
        field = f"{FIELD}.teacher.checkpoint={encoder.source!r}"
        if encoder.channels != channels:
            raise ValueError(f"{field}: the teacher takes {encoder.channels}-channel images, "
                             f"the data has {channels} (data.channels).")
        self.channels = channels
        self.cls = encoder_has_cls(self.module)
        images = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, channels),
                                      jnp.float32)
        out = jax.eval_shape(lambda x: self.module.init_with_output(
            jax.random.key(0), x, train=False)[0], images)
        tokens = out.shape[1] - int(self.cls) if out.ndim == 3 else -1
        if tokens != grid * grid:
            raise ValueError(f"{field}: the teacher's output {tuple(out.shape)} is "
                             f"not one token per cell of the tokenizer's {grid}x{grid} grid "
                             f"(+ CLS); match data.image_size / tokenizer patch_size to it.")
        self.width = int(out.shape[-1])

    def init(self, rng):
        images = jnp.zeros((1, self.image_size, self.image_size, self.channels), jnp.float32)
        return self.module.init({"params": rng, **make_rngs(rng)}, images, train=False)["params"]

    def features(self, params, images01):
        """[0, 1] images -> the teacher's patch features [B, L, D] (no gradient)."""
        b, h, w, c = images01.shape
        if h != self.image_size:
            images01 = jax.image.resize(images01, (b, self.image_size, self.image_size, c),
                                        "bicubic", antialias=True)
        x = (images01 - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        out = self.module.apply({"params": params}, x, train=False)
        return jax.lax.stop_gradient(out[:, int(self.cls):].astype(jnp.float32))


# ---------------------------------------------------------------- the objective

def build(config, frozen) -> Objective:
    """`frozen`: needs(config) resolved (mim_jax.pretrained): the teacher's module."""
    obj_cfg, data_cfg = config.objective, config.data
    opts = validate(obj_cfg)
    size, channels = data_cfg.image_size, data_cfg.get("channels", 3)
    cfg = tok.validate(obj_cfg.get("tokenizer") or {}, channels)
    if cfg["image_size"] not in (None, size):
        raise ValueError(f"{tok.FIELD}.image_size={cfg['image_size']} differs from "
                         f"data.image_size={size}: a trained tokenizer sees the data's images.")
    grid_probe = vit.resolve_vit_config("B/16", size, channels, patch_size=cfg["patch_size"])
    teacher = Teacher(frozen["teacher"].part, channels, grid_probe.grid)
    if cfg["teacher_dim"] not in (None, teacher.width):
        raise ValueError(f"{tok.FIELD}.teacher_dim={cfg['teacher_dim']} differs from the "
                         f"teacher's width {teacher.width}; leave it None.")
    model = tok.build_model(cfg, size, channels, with_decoder=True, teacher_dim=teacher.width)
    data_mean = jnp.asarray(data_cfg.mean, jnp.float32)
    data_std = jnp.asarray(data_cfg.std, jnp.float32)
    image_shape = (size, size, channels)
    k = cfg["n_codes"]

    def init_fn(rng):
        rng_model, rng_teacher = jax.random.split(rng)
        params = model.init({"params": rng_model, **make_rngs(rng_model)},
                            jnp.zeros((1, *image_shape), jnp.float32), train=False)["params"]
        params = dict(params)
        for part in ("encoder", "decoder"):  # the reference's depth rescaling of its ViTs
            params[part] = dict(params[part], transformer=vit.rescale_beit_init(
                params[part]["transformer"]))
        codes = params.pop("codebook")
        # With k-means init the reference starts from zeros and initialises on batch one.
        codebook = {"embedding": jnp.zeros_like(codes) if opts["kmeans_init"] else codes,
                    "cluster_size": jnp.zeros((k,), jnp.float32),
                    "initted": jnp.asarray(not opts["kmeans_init"])}
        return params, {"codebook": codebook, "teacher": teacher.init(rng_teacher)}

    def loss_fn(params, model_state, batch, rngs, train: bool, with_outputs: bool = False):
        images01 = batch["image"].astype(jnp.float32) * data_std + data_mean
        target = teacher.features(model_state["teacher"], images01)
        state = model_state["codebook"]
        embedding, cluster_size = state["embedding"], state["cluster_size"]
        variables = lambda codes: {"params": dict(params, codebook=codes)}
        x = model.apply(variables(embedding), images01, method="preprocess")
        z = model.apply(variables(embedding), x, train, method="features", rngs=rngs)
        b, n, d = z.shape
        flat = jax.lax.stop_gradient(z.reshape(b * n, d))
        key = jax.random.fold_in(rngs["mask"], 7)
        if train and opts["kmeans_init"]:
            # Only the first training step runs k-means; both branches are compiled.
            embedding, cluster_size = jax.lax.cond(
                state["initted"], lambda: (embedding, cluster_size),
                lambda: kmeans(jax.random.fold_in(key, 1), flat, k, opts["kmeans_iters"]))
        ids = tok.nearest_codes(flat, embedding)
        codes = embedding[ids].reshape(b, n, d)
        commit = opts["beta"] * jnp.mean(jnp.square(codes - z))  # codes carry no gradient
        z_q = z + jax.lax.stop_gradient(codes - z)  # straight-through to the encoder
        pred = model.apply(variables(embedding), z_q, train, method="decode", rngs=rngs)
        cosine = jnp.sum(tok.l2norm(pred.astype(jnp.float32)) * tok.l2norm(target), -1)
        rec_loss = jnp.mean(1.0 - cosine)
        # The best constant guess (the batch's mean target direction): teacher features share
        # a large common component, so the learned cosine is read against this baseline.
        unit_target = tok.l2norm(target)
        baseline = jnp.mean(jnp.sum(unit_target * tok.l2norm(unit_target.mean((0, 1))), -1))
        loss = rec_loss + commit
        if train:
            new_emb, new_size, counts = ema_update(embedding, cluster_size, flat, ids,
                                                   opts["decay"])
            usage = codebook_metrics(counts, new_size, b * n, opts["dead_code_threshold"])
            if opts["dead_code_threshold"] > 0:
                new_emb, new_size = restart_dead_codes(jax.random.fold_in(key, 2), new_emb,
                                                       new_size, flat,
                                                       opts["dead_code_threshold"])
            new_state = {"embedding": new_emb, "cluster_size": new_size,
                         "initted": jnp.ones_like(state["initted"])}
        else:
            counts = jax.ops.segment_sum(jnp.ones(ids.shape, jnp.float32), ids, k)
            new_state = state
            usage = codebook_metrics(counts, cluster_size, b * n, opts["dead_code_threshold"])
        metrics = {"loss": loss, "rec_loss": rec_loss, "commit_loss": commit,
                   "cosine": jnp.mean(cosine), "cosine_constant_guess": baseline, **usage}
        aux = {"metrics": metrics, "model_state": dict(model_state, codebook=new_state)}
        if with_outputs:
            aux["outputs"] = {"tokens": ids.reshape(b, n), "prediction": pred,
                              "target": target}
        return loss, aux

    return Objective(name="vqkd", model=model, loss_fn=loss_fn, encoder_keys=("encoder",),
                     image_shape=image_shape, init_fn=init_fn)
