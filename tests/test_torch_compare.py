"""tools/torch_compare: transformers' PyTorch models of the mim_jax configs, and the run that
times both steps side by side."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_beit_config
from mim_jax import allocator, masking, objectives, pretrained
from tools.torch_compare import torch_process, torch_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_simmim_mask_follows_the_mim_jax_rule():
    """compare_torch feeds PyTorch a mask drawn by simmim_mask's rule: ceil(r x cells) whole
    mask cells per sample, upsampled to the model's patch grid."""
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
    assert torch_steps.torch_step_class(mae_config.get_config()) is torch_steps.TorchMAEStep
    assert (torch_steps.torch_step_class(simmim_config.get_config())
            is torch_steps.TorchSwinSimMIMStep)
    for version in ("version=1", "version=2"):
        assert (torch_steps.torch_step_class(beit_config.get_config(version))
                is torch_steps.TorchBEiTStep)
    with pytest.raises(ValueError, match="compare_torch compares"):
        torch_steps.torch_step_class(simmim_config.get_config("model=vit_b"))


def test_torch_mae_step_trains_in_float32():
    """ViTMAEForPreTraining of the config: float32 throughout, and a step that changes the
    weights."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from configs import mae as mae_config
    config = mae_config.get_config("quickstart")
    config.batch_size = 2
    images = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    step = torch_steps.TorchMAEStep(config, images)
    seen = []
    linear = next(m for m in step.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = linear.weight.detach().clone()
    assert np.isfinite(step())
    assert seen == [torch.float32] and not torch.equal(before, linear.weight)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in step.model.parameters() if p.grad is not None)


def test_hf_swin_config_is_the_mim_jax_swin():
    """SwinForMaskedImageModeling of the config has exactly mim_jax SimMIM's parameter count."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from configs import simmim as simmim_config
    config = simmim_config.get_config("quickstart,model=swin")
    hf = transformers.SwinForMaskedImageModeling(torch_steps.hf_swin_config(config))
    params = objectives.build(config).init(jax.random.key(0))
    assert (sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
            == sum(p.numel() for p in hf.parameters()))


@pytest.mark.parametrize("version", [1, 2])
def test_torch_beit_step_is_the_mim_jax_beit(version):
    """BeitForMaskedImageModeling (+ v2's CLS head) of the config has mim_jax BEiT's parameters
    but the k-bias slot mim_jax's 'qv' layout keeps at zero (one width per block), and its
    step trains on blockwise masks and random labels."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    config = tiny_beit_config(version)
    objective = pretrained.build_objective(config)
    params = objective.init(jax.random.key(0))
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
    assert hf.vocab_size == (512 if version == 1 else objective.model.vocab_size)
    losses = [step() for _ in range(2)]
    # Random labels: cross-entropy near log(vocab), once per head.
    heads = 1 + int(version == 2)
    assert all(abs(loss - heads * np.log(hf.vocab_size)) < 0.5 * heads for loss in losses)


def test_torch_beit_mask_follows_the_block_mask_rule():
    """compare_torch feeds PyTorch blockwise masks drawn by masking.block_mask's rule: the same
    counts (exact for v2, at most the target for v1) and the same spatial distribution."""
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


def test_the_pytorch_process_finds_the_tools_from_anywhere():
    env = torch_process.torch_environment({"PATH": "/bin", "MALLOC_ARENA_MAX": "2",
                                           "PYTHONPATH": "/elsewhere"})
    assert env == {"PATH": "/bin", "MALLOC_ARENA_MAX": "2",  # the user's: both sides keep it
                   "PYTHONPATH": os.pathsep.join([REPO, "/elsewhere"]), "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["own", "shared"])
def test_compare_torch_runs_pytorch_in_its_own_process_or_in_mim_jaxs(tmp_path, where):
    """The default runs PyTorch in a child process, with glibc's default allocator; the child
    measures its own steps (CPU time and faults included) and reports its losses."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "compare.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.torch_compare", "--config", "configs/mae.py:quickstart",
         "--variant", "Ti/4", "--batch", "4", "--steps", "2", "--warmup", "1",
         f"--torch_process={where}", "--json_out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    torch_side = result["torch"]
    assert result["torch_process"] == where
    assert result["allocator_policy"] == allocator.wanted()  # as `python -m` entry points
    assert ("process" in torch_side) == (where == "own")
    if where == "own":  # the child has the user's allocator variables only
        assert torch_side["malloc_env"] == torch_process.allocator_variables(env)
    assert len(torch_side["step_time"]["all_s"]) == 2
    assert torch_side["step_time"]["cpu_median_s"] > 0
    assert np.isfinite(torch_side["final_loss"]) and np.isfinite(result["mim_jax"]["final_loss"])
    assert "torch / mim_jax (median)" in proc.stdout


def test_a_pytorch_process_that_fails_to_build_raises_one_line_and_is_reaped(monkeypatch):
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
