"""Analytic FLOP counts, the benchmark's arithmetic, and a tiny end-to-end `--mode=train` run."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_beit_config, tiny_mae_config
from mim_jax import flops, masking, objectives, pretrained, train
from mim_jax.benchmark import gpu_trace, input_pipeline, masking_share, timing, train_step
from mim_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The usual ViT forward figures at 224 px (GFLOP per image). They count 2 FLOPs per
# multiply-add over every matmul, patch embedding and attention products included: dropping
# the attention products puts B/16 4% low, so they are part of the convention.
@pytest.mark.parametrize("variant,reference", [("B/16", 35.2), ("L/16", 123.2),
                                               ("H/14", 334.8)])
def test_vit_forward_flops_match_reference(variant, reference):
    arch = vit.resolve_vit_config(variant, 224)
    total = sum(flops.vit_forward_flops(arch).values()) / 1e9
    assert total == pytest.approx(reference, rel=0.01)


# The Swin paper's figures at 224 px, window 7, are multiply-adds (GMAC): T 4.5, S 8.7, B 15.4.
@pytest.mark.parametrize("variant,gmac", [("T", 4.5), ("S", 8.7), ("B", 15.4)])
def test_swin_forward_flops_match_reference(variant, gmac):
    from mim_jax.models import swin
    arch = swin.resolve_swin_config(variant, 224, 3)
    assert sum(flops.swin_forward_flops(arch).values()) / 2e9 == pytest.approx(gmac, rel=0.01)


def test_block_flops_is_24nd2_plus_4n2d_for_mlp_4d():
    n, d = 197, 768
    assert flops.block_flops(n, d, 4 * d) == 24 * n * d**2 + 4 * n**2 * d


def test_mae_b16_train_flops_per_image():
    from configs import mae as mae_config
    config = mae_config.get_config("variant=B/16")
    # 3 x (patch embed on 196 patches + encoder on 49+1 tokens + 8x512 decoder on 196+1).
    assert objectives.build(config).flops_per_image / 1e9 == pytest.approx(58.7, abs=0.05)


def _xla_flops_per_image(fn, *args, batch):
    return train_step.xla_flops(jax.jit(fn).lower(*args).compile()) / batch


def _matmul_heavy_tiny_config():
    # Wide enough that matmuls dominate, as in real models (XLA also counts norms, softmax...).
    config = tiny_mae_config(decoder_width=128, decoder_depth=1, decoder_heads=4)
    config.model.update(width=128, depth=2, num_heads=4, mlp_dim=512)
    return config


def test_analytic_flops_agree_with_xla_cost_analysis():
    config = _matmul_heavy_tiny_config()
    obj = objectives.build(config)
    params = obj.init(jax.random.key(0))
    batch = {"image": jnp.zeros((4, *obj.image_shape))}
    rngs = {"mask": jax.random.key(1)}

    def forward(params, batch):
        return obj.loss_fn(params, {}, batch, rngs, train=False)[0]

    analytic = sum(obj.forward_flops.values())
    xla_forward = _xla_flops_per_image(forward, params, batch, batch=4)
    # XLA adds the non-matmul ops (norms, softmax, GELU, loss): a few percent on top.
    assert 1.0 <= xla_forward / analytic <= 1.15
    xla_train = _xla_flops_per_image(jax.grad(forward), params, batch, batch=4)
    # Backward ~ 2x forward; the patch embedding needs no input gradient, hence a bit below 3x.
    assert 0.95 <= xla_train / obj.flops_per_image <= 1.2


def test_simmim_analytic_flops_agree_with_xla_cost_analysis():
    from configs import simmim as simmim_config
    config = simmim_config.get_config("quickstart,model=swin")
    config.model.update(embed_dim=64, depths=(2, 2), num_heads=(2, 4))
    obj = objectives.build(config)
    params = obj.init(jax.random.key(0))
    batch = {"image": jnp.zeros((4, *obj.image_shape))}

    def forward(params, batch):
        return obj.loss_fn(params, {}, batch, {"mask": jax.random.key(1)}, train=False)[0]

    analytic = sum(obj.forward_flops.values())
    # Swin adds window shifts, relative-position biases and masks on top of the matmuls.
    assert 1.0 <= _xla_flops_per_image(forward, params, batch, batch=4) / analytic <= 1.25


def test_peak_flops_table_and_mfu():
    assert flops.peak_flops_for("NVIDIA H100 80GB HBM3", "gpu")[0] == 989e12
    assert flops.peak_flops_for("NVIDIA H200", "gpu")[0] == 989e12
    assert flops.peak_flops_for("NVIDIA A100-SXM4-80GB", "gpu")[0] == 312e12
    assert flops.peak_flops_for("TPU v4", "tpu")[0] == 275e12
    assert flops.peak_flops_for("TPU v5 lite", "tpu")[0] == 197e12
    assert flops.peak_flops_for("TPU v5", "tpu")[0] == 459e12
    assert flops.peak_flops_for("TPU v6 lite", "tpu")[0] == 918e12
    assert flops.peak_flops_for("NVIDIA H100 PCIe", "gpu")[0] is None
    assert flops.peak_flops_for("cpu", "cpu")[0] is None
    assert flops.peak_flops_for("cpu", "cpu", 1e12)[0] == 1e12
    # 1000 img/s x 60 GFLOP on 2 devices of 100 TFLOP/s: 30%.
    assert timing.mfu(1000.0, 60e9, 100e12, 2) == pytest.approx(0.3)
    assert timing.mfu(1000.0, 60e9, None, 2) is None


def test_input_rates_per_core_arithmetic():
    rates = input_pipeline.input_rates(images=1280, seconds=2.0, cores=2, cpu_seconds=3.2)
    assert rates["images_per_sec"] == 640.0
    assert rates["images_per_sec_per_core"] == 320.0
    assert rates["images_per_cpu_second"] == 400.0
    assert timing.per_core(1000.0, 4) == 250.0
    with pytest.raises(ValueError, match="cores=0"):
        timing.per_core(10.0, 0)


def test_masking_program_is_the_models_masking():
    """The isolated MAE program times the same gathers the MAE model runs."""
    b, num, ratio, enc_w, dec_w = 3, 16, 0.75, 8, 4
    work = masking_share.mae_masking_work(b, num, ratio, enc_w, dec_w)
    keys = jax.random.split(jax.random.key(0), 3)
    enc, dec_vis, token = (jax.random.normal(k, s) for k, s in zip(keys, work.inputs))
    (kept, unshuffled), mask = masking_share.masking_program(work, False)(
        jax.random.key(5), (enc, dec_vis, token), None)
    m = masking.random_masking(jax.random.key(5), b, num, ratio)
    np.testing.assert_array_equal(kept, jnp.take_along_axis(enc, m.ids_keep[..., None], 1))
    np.testing.assert_array_equal(mask, m.mask)
    # Visible tokens go back to their patch positions, mask tokens everywhere else.
    for i in range(b):
        np.testing.assert_array_equal(unshuffled[i, m.ids_keep[i]], dec_vis[i])
        np.testing.assert_array_equal(unshuffled[i, m.mask[i] == 1],
                                      np.broadcast_to(token[0], (num - 4, dec_w)))
    cot = tuple(jnp.ones(s) for s in work.outputs)
    _, _, (g_enc, g_dec, g_token) = masking_share.masking_program(work, True)(
        jax.random.key(5), (enc, dec_vis, token), cot)
    np.testing.assert_array_equal(g_enc.sum(axis=(1, 2)), np.full(b, 4 * enc_w))
    np.testing.assert_array_equal(g_token, np.full((1, 1, dec_w), b * (num - 4)))


def test_simmim_masking_work_replaces_masked_tokens():
    work = masking_share.simmim_masking_work(2, 32, 16, 4, 0.5, 8)
    emb, token = jnp.ones(work.inputs[0]), jnp.full(work.inputs[1], 7.0)
    (out,), token_mask = masking_share.masking_program(work, False)(jax.random.key(0), (emb, token),
                                                                None)
    assert out.shape == (2, 64, 8)
    np.testing.assert_array_equal(out[token_mask], 7.0)
    np.testing.assert_array_equal(out[~token_mask], 1.0)
    assert int(token_mask.sum()) == 2 * 2 * 16  # 2 of 4 cells of 16 patches, per sample


def test_train_mode_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mim_jax.benchmark", "--config", "configs/mae.py:quickstart",
           "--config.data.name=synthetic", "--config.model.depth=1",
           "--config.objective.decoder_depth=1", "--batch=8", "--steps=2", "--warmup=1",
           "--data", f"--json_out={out}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "masking share of step" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "train"
    # --data: the loop fed by the (TF-free, host) synthetic source next to on-device data.
    loop = result["input_pipeline_loop"]
    assert loop["data"] == "synthetic"
    assert loop["pipeline"]["images_per_sec"] > 0
    assert loop["on_device_synthetic"]["images_per_sec"] > 0
    step = result["train_step"]
    assert loop["on_device_synthetic"] == step["back_to_back"]  # one measurement, not two
    assert set(step) >= {"compile", "step_time", "images_per_sec", "flops", "mfu", "memory",
                         "masking", "peak_flops_source", "achieved_flops_per_sec"}
    assert set(step["compile"]) == {"trace_lower_s", "compile_s"}
    assert len(step["step_time"]["all_s"]) == 2
    assert step["mfu"] is None  # CPU: no peak unless --peak_flops
    assert step["back_to_back"]["steps"] == 2 and step["back_to_back"]["images_per_sec"] > 0
    assert "steps back to back" in proc.stdout
    assert step["flops"]["xla_train_per_image"] > 0
    assert step["flops"]["analytic_train_per_image"] > 0
    assert 0 < step["masking"]["share_of_step"] < 1
    assert step["memory"]["bytes"] > 0 and step["memory"]["source"]
    assert result["environment"]["threads"] >= 1
    assert result["model"]["batch_size"] == 8


def test_hlo_opcode_parsing_and_categories():
    assert gpu_trace._opcode("f32[2,3]{1,0} add(f32[2,3]{1,0} %a, f32[2,3]{1,0} %b)") == "add"
    assert gpu_trace._opcode("(f32[4]{0}, s32[4]{0}) sort(f32[4]{0} %x, s32[4]{0} %i), "
                             "dimensions={0}") == "sort"

    def fn(x, w, idx):
        return jnp.take_along_axis(x @ w, idx, axis=1), jnp.argsort(x, axis=1)

    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    compiled = jax.jit(fn).lower(x, w, jnp.zeros((4, 2), jnp.int32)).compile()
    ops = gpu_trace.hlo_instruction_ops(compiled.as_text())
    categories = {gpu_trace.op_category(o) for o in ops.values()}
    assert {"masking (gather/scatter/sort)", "matmul / conv"} <= categories


def test_beit_benchmark_batch_carries_token_ids():
    """A benchmark batch with precomputed_tokens holds ids, so the step skips the tokenizer (as
    HF's BEiT, fed labels, does in tools/torch_compare); the analytic count adds BEiT's LM head
    (and v2's CLS head) to the encoder."""
    from mim_jax import sharding
    config = tiny_beit_config(2)
    obj = pretrained.build_objective(config)
    assert train_step.token_labels_shape(obj) == (49, obj.model.vocab_size)
    assert train_step.token_labels_shape(objectives.build(tiny_mae_config())) is None
    batch = train_step._synthetic_device_batch(obj, 4, sharding.make_mesh(), 0,
                                               precomputed_tokens=True)
    tokens = np.asarray(batch["tokens"])
    assert tokens.shape == (4, 49) and tokens.dtype == np.int32
    assert 0 <= tokens.min() and tokens.max() < obj.model.vocab_size
    parts = dict(obj.forward_flops)
    assert set(parts) == {"patch_embed", "encoder", "lm_head", "cls_head", "cls_head_lm_head"}
    assert parts["lm_head"] == flops.dense_flops(49, 64, obj.model.vocab_size)
    assert parts["cls_head"] == parts["encoder"] / 2  # 1 of the encoder's 2 blocks


def test_compare_steps_times_several_objectives_in_one_run(tmp_path):
    """--mode compare_steps: every config's trainer step, interleaved, ratios to the first."""
    from mim_jax.benchmark.compare_steps import label_of, run_compare_steps
    from mim_jax.config_file import load_config
    mae = load_config("configs/mae.py:quickstart")
    mae.model.depth, mae.objective.decoder_depth = 1, 1
    spark_cfg = load_config("configs/spark.py:quickstart")
    spark_cfg.model.update(stem_width=8, widths=(4, 4, 8, 8))
    spark_cfg.objective.decoder_width = 16
    result = run_compare_steps([mae, spark_cfg], threads=1, steps=2, warmup=1, batch=4,
                               image_size=32)
    steps = result["steps"]
    assert list(steps) == [label_of(mae), label_of(spark_cfg)] == ["mae vit-Ti/4",
                                                                   "spark resnet-50"]
    assert result["reference"] == "mae vit-Ti/4"
    assert steps["mae vit-Ti/4"]["step_over_first_paired_wall"]["median"] == 1.0
    for entry in steps.values():
        assert entry["batch_size"] == 4 and entry["image_size"] == 32
        assert len(entry["step_time"]["all_s"]) == 2 and entry["images_per_sec"] > 0
        assert entry["xla_train_flops_per_image"] > 0 and np.isfinite(entry["final_loss"])
    with pytest.raises(ValueError, match=r"^--also='nope.py': 'nope.py' is not a config file"):
        load_config("nope.py", flag="--also")


def test_a_config_spec_sets_fields_after_its_arg():
    from mim_jax.config_file import load_config
    config = load_config("configs/mae.py:quickstart+model.remat=full+batch_size=8"
                         "+optimizer.base_lr=0.5")
    assert (config.model.remat, config.batch_size, config.optimizer.base_lr) == ("full", 8, 0.5)
    assert config.data.name == load_config("configs/mae.py:quickstart").data.name
    with pytest.raises(ValueError, match=r"^--also: 'model.nope' is not a field of configs/mae"):
        load_config("configs/mae.py+model.nope=1", flag="--also")
    with pytest.raises(ValueError, match=r"'batch_size' is not FIELD=VALUE"):
        load_config("configs/mae.py+batch_size")


def test_gpu_trace_summary_sorts_kernels_by_kind():
    def fn(x, w):
        return jnp.tanh(x @ w).sum(axis=1)

    hlo = jax.jit(fn).lower(jnp.ones((4, 8)), jnp.ones((8, 8))).compile().as_text()
    ops = gpu_trace.hlo_instruction_ops(hlo)
    reduce_name = next(n for n, o in ops.items() if "reduce" in o and "dot" not in o)
    kernel = reduce_name.replace(".", "_").replace("-", "_")  # how a GPU kernel is named
    ps = 10**9  # 1 ms
    # Two steps: [gemm 4 ms][idle 1][attention 2][our reduce 1][memset] per step.
    events = []
    for step in range(2):
        t = step * 10 * ps
        events += [("nvjet_sm90_tst_128x160_NNT", t, 4 * ps),
                   ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", t + 5 * ps, 2 * ps),
                   (kernel, t + 7 * ps, ps), ("Memset 3", t + 8 * ps, ps // 10)]
    s = gpu_trace.summarize(events, hlo, steps=2)
    cats = s["categories"]
    assert cats[gpu_trace.MATMUL]["ms_per_step"] == pytest.approx(4.0)
    assert cats[gpu_trace.ATTENTION]["ms_per_step"] == pytest.approx(2.0)
    assert cats["reductions (norms, softmax, sums)"]["ms_per_step"] == pytest.approx(1.0)
    assert cats[gpu_trace.UNMATCHED]["kernels_per_step"] == 1
    assert s["kernels_per_step"] == 4
    # Idle: 1 ms inside each step, plus the 1.9 ms between the steps, over 2 steps.
    assert s["idle_ms_per_step"] == pytest.approx((2 * 1.0 + 1.9) / 2)
    assert s["top_kernels"][0]["name"].startswith("nvjet")
    assert "7.10" in gpu_trace.format_summary(s)  # kernel ms per step
    # A cuDNN kernel that is not attention (a convolution's) counts as a product.
    assert gpu_trace.classify_kernel("cudnn::nchwToNhwcKernel", {}) == gpu_trace.MATMUL
    with pytest.raises(ValueError, match="no GPU kernel"):
        gpu_trace.summarize([], hlo, steps=1)


def test_benchmark_times_the_fine_tuning_step():
    """A config with a finetune block benchmarks the classifier's step (random labels)."""
    from configs import finetune as finetune_config
    config = finetune_config.get_config("quickstart")
    config.model.update(depth=1)
    config.data.name = "synthetic"
    config.batch_size = 8
    setup = train_step.build_train_setup(config)
    assert setup.batch["label"].shape == (8,) and setup.batch["label"].dtype == jnp.int32
    assert int(setup.batch["label"].max()) < 10
    compiled, _ = train_step.compile_step(setup)
    runner = train_step.StepRunner(compiled, setup.state, setup.batch)
    metrics = runner()
    assert np.isfinite(float(metrics["loss"]))
    assert int(runner.state.step) == 1
    flop = train_step.flops_report(config, compiled, 8)
    assert flop["analytic_train_per_image"] > 0


def test_linear_probe_flops_count_the_frozen_encoder_forward_only():
    from configs import finetune as finetune_config
    config = finetune_config.get_config("model=vit_b")
    full = pretrained.build_objective(config)
    parts = full.forward_flops
    config.finetune.mode = "linear_probe"
    probe = pretrained.build_objective(config).flops_per_image
    assert probe == pytest.approx(sum(parts.values()) + 2 * parts["head"])
    assert probe < full.flops_per_image / 2.9


def test_beit3_benchmark_needs_no_text_files(tmp_path):
    """A BEiT-3 config's step is benchmarked on synthetic batches of all three streams: the
    SentencePiece model and corpora its text block names are not read."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mim_jax.benchmark", "--config", "configs/beit3.py:quickstart",
           "--config.data.name=synthetic", "--config.model.depth=1", "--config.model.width=32",
           "--config.model.num_heads=2", "--config.model.mlp_dim=64",
           "--config.text.spm_model=missing.spm", "--batch=6", "--steps=1", "--warmup=1",
           f"--json_out={out}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"]["objective"] == "beit3"
    assert result["model"]["arch"]["vocab_size"] == 1002  # objective.text's, not model's
    step = result["train_step"]
    assert step["images_per_sec"] > 0 and np.isfinite(step["final_loss"])
    assert step["flops"]["analytic_train_per_image"] > 0


def test_every_gpu_suite_row_builds(monkeypatch):
    """Each config the GPU suite benchmarks builds its objective and parameters (shapes only):
    a renamed config or argument fails here, not on the GPU."""
    import re
    from mim_jax.config_file import load_config
    monkeypatch.chdir(REPO)
    text = open(os.path.join(REPO, "benchmarks", "gpu_suite.sh")).read()
    specs = sorted(set(re.findall(r"--config (configs/\S+)", text)))
    assert {s.split(":")[0] for s in specs} >= {
        "configs/mae.py", "configs/simmim.py", "configs/beit.py", "configs/spark.py",
        "configs/finetune.py", "configs/beit3.py"}
    for spec in specs:
        config = train.without_text_data(load_config(spec))
        objective = pretrained.build_objective(config)
        params, _ = jax.eval_shape(objective.init_variables, jax.random.key(0))
        assert jax.tree_util.tree_leaves(params), spec
