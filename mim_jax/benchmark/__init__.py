"""Benchmarks of mim_jax: train-step speed, FLOPs, MFU and memory; the input pipeline. Run
`python -m mim_jax.benchmark --help` (see __main__.py).

Modules, by job:
  timing          wall / CPU time of calls, interleaved rounds, summaries and rates
  run_flags       the flags every benchmark command takes (also tools/torch_compare's)
  environment     thread pinning, CPU model, versions, peak memory
  model_config    --batch / --image_size / --variant overrides, the model description
  train_step      the trainer's jitted step without data, compile, XLA cost figures
  masking_share   the objective's masking work timed alone
  train_mode      --mode train
  compare_steps   --mode compare_steps
  jpeg_dataset    generated JPEG datasets (TFDS records or a folder)
  input_pipeline  --mode input
  gpu_trace       --trace_dir's trace; python -m mim_jax.benchmark.gpu_trace DIR: GPU kernel
                  time by kind
  report          the table and the JSON output
  aot_table       python -m mim_jax.benchmark.aot_table: largest per-chip batch on TPU slices
"""
