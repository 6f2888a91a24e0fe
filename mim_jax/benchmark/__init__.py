"""Benchmarks of mim_jax: train-step speed, FLOPs, MFU and memory; the input pipeline; the
PyTorch side by side. Run `python -m mim_jax.benchmark --help` (see __main__.py).

Modules, by job:
  timing          wall / CPU time of calls, interleaved rounds, summaries and rates
  environment     thread pinning, CPU model, versions, peak memory
  model_config    --batch / --image_size / --variant overrides, the model description
  train_step      the trainer's jitted step without data, compile, XLA cost figures
  masking_share   the objective's masking work timed alone
  op_profile      XLA CPU thunk time by HLO op kind (--profile); a trace to a folder (--trace_dir)
  gpu_trace       python -m mim_jax.benchmark.gpu_trace DIR: GPU kernel time by kind
  train_mode      --mode train
  jpeg_dataset    generated JPEG datasets (TFDS records or a folder)
  input_pipeline  --mode input
  compare_torch   --mode compare_torch
  torch_steps     its PyTorch side: transformers' models of the config, AdamW, autocast
  torch_process   that PyTorch step in a child process with the user's environment
  report          the table and the JSON output
  aot_table       python -m mim_jax.benchmark.aot_table: largest per-chip batch on TPU slices
"""
