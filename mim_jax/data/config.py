"""Data config: defaults and cheap validation.

`validate_data_config` is meant to run at start-up, before any expensive
work, so it only inspects the config, the filesystem path of a folder
dataset and the TFDS builder *registry*; it never prepares or reads data.
"""

import re
from typing import Optional

from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

FOLDER = "folder"
MNIST5K = "mnist5k"
SYNTHETIC = "synthetic"  # TF-free random images (benchmarks, hosts with only JAX)
INTERPOLATIONS = ("bicubic", "bilinear")
AUTOTUNE = -1


# The text that sets an optional field to None on the command line.
NONE_TEXT = "None"


class _NoneOrParser(flags.ArgumentParser):
    """Command-line value of an optional field: the text None -> None, any other text goes
    to the parser config_flags uses for fields of the value's own type."""

    def __init__(self, value_parser: flags.ArgumentParser):
        # absl caches parser instances by their arguments, so they hold no other state.
        self._value_parser = value_parser

    def parse(self, argument):
        # config_flags also passes the field's current (already typed) value through here.
        if argument is None or argument == NONE_TEXT:
            return None
        return self._value_parser.parse(argument)

    def flag_type(self):
        return f"{self._value_parser.flag_type()} or None"


# The parsers config_flags itself uses for these types.
_VALUE_PARSERS = {
    int: flags.IntegerParser,
    float: flags.FloatParser,
    str: flags.ArgumentParser,
    tuple: tuple_parser.TupleParser,
}


def optional_field(field_type, default=None) -> config_dict.FieldReference:
    """A config field holding a `field_type` value or None, both settable from the command
    line: `--config.data.crop_scale=None` as well as `--config.data.crop_scale=(0.3,1.0)`.

    config_flags parses an override by the type of the field.  A plain tuple default would
    get the tuple parser, which makes `None` into `(None,)`, and `placeholder(str)` keeps the
    text 'None'.  This field's type is the pair (field_type, NoneType): assignments are still
    type-checked by ConfigDict, and the parser registered for the pair reads None as None and
    anything else like a `field_type` field.  One difference for tuples: config_flags'
    repeated-flag form (`--config.x=1 --config.x=2`) is only for plain tuple fields, and here
    the last value wins, so a tuple is given whole: `(1,2)` or `1,2`.
    """
    if field_type not in _VALUE_PARSERS:
        raise TypeError(f"optional_field supports {sorted(t.__name__ for t in _VALUE_PARSERS)}, "
                        f"not {field_type!r}.")
    optional_type = (field_type, type(None))
    # Registered here, when the field is made, so it is in place before config_flags
    # parses any override: it loads the config file (which makes the fields) first.
    config_flags.register_flag_parser_for_type(
        optional_type, _NoneOrParser(_VALUE_PARSERS[field_type]()))
    return config_dict.FieldReference(default, field_type=optional_type)


def default_data_config() -> ml_collections.ConfigDict:
    """The data section of an experiment config, with documented defaults."""
    c = ml_collections.ConfigDict()
    # 'mnist5k' (offline, bundled), 'folder' (own images), 'synthetic' or any TFDS name,
    # optionally with config / version, e.g. 'imagenet2012:5.1.0'.
    c.name = MNIST5K
    # Optional fields are typed (str here) so command-line overrides work, and None can be
    # given there too (see `optional_field`).
    c.data_dir = optional_field(str)  # None -> TFDS default dir.
    c.manual_dir = optional_field(str)  # e.g. ImageNet tar files.
    c.folder = optional_field(str)  # Root dir when name == 'folder'.
    c.split = "train"
    c.eval_split = "test"  # Falls back to `split` when empty / None.
    c.image_key = "image"  # Feature holding the image in TFDS examples.
    c.label_key = "label"  # Feature holding the class (fine-tuning, kNN / probe evaluators).
    c.image_size = 224
    c.channels = 3  # 1 or 3; inputs are converted as needed.
    # RandomResizedCrop area range as a fraction of the image; None disables
    # cropping (plain resize to image_size), also as --config.data.crop_scale=None.
    c.crop_scale = optional_field(tuple, (0.2, 1.0))
    c.crop_ratio = (3 / 4, 4 / 3)  # Aspect-ratio (w/h) range of the crop.
    c.interpolation = "bicubic"
    c.flip = True
    # timm RandAugment policy applied after crop / flip, e.g. 'rand-m9-mstd0.5-inc1' as in
    # MAE / BEiT fine-tuning (see mim_jax/data/randaugment.py); None = off, also as
    # --config.data.randaugment=None.
    c.randaugment = optional_field(str)
    # torchvision ColorJitter(x, x, x) (brightness, contrast, saturation; BEiT pretraining uses
    # 0.4), applied to the crop after the flip; 0 = off.
    c.color_jitter = 0.0
    c.mean = (0.485, 0.456, 0.406)
    c.std = (0.229, 0.224, 0.225)
    c.shuffle_buffer = 10_000
    c.prefetch = 2
    c.num_parallel_calls = AUTOTUNE  # -1 = tf.data.AUTOTUNE.
    return c


