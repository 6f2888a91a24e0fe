"""Analytic FLOP counts, the benchmark's arithmetic, and a tiny end-to-end `--mode=train` run."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_blas
from conftest import tiny_mae_config
from mim_jax import flops, masking, objectives
from mim_jax.benchmark import input_pipeline, masking_share, op_profile, timing, train_step
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
    assert flops.model_flops_per_image(config) / 1e9 == pytest.approx(58.7, abs=0.05)


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
        return obj.loss_fn(params, batch, rngs, train=False)[0]

    analytic = sum(flops.forward_flops_breakdown(config).values())
    xla_forward = _xla_flops_per_image(forward, params, batch, batch=4)
    # XLA adds the non-matmul ops (norms, softmax, GELU, loss): a few percent on top.
    assert 1.0 <= xla_forward / analytic <= 1.15
    xla_train = _xla_flops_per_image(jax.grad(forward), params, batch, batch=4)
    # Backward ~ 2x forward; the patch embedding needs no input gradient, hence a bit below 3x.
    assert 0.95 <= xla_train / flops.model_flops_per_image(config) <= 1.2


def test_simmim_analytic_flops_agree_with_xla_cost_analysis():
    from configs import simmim as simmim_config
    config = simmim_config.get_config("quickstart,model=swin")
    config.model.update(embed_dim=64, depths=(2, 2), num_heads=(2, 4))
    obj = objectives.build(config)
    params = obj.init(jax.random.key(0))
    batch = {"image": jnp.zeros((4, *obj.image_shape))}

    def forward(params, batch):
        return obj.loss_fn(params, batch, {"mask": jax.random.key(1)}, train=False)[0]

    analytic = sum(flops.forward_flops_breakdown(config).values())
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
    assert set(step["compile"]) == {"trace_lower_s", "compile_s", "products"}
    assert step["compile"]["products"] in ("onednn", "xla")
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
    assert op_profile._opcode("f32[2,3]{1,0} add(f32[2,3]{1,0} %a, f32[2,3]{1,0} %b)") == "add"
    assert op_profile._opcode("(f32[4]{0}, s32[4]{0}) sort(f32[4]{0} %x, s32[4]{0} %i), "
                             "dimensions={0}") == "sort"

    def fn(x, w, idx):
        return jnp.take_along_axis(x @ w, idx, axis=1), jnp.argsort(x, axis=1)

    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    compiled = jax.jit(fn).lower(x, w, jnp.zeros((4, 2), jnp.int32)).compile()
    ops = op_profile.hlo_instruction_ops(compiled.as_text())
    categories = {op_profile.op_category(o) for o in ops.values()}
    assert {"masking (gather/scatter/sort)", "matmul / conv"} <= categories


def test_torch_simmim_mask_follows_the_mim_jax_rule():
    """compare_torch feeds PyTorch a mask drawn by simmim_mask's rule: ceil(r x cells) whole
    mask cells per sample, upsampled to the model's patch grid."""
    from mim_jax.benchmark import torch_steps
    b, size, cell, patch, ratio = 4, 192, 32, 4, 0.6
    ours = torch_steps.simmim_bool_masked_pos(np.random.default_rng(0), b, size, cell, patch,
                                              ratio)
    ref = np.asarray(masking.simmim_mask(jax.random.key(0), b, size, cell, patch, ratio))
    assert ours.shape == ref.shape == (b, (size // patch) ** 2) and ours.dtype == bool
    np.testing.assert_array_equal(ours.sum(axis=1), ref.sum(axis=1))  # 22 cells x 64 patches
    side, scale = size // cell, cell // patch
    blocks = ours.reshape(b, side, scale, side, scale)
    assert (blocks.all(axis=(2, 4)) == blocks.any(axis=(2, 4))).all()  # whole cells only


def test_compare_torch_pairs():
    from configs import beit as beit_config
    from configs import mae as mae_config
    from configs import simmim as simmim_config
    from mim_jax.benchmark import torch_steps
    assert torch_steps.torch_step_class(mae_config.get_config()) is torch_steps.TorchMAEStep
    assert (torch_steps.torch_step_class(simmim_config.get_config())
            is torch_steps.TorchSwinSimMIMStep)
    for version in ("version=1", "version=2"):
        assert (torch_steps.torch_step_class(beit_config.get_config(version))
                is torch_steps.TorchBEiTStep)
    with pytest.raises(ValueError, match="compare_torch compares"):
        torch_steps.torch_step_class(simmim_config.get_config("model=vit_b"))


@pytest.mark.parametrize("precision, autocast", [("float32", None),
                                                  ("bfloat16", "bfloat16")])
def test_torch_step_autocasts_where_mim_jax_multiplies_in_bfloat16(precision, autocast):
    """compare_torch's PyTorch step runs its forward pass under CPU bfloat16 autocast exactly
    when the mim_jax config's products are bfloat16: its linear layers then return bfloat16,
    its parameters and gradients stay float32."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch
    from configs import mae as mae_config
    from mim_jax.benchmark import torch_steps
    config = mae_config.get_config("quickstart")
    config.model.matmul_precision = precision
    config.batch_size = 2
    images = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    step = torch_steps.TorchMAEStep(config, images)
    assert step.describe()["autocast"] == (autocast or "off (float32)")
    seen = []
    linear = next(m for m in step.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    assert np.isfinite(step())
    assert seen == [torch.bfloat16 if autocast else torch.float32]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in step.model.parameters() if p.grad is not None)


def test_hf_swin_config_is_the_mim_jax_swin():
    """SwinForMaskedImageModeling of the config has exactly mim_jax SimMIM's parameter count."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from configs import simmim as simmim_config
    from mim_jax.benchmark import torch_steps
    config = simmim_config.get_config("quickstart,model=swin")
    hf = transformers.SwinForMaskedImageModeling(torch_steps.hf_swin_config(config))
    params = objectives.build(config).init(jax.random.key(0))
    assert (sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
            == sum(p.numel() for p in hf.parameters()))


def _tiny_beit_config(version: int):
    """configs/beit.py's quickstart shrunk: 2 blocks of width 64 on a 7 x 7 grid; v1 with a
    small dVAE (56 px view), v2 with the quickstart VQ-KD and a 1-block CLS head."""
    from configs import beit as beit_config
    config = beit_config.get_config("quickstart")
    config.model.update(depth=2, width=64, num_heads=2, mlp_dim=128, drop_path_rate=0.1)
    if version == 1:
        config.objective.tokenizer = beit_config.dall_e_tokenizer()
        config.objective.tokenizer.update(input_size=56, n_hid=16, n_blk_per_group=1,
                                          vocab_size=512)
    else:
        config.objective.update(cls_head_layers=1, early_layers=1)
    config.batch_size = 4
    return config


@pytest.mark.parametrize("version", [1, 2])
def test_torch_beit_step_is_the_mim_jax_beit(version):
    """BeitForMaskedImageModeling (+ v2's CLS head) of the config has mim_jax BEiT's parameters
    but the k-bias slot mim_jax's 'qv' layout keeps at zero (one width per block), and its
    step trains on blockwise masks and random labels."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mim_jax.benchmark import torch_steps
    config = _tiny_beit_config(version)
    params = objectives.build(config).init(jax.random.key(0))
    images = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
    step = torch_steps.TorchBEiTStep(config, images)
    blocks = config.model.depth + config.objective.cls_head_layers
    assert (sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
            == step.describe()["parameters"] + blocks * config.model.width)
    assert step.describe()["model_class"].startswith("BeitForMaskedImageModeling")
    hf = step.hf_model.config
    assert (hf.use_mask_token, hf.use_absolute_position_embeddings,
            hf.use_shared_relative_position_bias, hf.use_relative_position_bias,
            hf.layer_scale_init_value, hf.layer_norm_eps) == (True, False, True, False, 0.1, 1e-6)
    assert hf.vocab_size == (512 if version == 1 else objectives.build(config).model.vocab_size)
    losses = [step() for _ in range(2)]
    # Random labels: cross-entropy near log(vocab), once per head.
    heads = 1 + int(version == 2)
    assert all(abs(loss - heads * np.log(hf.vocab_size)) < 0.5 * heads for loss in losses)


def test_torch_beit_mask_follows_the_block_mask_rule():
    """compare_torch feeds PyTorch blockwise masks drawn by masking.block_mask's rule: the same
    counts (exact for v2, at most the target for v1) and the same spatial distribution."""
    from mim_jax.benchmark import torch_steps
    for exact in (False, True):
        ours = torch_steps.beit_bool_masked_pos(np.random.default_rng(0), 256, 14, 75, 16,
                                                exact=exact)
        ref = np.asarray(masking.block_mask(jax.random.key(0), 256, 14, 14, 75, 16,
                                            exact=exact))
        assert ours.shape == ref.shape == (256, 196) and ours.dtype == bool
        counts = ours.sum(axis=1)
        assert counts.max() == 75 and (counts.min() == 75 if exact else counts.min() > 60)
        assert abs(counts.mean() - ref.sum(axis=1).mean()) < 1.0
        # Blocks land near the centre more often than at the corners, alike on both sides.
        np.testing.assert_allclose(ours.mean(0), ref.mean(0), atol=0.12)


def test_beit_benchmark_batch_carries_token_ids():
    """The compare_torch batch of a tokenizer objective holds ids, so the step skips the
    tokenizer; the analytic count adds BEiT's LM head (and v2's CLS head) to the encoder."""
    from mim_jax import sharding
    config = _tiny_beit_config(2)
    obj = objectives.build(config)
    assert train_step.token_labels_shape(obj) == (49, obj.model.vocab_size)
    assert train_step.token_labels_shape(objectives.build(tiny_mae_config())) is None
    batch = train_step._synthetic_device_batch(obj, 4, sharding.make_mesh(), 0,
                                               precomputed_tokens=True)
    tokens = np.asarray(batch["tokens"])
    assert tokens.shape == (4, 49) and tokens.dtype == np.int32
    assert 0 <= tokens.min() and tokens.max() < obj.model.vocab_size
    parts = flops.forward_flops_breakdown(config)
    assert set(parts) == {"patch_embed", "encoder", "lm_head", "cls_head", "cls_head_lm_head"}
    assert parts["lm_head"] == flops.dense_flops(49, 64, obj.model.vocab_size)
    assert parts["cls_head"] == parts["encoder"] / 2  # 1 of the encoder's 2 blocks


def test_compare_steps_times_several_objectives_in_one_run(tmp_path):
    """--mode compare_steps: every config's trainer step, interleaved, ratios to the first."""
    from mim_jax.benchmark.compare_steps import label_of, load_config, run_compare_steps
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
        load_config("nope.py")


def test_gpu_trace_summary_sorts_kernels_by_kind():
    from mim_jax.benchmark import gpu_trace

    def fn(x, w):
        return jnp.tanh(x @ w).sum(axis=1)

    hlo = jax.jit(fn).lower(jnp.ones((4, 8)), jnp.ones((8, 8))).compile().as_text()
    ops = op_profile.hlo_instruction_ops(hlo)
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
    full = flops.model_flops_per_image(config)
    parts = flops.forward_flops_breakdown(config)
    config.finetune.mode = "linear_probe"
    probe = flops.model_flops_per_image(config)
    assert probe == pytest.approx(sum(parts.values()) + 2 * parts["head"])
    assert probe < full / 2.9


def test_attention_shapes_of_mae_b16_a_vit_encoder_and_swin_b():
    from configs import mae as mae_config, simmim as simmim_config, spark as spark_config
    from mim_jax.benchmark.compare_attention import AttentionShape, attention_shapes
    config = mae_config.get_config("variant=B/16")
    # 196 patches, 25% kept: 49 visible + CLS in the encoder; every patch + CLS in the decoder.
    assert attention_shapes(config) == [
        AttentionShape("encoder (visible tokens)", 50, 12, 64, 12),
        AttentionShape("decoder", 197, 16, 32, 8)]
    vit_b = simmim_config.get_config("model=vit_b")
    assert [(s.tokens, s.heads, s.head_dim) for s in attention_shapes(vit_b)] == [
        (vit_b.data.image_size ** 2 // 256 + 1, 12, 64)]
    # Swin-B at 192 px, window 6: 48, 24, 12, 6 patches a side; blocks alternate unshifted /
    # shifted except in the last stage, which is a single window.
    swin = [(s.label, s.tokens, s.heads, s.head_dim, s.layers, s.windows, s.bias)
            for s in attention_shapes(simmim_config.get_config("model=swin_b"))]
    assert swin == [("stage 1 windows", 36, 4, 32, 1, 64, "shared"),
                    ("stage 1 shifted windows", 36, 4, 32, 1, 64, "per_window"),
                    ("stage 2 windows", 36, 8, 32, 1, 16, "shared"),
                    ("stage 2 shifted windows", 36, 8, 32, 1, 16, "per_window"),
                    ("stage 3 windows", 36, 16, 32, 9, 4, "shared"),
                    ("stage 3 shifted windows", 36, 16, 32, 9, 4, "per_window"),
                    ("stage 4 windows", 36, 32, 32, 2, 1, "shared")]
    with pytest.raises(ValueError, match="compare_attention measures ViT or Swin attention"):
        attention_shapes(spark_config.get_config("model=resnet50"))


def test_compare_attention_times_both_sides_on_a_tiny_mae(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mim_jax.benchmark", "--config", "configs/mae.py:quickstart",
         "--mode", "compare_attention", "--batch", "4", "--steps", "2", "--warmup", "1",
         "--json_out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch sdpa / mim_jax" in proc.stdout
    result = json.loads(out.read_text())
    decoder = result["shapes"][1]
    assert decoder["shape"]["label"] == "decoder"
    assert set(decoder["times"]) == {"mim_jax", "mim_jax xla", "torch sdpa", "torch eager"}
    assert result["products"] in ("onednn", "xla", "onednn/xla")
    assert all(t["median_s"] > 0 for t in decoder["times"].values())


def test_compare_attention_computes_the_same_gradients_on_both_sides():
    """Every timed call does the same work: equal gradients of q, k, v and the bias."""
    from mim_jax.benchmark.compare_attention import AttentionShape, _jax_call, _torch_call
    for bias in (None, "shared", "per_window"):
        shape = AttentionShape("w", tokens=4, heads=2, head_dim=8, layers=1, windows=3,
                               bias=bias)
        ours, library = _jax_call(2, shape, None, "onednn")
        assert library in ("onednn", "xla")
        want = [None if t is None else np.asarray(t) for t in ours()]
        for a, b in zip(_jax_call(2, shape, "xla")[0](), want):
            assert (a is None) == (b is None)
            if b is not None:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        for call in (_torch_call(2, shape, True), _torch_call(2, shape, False)):
            got = call()
            for i, b in enumerate(want):
                assert (got[i] is None) == (b is None)
                if b is None:
                    continue
                a = got[i].numpy()
                if i < 3:  # [calls, heads, N, D] -> mim_jax's [calls, N, heads, D]
                    a = a.transpose(0, 2, 1, 3)
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims", [
    ((4, 5), (5, 6), (((1,), (0,)), ((), ()))),
    ((3, 7, 5), (3, 7, 2), (((0, 1), (0, 1)), ((), ()))),  # a weight gradient
    ((2, 7, 3, 4), (2, 5, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),  # attention logits
    ((2, 3, 7, 5), (2, 5, 3, 4), (((3,), (1,)), ((0, 1), (0, 2)))),
    ((2, 3, 4, 5, 6), (6, 7, 3, 2, 8), (((1, 4), (2, 0)), ((0,), (3,)))),
])
def test_einsum_spec_is_the_dot_general(lhs_shape, rhs_shape, dims):
    torch = pytest.importorskip("torch")
    from mim_jax.benchmark.compare_products import einsum_spec
    rng = np.random.default_rng(0)
    lhs, rhs = rng.standard_normal(lhs_shape, np.float32), rng.standard_normal(rhs_shape,
                                                                                np.float32)
    want = jax.lax.dot_general(lhs, rhs, dims)
    got = torch.einsum(einsum_spec(lhs_shape, rhs_shape, dims), torch.from_numpy(lhs),
                       torch.from_numpy(rhs)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_jaxpr_products_counts_scan_iterations_and_the_costliest_cond_branch():
    from mim_jax.benchmark.compare_products import jaxpr_products

    def fn(x, w, flag):
        x = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=3)[0]
        big = lambda x: x @ w @ w
        return jax.lax.cond(flag, big, lambda x: x @ w, x)
    x, w = jnp.ones((2, 4)), jnp.ones((4, 4))
    counts = jaxpr_products(jax.make_jaxpr(jax.grad(lambda x: fn(x, w, True).sum()))(x).jaxpr)
    forward = ((2, 4), (4, 4), (((1,), (0,)), ((), ())), "float32", "float32", "float32", None)
    # forward: 3 in the scan + 2 in the costlier branch (summing both would give 3); the
    # backward adds one per forward product
    assert counts[forward] == 5
    assert sum(counts.values()) == 10


def test_jaxpr_products_take_the_cpu_branch_of_a_platform_choice():
    from mim_jax.benchmark.compare_products import jaxpr_products
    x, w = jnp.ones((2, 4)), jnp.ones((4, 4))
    fn = lambda x: jax.lax.platform_dependent(x, cpu=lambda x: x @ w,
                                              default=lambda x: x @ w @ w @ w)
    assert sum(jaxpr_products(jax.make_jaxpr(fn)(x).jaxpr).values()) == 1


def _compare_products(tmp_path, *overrides) -> dict:
    out = tmp_path / f"products{len(list(tmp_path.iterdir()))}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mim_jax.benchmark", "--config", "configs/mae.py:quickstart",
         "--mode", "compare_products", "--batch", "2", "--steps", "1", "--warmup", "0",
         "--config.model.matmul_precision=float32", "--json_out", str(out), *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch / mim_jax" in proc.stdout
    result = json.loads(out.read_text())
    assert result["calls_per_step"] == sum(r["calls_per_step"] for r in result["rows"]) > 50
    assert result["per_step_s"]["mim_jax"] > 0 and result["per_step_s"]["torch"] > 0
    return result


def test_compare_products_times_both_sides_on_a_tiny_mae(tmp_path):
    result = _compare_products(tmp_path)
    assert result["products"] in ("onednn", "xla", "onednn/xla")
    if not test_blas.MKL_EXPECTED:
        return
    # With MKL's products, the same arithmetic: the layers' products become MKL's calls.
    mkl = _compare_products(tmp_path, "--config.cpu_dots=mkl")
    assert "mkl + " in mkl["products"]
    assert any(r["precision"] == "mkl" for r in mkl["rows"])
    assert mkl["gflop_per_step"] == pytest.approx(result["gflop_per_step"], rel=1e-9)


def test_torch_environment_drops_only_the_settings_mim_jax_added():
    from mim_jax import allocator
    from mim_jax.benchmark.torch_process import torch_environment
    added = dict(allocator.SETTINGS, PATH="/bin", **{allocator.OPT_OUT: "applied"})
    assert torch_environment(added) == {"PATH": "/bin", "JAX_PLATFORMS": "cpu"}
    chosen = {"MALLOC_ARENA_MAX": "2", "PATH": "/bin"}  # the user's: both sides keep it
    assert torch_environment(chosen) == dict(chosen, JAX_PLATFORMS="cpu")


@pytest.mark.parametrize("torch_process", ["own", "shared"])
def test_compare_torch_runs_pytorch_in_its_own_process_or_in_mim_jaxs(tmp_path, torch_process):
    """The default runs PyTorch in a child process without mim_jax's allocator settings; the
    child measures its own steps (CPU time and faults included) and reports its losses."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mim_jax.benchmark.torch_process import allocator_variables, torch_environment
    out = tmp_path / "compare.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "mim_jax.benchmark", "--config", "configs/mae.py:quickstart",
         "--mode", "compare_torch", "--variant", "Ti/4", "--batch", "4", "--steps", "2",
         "--warmup", "1", "--tokenizer_step=false", f"--torch_process={torch_process}",
         "--json_out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    torch_side = result["torch"]
    assert result["torch_process"] == torch_process
    assert ("process" in torch_side) == (torch_process == "own")
    if torch_process == "own":  # the child has the user's allocator variables, not mim_jax's
        assert torch_side["malloc_env"] == allocator_variables(torch_environment(env))
        if env.get("MIM_JAX_ALLOCATOR") == "applied":  # the suite runs under mim_jax's settings
            assert result["malloc_env"] and torch_side["malloc_env"] == {}
    assert len(torch_side["step_time"]["all_s"]) == 2
    assert torch_side["step_time"]["cpu_median_s"] > 0
    assert np.isfinite(torch_side["final_loss"])
    assert "torch process" in proc.stdout


def test_a_pytorch_process_that_fails_to_build_raises_one_line_and_is_reaped(monkeypatch):
    from mim_jax.benchmark import torch_process
    started = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    class NotAStep:  # the child knows no step class of this name
        pass

    monkeypatch.setattr(torch_process.subprocess, "Popen", RecordingPopen)
    with pytest.raises(RuntimeError, match="The PyTorch process failed: KeyError"):
        torch_process.TorchStepProcess(NotAStep, {}, np.zeros((1, 4, 4, 1)), 1)
    assert len(started) == 1 and started[0].poll() is not None
