"""RandAugment policy strings (timm's `rand-m9-mstd0.5-inc1` syntax), parsed without TensorFlow.

Config validation reads the policy before any data is touched; the ops that apply it live in
randaugment.py, which needs TensorFlow.
"""

import dataclasses
import math
import re
from typing import Sequence, Tuple

# timm's scale: magnitude 10 is the 'full' strength of every op.
_LEVEL_DENOM = 10.0

# Op sets in timm's order.  The 'Increasing' variants grow stronger with the magnitude;
# the originals (Posterize, Solarize) get *weaker* and the enhance ops have no sign.
INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
ORIGINAL_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """Parsed policy; the defaults are the MAE / BEiT recipe `rand-m9-mstd0.5-inc1`."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5  # math.inf: magnitude ~ U(0, magnitude), as timm's mstd>100.
    magnitude_max: float = 10.0
    increasing: bool = True
    prob: float = 0.5


# Longer keys first so that 'mstd0.5' is not read as 'm' + 'std0.5'.
_SECTION = re.compile(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?|\.\d+)")
_EXPECTED = (
    "expected 'rand' followed by '-'-separated sections m<magnitude>, n<ops per image>, "
    "mstd<magnitude std>, mmax<max magnitude>, p<op probability>, inc<0|1>, "
    "e.g. 'rand-m9-mstd0.5-inc1'"
)


def parse_policy(name: str) -> RandAugmentSpec:
    """timm's RandAugment string -> spec.  Absent sections take timm's defaults
    (m10, n2, mstd0, mmax10, p0.5, inc0), so a string means what it means in timm."""

    def error(reason):
        return ValueError(f"data.randaugment={name!r} {reason}; {_EXPECTED}.")

    if not isinstance(name, str):
        raise error("is not a string")
    head, *sections = name.split("-")
    if head != "rand":
        raise error("does not start with 'rand'")
    values = {}
    for section in sections:
        match = _SECTION.fullmatch(section)
        if match is None:
            raise error(f"has an unknown section {section!r}")
        key, value = match.groups()
        if key in values:
            raise error(f"sets {key!r} twice")
        values[key] = float(value)
    num_ops = values.get("n", 2.0)
    if num_ops < 1 or not num_ops.is_integer():
        raise error("needs n to be an integer >= 1")
    if values.get("p", 0.5) > 1:
        raise error("needs p <= 1")
    if values.get("mmax", 10.0) <= 0:
        raise error("needs mmax > 0")
    if values.get("inc", 0.0) not in (0.0, 1.0):
        raise error("needs inc0 or inc1")
    std = values.get("mstd", 0.0)
    return RandAugmentSpec(
        num_ops=int(num_ops),
        magnitude=values.get("m", _LEVEL_DENOM),
        magnitude_std=math.inf if std > 100 else std,  # timm: > 100 means uniform.
        magnitude_max=values.get("mmax", _LEVEL_DENOM),
        increasing=values.get("inc", 0.0) == 1.0,
        prob=values.get("p", 0.5),
    )


def fill_from_mean(mean: Sequence[float]) -> Tuple[int, ...]:
    """Fill colour of the geometric ops: the dataset mean in uint8, as timm sets it."""
    return tuple(max(0, min(255, round(255 * m))) for m in mean)
