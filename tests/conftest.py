"""Shared test fixtures: tiny configs that exercise the real code paths."""
import os

# Tests run on CPU in float32; keep XLA from grabbing every core for intra-op threads twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections
import pytest


def tiny_mae_config(**objective):
    obj = dict(name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=32,
               decoder_depth=1, decoder_heads=4)
    obj.update(objective)
    return ml_collections.ConfigDict(dict(
        data=dict(image_size=32, channels=3),
        model=dict(variant="Ti/4", width=64, depth=2, num_heads=4, mlp_dim=128),
        objective=obj))


@pytest.fixture
def tiny_config():
    return tiny_mae_config()
