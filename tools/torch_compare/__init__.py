"""The mim_jax train step next to the PyTorch reference models (Hugging Face transformers) on a
CPU, timed interleaved in one run. Needs the test extra (torch, transformers). Run from the
repository root: `python -m tools.torch_compare --help` (see __main__.py).

  compare_torch  the two steps timed, the figures and their table
  torch_steps    the PyTorch side: transformers' models of the config, AdamW
  torch_process  that PyTorch step in a child process, with glibc's default allocator
"""
