"""Input pipeline of mim_jax (the only package allowed to use TF / TFDS).

Importing it hides accelerators from TensorFlow and registers the offline
`mnist5k` TFDS dataset.
"""

from mim_jax.data import tf_setup  # noqa: F401  (must run first: hides GPUs)
from mim_jax.data import mnist5k  # noqa: F401  (registers the TFDS builder)
from mim_jax.data.config import default_data_config
from mim_jax.data.config import validate_data_config
from mim_jax.data.pipeline import create_train_iterator
from mim_jax.data.pipeline import denormalize
from mim_jax.data.pipeline import fixed_eval_images
from mim_jax.data.pipeline import TrainData

__all__ = [
    'TrainData',
    'create_train_iterator',
    'default_data_config',
    'denormalize',
    'fixed_eval_images',
    'validate_data_config',
]