def describe_source(cfg, split: Optional[str] = None) -> str:
    """How messages name a dataset: 'data.folder=DIR' or "data.name=N, split S"."""
    if cfg.name == FOLDER:
        return f"data.folder={cfg.folder!r}"
    split = split or cfg.split
    return f"data.name={cfg.name!r}, split {split!r}"


def tfds_base_name(name: str) -> str:
    """'imagenet2012/subset:5.1.0' -> 'imagenet2012' (builder registry key)."""
    return re.split(r"[/:]", name, maxsplit=1)[0]


def _is_registered_tfds_builder(name: str) -> bool:
    # Importing here keeps this module importable without TFDS (configs only
    # need `default_data_config`).  `builder_cls` only looks at the registry;
    # unlike `tfds.list_builders()` it never touches the network.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from mim_jax.data import mnist5k  # pylint: disable=g-import-not-at-top,unused-import

    try:
        tfds.builder_cls(tfds_base_name(name))
    except Exception:  # pylint: disable=broad-except
        # DatasetNotFoundError, or a malformed name TFDS refuses to parse.
        return False
    return True


def _pair(cfg, field, or_none: str = ""):
    value = cfg.get(field)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"data.{field}={value!r} must be a pair of numbers (min, max){or_none}."
        ) from None
    return lo, hi


def _int_field(cfg, field):
    value = cfg.get(field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data.{field}={value!r} must be an integer.")
    return value


def validate_data_config(cfg) -> None:
    """Raises ValueError naming the offending field; cheap (no data access)."""
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"data.name={name!r} must be '{MNIST5K}', '{FOLDER}' or the name of "
            "a registered TFDS dataset."
        )
    if name == FOLDER:
        folder = cfg.get("folder")
        if not folder:
            raise ValueError(
                f"data.folder={folder!r}: data.name='{FOLDER}' needs data.folder set "
                "to a directory of images."
            )
        if not epath.Path(folder).is_dir():  # local or gs://
            raise ValueError(f"data.folder={folder!r} is not an existing directory.")
    elif name not in (MNIST5K, SYNTHETIC) and not _is_registered_tfds_builder(name):
        raise ValueError(
            f"data.name={name!r} is unknown: allowed are '{MNIST5K}', '{FOLDER}', '{SYNTHETIC}' "
            "or a registered TFDS dataset name (see tfds.list_builders())."
        )

    image_size = _int_field(cfg, "image_size")
    if image_size <= 0:
        raise ValueError(f"data.image_size={image_size} must be > 0.")
    channels = cfg.get("channels")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"data.channels={channels!r} must be 1 or 3.")

    if cfg.get("crop_scale") is not None:
        # A misspelt None (e.g. 'none') arrives here as text: say what turns cropping off.
        lo, hi = _pair(cfg, "crop_scale", f", or {NONE_TEXT} to disable cropping")
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"data.crop_scale={tuple(cfg.crop_scale)!r} must satisfy "
                "0 < min <= max <= 1 (fraction of the image area), or be None to "
                "disable cropping."
            )
        lo, hi = _pair(cfg, "crop_ratio")
        if not 0 < lo <= hi:
            raise ValueError(
                f"data.crop_ratio={tuple(cfg.crop_ratio)!r} must satisfy " "0 < min <= max."
            )

    interpolation = cfg.get("interpolation")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"data.interpolation={interpolation!r} is not allowed; use one of " f"{INTERPOLATIONS}."
        )
    if cfg.get("randaugment") is not None:
        from mim_jax.data import randaugment_policy  # pylint: disable=g-import-not-at-top

        randaugment_policy.parse_policy(cfg.randaugment)  # ValueError naming data.randaugment.

    jitter = cfg.get("color_jitter", 0.0)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or jitter < 0:
        raise ValueError(f"data.color_jitter={jitter!r} must be a number >= 0 (0 = off).")

    for field in ("mean", "std"):
        value = cfg.get(field)
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"data.{field}={value!r} must be a sequence of numbers.") from None
        if len(values) != channels:
            raise ValueError(
                f"data.{field}={tuple(value)!r} has {len(values)} entries but "
                f"data.channels={channels}; they must match."
            )
        if field == "std" and min(values) <= 0:
            raise ValueError(f"data.std={tuple(value)!r} must be all > 0.")

    if _int_field(cfg, "shuffle_buffer") < 1:
        raise ValueError(f"data.shuffle_buffer={cfg.shuffle_buffer} must be >= 1.")
    if _int_field(cfg, "prefetch") < 0:
        raise ValueError(f"data.prefetch={cfg.prefetch} must be >= 0.")
    npc = _int_field(cfg, "num_parallel_calls")
    if npc != AUTOTUNE and npc < 1:
        raise ValueError(f"data.num_parallel_calls={npc} must be >= 1 or -1 (AUTOTUNE).")
    for field in ("split", "image_key", "label_key"):
        if not isinstance(cfg.get(field), str) or not cfg.get(field):
            raise ValueError(f"data.{field}={cfg.get(field)!r} must be a non-empty string.")
