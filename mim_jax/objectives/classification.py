"""Supervised fine-tuning and linear probing of a pretrained encoder.

Run through the same entry point and the same training loop as pretraining (sharding,
checkpoints, exact resume, metrics); a `config.finetune` block turns the run into one of:

  mode='finetune'      the papers' recipe: encoder -> global average pool (or CLS) -> LayerNorm
                       -> linear head (init std 2e-5); AdamW with layer-wise lr decay, warmup +
                       cosine; RandAugment (data.randaugment), random erasing, mixup / cutmix
                       and label smoothing on device; drop path (model.drop_path_rate);
                       optional EMA of the weights.
  mode='linear_probe'  the MAE recipe: frozen encoder -> BatchNorm without affine (eps 1e-6)
                       -> linear head (init std 0.01), LARS, no weight decay, RRC + flip.

BEiT-3's Multiway encoder (model.name multiway) is fine-tuned on images alone, as unilm's
BEiT3ForImageClassification: the vision path, no final LayerNorm, the mean of the patch tokens
(CLS left out) -> fc_norm -> linear head; its text parameters are carried along unused.
SparK's ConvNets (model.name resnet / convnext) run dense with only their last stage, average
pooled: ConvNeXt with timm's head (LayerNorm, then linear), ResNet straight into the linear head.
A ResNet's BatchNorm statistics are model_state['batch_stats']: fine-tuning trains them (batch
statistics, running averages kept; evaluation uses the averages), the linear probe keeps them
frozen in eval mode. Both start from the pretraining run's statistics.

`finetune.pretrained` is a mim_jax pretraining workdir (or one of its checkpoints/STEP
folders), a Hugging Face or timm folder, a weights file (.pth / .safetensors) in an official
MAE / BEiT / SimMIM, timm (SparK's released ResNets / ConvNeXts) or Hugging Face layout, or ''
for random initialisation (training from scratch, the baseline); mim_jax.pretrained reads it
into a fresh run (`needs`). Top-1 / top-5 on data.eval_split are
written every `every_epochs` by the 'classification' evaluator (mim_jax.evaluators), which
keeps the best weights in workdir/best/.

  python -m mim_jax.main --config configs/finetune.py:pretrained=runs/mae_quickstart \
      --workdir runs/mae_quickstart_ft
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath

from mim_jax import augment, data, flops, models
from mim_jax.models import classifier as classifier_lib
from mim_jax.objectives.base import Frozen, Objective, make_rngs

MODES = ("finetune", "linear_probe")
# softmax_ce: cross-entropy on soft targets (the MAE / BEiT / SimMIM recipes); bce: per-class
# binary cross-entropy on the same targets, averaged over classes (timm's BinaryCrossEntropy,
# SparK's ResNet recipe with LAMB).
LOSSES = ("softmax_ce", "bce")


CONVNETS = ("resnet", "convnext")


def _is_convnet(config) -> bool:
    return config.model.get("name", "vit") in CONVNETS


def _pool(config) -> str:
    """finetune.pool; a ConvNet (no CLS token) always averages its last map."""
    if _is_convnet(config) and config.finetune.pool != "gap":
        logging.warning("finetune.pool=%r: model.name=%r has no CLS token; its last feature "
                        "map is average-pooled.", config.finetune.pool, config.model.name)
        return "gap"
    return config.finetune.pool


def encoder_from_config(config, for_probe: bool):
    """The encoder of config.model, configured for classification."""
    extra = {}
    if config.model.get("name", "vit") in ("vit", "multiway"):
        # Global pooling normalises after pooling (fc_norm); the CLS probe uses the final norm.
        extra["final_norm"] = for_probe or config.finetune.pool == "cls"
    elif _is_convnet(config):  # dense (active=None), only the last stage's map is pooled
        extra["last_stage_only"] = True
    return models.backbone_from_config(config.model, config.data.image_size,
                                       config.data.channels, **extra)


def validate(config) -> None:
    ft = config.finetune
    if ft.mode not in MODES:
        raise ValueError(f"finetune.mode={ft.mode!r}; allowed: {list(MODES)}.")
    if ft.pool not in classifier_lib.POOLS:
        raise ValueError(f"finetune.pool={ft.pool!r}; allowed: {list(classifier_lib.POOLS)}.")
    for field in ("label_smoothing", "random_erasing", "mixup_prob", "mixup_switch_prob"):
        value = ft.get(field, 0.0)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"finetune.{field}={value!r} must be in [0, 1].")
    for field in ("mixup", "cutmix"):
        if ft.get(field, 0.0) < 0:
            raise ValueError(f"finetune.{field}={ft[field]!r} must be >= 0 (0 = off).")
    if ft.get("loss", "softmax_ce") not in LOSSES:
        raise ValueError(f"finetune.loss={ft.loss!r}; allowed: {list(LOSSES)}.")
    if not 0.0 <= ft.get("ema_decay", 0.0) < 1.0:
        raise ValueError(f"finetune.ema_decay={ft.ema_decay!r} must be in [0, 1) (0 = off).")
    if ft.pretrained and not epath.Path(ft.pretrained).exists():
        raise ValueError(f"finetune.pretrained={ft.pretrained!r} does not exist; give a "
                         "pretraining workdir, a checkpoints/STEP folder, a Hugging Face or "
                         "timm folder, a weights file (.pth / .safetensors: official MAE / "
                         "BEiT / SimMIM, timm or Hugging Face layout), or '' for random "
                         "initialisation.")
    if ft.mode == "linear_probe" and not ft.pretrained:
        logging.warning("linear probe of a randomly initialised encoder (finetune.pretrained "
                        "is empty): this is the random-init baseline.")
    if ft.get("num_classes", 0) < 0:
        raise ValueError(f"finetune.num_classes={ft.num_classes!r} must be >= 0 (0 = from "
                         "the dataset).")


def num_classes(config) -> int:
    n = config.finetune.get("num_classes") or data.num_classes(config.data)
    if not n:
        raise ValueError(f"finetune.num_classes=0 and data.name={config.data.name!r} does not "
                         "say how many classes data.label_key has: set finetune.num_classes.")
    return int(n)


def _soft_targets(key, images, labels, ft, n_classes: int):
    """Random erasing then mixup / cutmix (timm's order) and smoothed one-hot targets."""
    erase_key, mix_key = jax.random.split(key)
    if ft.get("random_erasing", 0.0) > 0:
        images = augment.random_erasing(erase_key, images, prob=ft.random_erasing)
    if ft.get("mixup", 0.0) > 0 or ft.get("cutmix", 0.0) > 0:
        return augment.mixup_cutmix(
            mix_key, images, labels, num_classes=n_classes, mixup_alpha=ft.mixup,
            cutmix_alpha=ft.cutmix, switch_prob=ft.mixup_switch_prob, prob=ft.mixup_prob,
            label_smoothing=ft.label_smoothing)
    return images, augment.one_hot_smoothed(labels, n_classes, ft.label_smoothing)


def classification_loss(logits, targets, loss: str = "softmax_ce"):
    """Mean over the batch of finetune.loss between logits [B, C] and soft targets [B, C]."""
    if loss == "bce":
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    return optax.softmax_cross_entropy(logits, targets).mean()


def _classification_metrics(logits, labels, loss):
    return {"loss": loss, "train_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}


def _finetune_objective(config, n_classes: int) -> Objective:
    ft = config.finetune
    encoder = encoder_from_config(config, for_probe=False)
    pool = _pool(config)
    # ViT or Multiway + global pool: no final norm, LayerNorm after pooling (fc_norm). CLS
    # pooling and Swin keep the encoder's final norm and feed the head directly, as their
    # references do. ConvNeXt: timm's head (pool -> LayerNorm -> Linear); ResNet: pool ->
    # Linear. The Multiway encoder's fc_norm is unilm's BEiT3ForImageClassification's, a torch
    # nn.LayerNorm of default eps.
    name = config.model.get("name", "vit")
    fc_norm = (name in ("vit", "multiway") and pool == "gap") or name == "convnext"
    model = classifier_lib.Classifier(encoder=encoder, num_classes=n_classes, pool=pool,
                                      fc_norm=fc_norm, head_init_std=ft.head_init_std,
                                      fc_norm_eps=1e-5 if name == "multiway" else 1e-6,
                                      dtype=encoder.dtype, param_dtype=encoder.param_dtype)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    # An encoder with BatchNorm (ResNet) keeps its statistics in model_state['batch_stats']:
    # batch statistics (running averages updated) when training, the averages in evaluation.
    abstract = jax.eval_shape(
        lambda key: model.init({"params": key, **make_rngs(key)},
                               jnp.zeros((1, *image_shape), jnp.float32), train=False),
        jax.random.key(0))
    has_stats = bool(abstract.get("batch_stats"))

    def init_fn(rng):
        params_rng, stream_rng = jax.random.split(rng)
        variables = model.init({"params": params_rng, **make_rngs(stream_rng)},
                               jnp.zeros((1, *image_shape), jnp.float32), train=False)
        return variables["params"], {"batch_stats": variables["batch_stats"]}

    def loss_fn(params, model_state, batch, rngs, train: bool, with_outputs: bool = False):
        images, labels = batch["image"], batch["label"]
        if train:
            images, targets = _soft_targets(rngs["augment"], images, labels, ft, n_classes)
        else:
            targets = jax.nn.one_hot(labels, n_classes)
        variables = {"params": params}
        if has_stats:
            variables["batch_stats"] = model_state["batch_stats"]
        if has_stats and train:
            logits, updates = model.apply(variables, images, train=True, rngs=rngs,
                                          mutable=["batch_stats"])
            model_state = dict(model_state, batch_stats=updates["batch_stats"])
        else:
            logits = model.apply(variables, images, train=train, rngs=rngs)
        loss = classification_loss(logits, targets, ft.get("loss", "softmax_ce"))
        aux = {"metrics": _classification_metrics(logits, labels, loss),
               "model_state": model_state}
        if with_outputs:
            aux["outputs"] = {"logits": logits}
        return loss, aux

    return Objective(name="finetune", model=model, loss_fn=loss_fn, encoder_keys=("encoder",),
                     image_shape=image_shape, init_fn=init_fn if has_stats else None,
                     forward_flops=forward_flops(encoder, n_classes), with_labels=True,
                     ema_decay=ft.get("ema_decay", 0.0))


class _Probe(nn.Module):
    """Frozen encoder features -> ProbeHead; the encoder's params live in the model state."""
    encoder: nn.Module
    num_classes: int
    pool: str
    head_init_std: float

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        feats = classifier_lib.pool_features(self.encoder(images, train=False), self.pool,
                                             classifier_lib.encoder_has_cls(self.encoder))
        return classifier_lib.ProbeHead(num_classes=self.num_classes,
                                        head_init_std=self.head_init_std, name="probe")(jax.lax.stop_gradient(feats), train=train)


def _probe_objective(config, n_classes: int) -> Objective:
    ft = config.finetune
    encoder = encoder_from_config(config, for_probe=True)
    model = _Probe(encoder=encoder, num_classes=n_classes, pool=_pool(config),
                   head_init_std=ft.head_init_std)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)

    def init_fn(rng):
        variables = model.init({"params": rng, **make_rngs(rng)},
                               jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        # Only the head trains; the encoder and BatchNorm statistics are model state.
        return ({"probe": params["probe"]},
                {"encoder": params["encoder"], "batch_stats": variables["batch_stats"]})

    def loss_fn(params, model_state, batch, rngs, train: bool, with_outputs: bool = False):
        variables = {"params": {"probe": params["probe"], "encoder": model_state["encoder"]},
                     "batch_stats": model_state["batch_stats"]}
        labels = batch["label"]
        if train:
            logits, updates = model.apply(variables, batch["image"], train=True, rngs=rngs,
                                          mutable=["batch_stats"])
            model_state = dict(model_state, batch_stats=updates["batch_stats"])
        else:
            logits = model.apply(variables, batch["image"], train=False, rngs=rngs)
        targets = augment.one_hot_smoothed(labels, n_classes, ft.get("label_smoothing", 0.0))
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        aux = {"metrics": _classification_metrics(logits, labels, loss),
               "model_state": model_state}
        if with_outputs:
            aux["outputs"] = {"logits": logits}
        return loss, aux

    forward = forward_flops(encoder, n_classes)
    return Objective(name="linear_probe", model=model, loss_fn=loss_fn,
                     encoder_keys=("encoder",), image_shape=image_shape, init_fn=init_fn,
                     forward_flops=forward, forward_only=tuple(k for k in forward if k != "head"),
                     with_labels=True, ema_decay=ft.get("ema_decay", 0.0))


def forward_flops(encoder, n_classes: int) -> dict:
    """The encoder on every patch, then a linear head; {} for a ConvNet (no analytic count)."""
    arch = encoder.config
    out = flops.encoder_forward_flops(arch, classifier_lib.encoder_has_cls(encoder))
    if out:
        width = arch.num_features if hasattr(arch, "embed_dim") else arch.width  # Swin, ViT
        out["head"] = flops.dense_flops(1, width, n_classes)
    return out


def needs(config) -> dict:
    """The encoder finetune.pretrained names (when set), fitted to this one: trained from there
    (fine-tuning) or frozen in model_state (linear probe), with its BatchNorm statistics."""
    ft = config.finetune
    if not ft.pretrained:
        return {}
    where = "params" if ft.mode == "finetune" else "model_state"
    return {"encoder": Frozen(kind="encoder", source="finetune", into=(where, "encoder"))}


def build(config, frozen=None) -> Objective:
    """The classifier of a config.finetune block: fine-tuning or linear probing. `frozen`:
    needs(config), whose weights mim_jax.pretrained reads into a fresh run."""
    del frozen  # the encoder is config.model's; only its starting weights come from elsewhere
    validate(config)
    n_classes = num_classes(config)
    if config.finetune.mode == "finetune":
        return _finetune_objective(config, n_classes)
    return _probe_objective(config, n_classes)
