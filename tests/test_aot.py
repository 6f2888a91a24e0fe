"""mim_jax.aot: the train step compiled for a TPU topology on this CPU-only machine."""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from mim_jax import aot
from test_main import ROOT, TINY

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); it describes the TPU devices")


def _aot(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "mim_jax.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_compiles_the_fsdp_train_step_for_a_v5e_slice_and_reports_memory():
    run = _aot("--config", "configs/mae.py:quickstart", "--topology", "v5e:2x2",
               "--config.mesh.fsdp=2", *[t for t in TINY if "evaluators" not in t])
    assert run.returncode == 0, run.stderr[-3000:]
    header, row = run.stdout.strip().splitlines()[-2:]
    assert header.startswith("v5e:2x2: 4 x TPU v5 lite, HBM 16.00 GiB per device; mesh data=2 "
                             "fsdp=2 model=1")
    assert "per-chip batch 16 (global 64): arguments" in row
    assert "fits" in row and "GFLOP per step per chip" in row


@needs_libtpu
def test_an_unknown_topology_is_one_line():
    run = _aot("--config", "configs/mae.py:quickstart", "--topology", "v9z:3x3")
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("mim_jax.aot: error")]
    assert len(errors) == 1 and "--topology='v9z:3x3'" in errors[0], run.stderr[-2000:]


def _fake_step(batch: int, seconds: float = 0.0):
    """A compiled step of 10 bytes of arguments and one byte per image."""
    return aot.CompiledStep(per_chip_batch=batch, global_batch=4 * batch, argument_bytes=10,
                            output_bytes=0, alias_bytes=0, temp_bytes=batch,
                            generated_code_bytes=0, flops=None, compile_seconds=seconds)


def _counting_compiler(compiled: list):
    """A stand-in for aot.compile_train_step that appends each batch to `compiled`."""
    def fake_compile(config, devices, batch):
        compiled.append(batch)
        return _fake_step(batch)
    return fake_compile


def test_find_max_batch_follows_the_memory_line_to_the_largest_fitting_batch(monkeypatch):
    """The search itself, with a fake compiler: a step fits while its batch is <= 100."""
    compiled = []
    fake_compile = _counting_compiler(compiled)
    monkeypatch.setattr(aot, "compile_train_step", fake_compile)
    best, step, misfit = aot.find_max_batch(None, None, hbm=110, start=8,
                                            report=lambda line: None)
    # 8 and 16 fit; the line through them predicts 100, approached by at most 4x per step
    # (64, then 100, which fits); 106 (100 + 6%) does not.
    assert compiled == [8, 16, 64, 100, 106]
    assert best == step.per_chip_batch == 100 and misfit == 106

    # Memory that is not linear in the batch: the bracket still closes on the answer.
    compiled.clear()
    quadratic = lambda config, devices, batch: dataclasses.replace(
        fake_compile(config, devices, batch), temp_bytes=batch * batch)
    monkeypatch.setattr(aot, "compile_train_step", quadratic)
    best, _, _ = aot.find_max_batch(None, None, hbm=10 + 50 * 50, start=4,
                                    report=lambda line: None)
    assert 47 <= best <= 50 and len(compiled) <= 12
    assert best == max(b for b in compiled if b <= 50)  # the largest that fitted is kept

    # XLA's TPU compiler rematerialises near the limit: memory flattens, then runs out (out
    # of memory above 300). The search bisects instead of following the flat line.
    compiled.clear()

    def flattening(config, devices, batch):  # memory at 128: 89, at 256: 88
        if batch > 300:
            compiled.append(batch)
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling")
        return dataclasses.replace(fake_compile(config, devices, batch),
                                   temp_bytes=min(batch, 90) - batch // 100)
    monkeypatch.setattr(aot, "compile_train_step", flattening)
    best, _, _ = aot.find_max_batch(None, None, hbm=110, start=128, report=lambda line: None)
    assert 282 <= best <= 300 and len(compiled) <= 8, compiled


def test_a_mixed_batch_is_searched_in_multiples_its_streams_split(monkeypatch):
    """BEiT-3 splits each batch into thirds (images, texts, pairs), each sharded on its own:
    per-chip batches step in multiples of 3, times accum_steps. Its recipe compiles without
    the files its input pipeline reads (SentencePiece model, corpora, tokenizer weights)."""
    import jax
    from conftest import recipe_config
    cpu = jax.devices()
    assert aot.batch_unit(recipe_config("configs/beit3.py:variant=large"), cpu) == 3
    assert aot.batch_unit(recipe_config("configs/beit3.py:quickstart", accum_steps=2), cpu) == 6
    assert aot.batch_unit(recipe_config("configs/mae.py:quickstart"), cpu) == 1
    compiled = []
    fake_compile = _counting_compiler(compiled)
    monkeypatch.setattr(aot, "compile_train_step", fake_compile)
    best, _, misfit = aot.find_max_batch(None, None, hbm=110, start=8, unit=3,
                                         report=lambda line: None)
    assert compiled == [6, 12, 48, 99, 105] and (best, misfit) == (99, 105)


def test_a_batch_xla_refuses_for_the_chips_memory_is_a_does_not_fit_row(monkeypatch):
    """One compile (--per_chip_batch) that XLA refuses is answered in one row with XLA's
    figures, not a traceback; any other compile error still propagates."""
    refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (31.04G)\n exceeds available HBM (15.75G).")

    def refuse(config, devices, batch):
        raise RuntimeError(refusal)
    monkeypatch.setattr(aot, "compile_train_step", refuse)
    row = aot._single_row(None, None, 576, hbm=16 << 30)
    assert row == ("  per-chip batch 576: DOES NOT FIT (XLA: Ran out of memory on HBM, the "
                   "total memory required for HLO temporaries (31.04G) exceeds available HBM "
                   "(15.75G).)")
    assert aot._fits(None, None, 576, 16 << 30) == (False, None)

    def broken(config, devices, batch):
        raise RuntimeError("INTERNAL: something else")
    monkeypatch.setattr(aot, "compile_train_step", broken)
    with pytest.raises(RuntimeError, match="something else"):
        aot._single_row(None, None, 576, hbm=16 << 30)


def test_hbm_table_knows_the_tpu_generations():
    assert aot.hbm_bytes("TPU v5 lite") == 16 << 30
    assert aot.hbm_bytes("TPU v5p") == 95 << 30
    assert aot.hbm_bytes("TPU v4") == 32 << 30
    assert aot.hbm_bytes("NVIDIA H100") is None


def test_a_slope_hint_lets_the_first_compile_aim_at_the_limit(monkeypatch):
    """With bytes_per_image (e.g. from the same model on another chip) the second compile
    goes where that line meets HBM, and a coarser tolerance stops the search sooner."""
    compiled = []
    fake_compile = _counting_compiler(compiled)
    monkeypatch.setattr(aot, "compile_train_step", fake_compile)
    record = []
    best, _, misfit = aot.find_max_batch(None, None, hbm=110, start=40, report=lambda line: None,
                                         tolerance=1 / 8, bytes_per_image=1.0, compiles=record)
    assert compiled == [40, 100, 112] and best == 100 and misfit == 112
    assert record == [(40, 50, 0.0), (100, 110, 0.0), (112, 122, 0.0)]


def test_a_stopped_search_goes_on_from_its_compiles(monkeypatch):
    """Compiles of an earlier, stopped search (given in `compiles`) are not compiled again:
    the next batch is where the line through them meets HBM, and a bracket they already close
    needs no compile at all."""
    compiled = []
    fake_compile = _counting_compiler(compiled)
    monkeypatch.setattr(aot, "compile_train_step", fake_compile)
    record = [(20, 30, 5.0), (40, 50, 5.0)]
    best, step, misfit = aot.find_max_batch(None, None, hbm=110, start=8, tolerance=1 / 8,
                                            report=lambda line: None, compiles=record)
    assert compiled == [100, 112] and (best, misfit) == (100, 112)
    assert step.per_chip_batch == 100 and record[2:] == [(100, 110, 0.0), (112, 122, 0.0)]

    compiled.clear()
    best, step, misfit = aot.find_max_batch(None, None, hbm=110, start=8, tolerance=1 / 8,
                                            report=lambda line: None,
                                            compiles=[(40, 50, 5.0), (100, 110, 5.0),
                                                      (104, None, None)])
    assert compiled == [] and (best, step, misfit) == (100, None, 104)


def test_aot_table_seeds_the_next_chip_and_prints_the_table():
    from mim_jax.benchmark import aot_table
    cell = aot_table.CELLS[0]
    v5e = {"key": cell.key, "chip": "v5e", "fits": 512, "fits_bytes": 15 << 30, "misfit": 576,
           "compiles": [[512, 15 << 30, 200.0], [128, 11 << 30, 100.0], [256, 13 << 30, 100.0],
                        [576, None, None]]}
    start, slope = aot_table._seed(v5e, 32 << 30)
    # The two smallest batches (128, 256) give 16 MiB per image, the largest fit's mean 30:
    # the steeper, so that a flattened line cannot start the search far past the answer.
    assert slope == (15 << 30) / 512
    assert start == int((128 + (21 << 30) / slope) * 0.9) // 8 * 8
    flat = dict(v5e, compiles=[[96, 14 << 30, 1.0], [192, (14 << 30) + (1 << 28), 1.0]],
                fits=192, fits_bytes=(14 << 30) + (1 << 28))
    assert aot_table._seed(flat, 32 << 30)[0] < 2 * 192 * (32 / 14)
    table = aot_table.markdown([v5e])
    assert "| MAE B/16 | none | data 4 | **512** (15.0 GiB, 576 not) |" in table


def test_aot_table_records_each_compile_and_a_rerun_goes_on_from_them(tmp_path, monkeypatch):
    """A search stopped after its first compile (killed) leaves that compile in --out; the
    rerun does not compile it again and writes the cell's row with every compile in it."""
    import json
    from absl import flags
    from mim_jax.benchmark import aot_table
    compiled = []

    def fake_compile(config, devices, batch):
        compiled.append(batch)
        if len(compiled) == 2 and stop_after_first[0]:
            raise KeyboardInterrupt  # the first sitting ends here
        return _fake_step(batch, seconds=1.0)
    monkeypatch.setattr(aot, "compile_train_step", fake_compile)
    monkeypatch.setattr(aot, "topology_devices", lambda topology: None)
    monkeypatch.setattr(aot, "hbm_per_device", lambda devices: 110)
    monkeypatch.setattr(aot, "batch_unit", lambda config, devices: 1)
    monkeypatch.setattr(aot_table, "load_config", lambda cell: None)
    out = tmp_path / "table.jsonl"
    flags.FLAGS(["aot_table", f"--out={out}", "--chips=v5e", "--cells=B/16",
                 "--keys=B/16|none|data", "--tolerance=0.125"])
    stop_after_first = [True]
    try:
        with pytest.raises(KeyboardInterrupt):
            aot_table.main([])
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        key = "MAE B/16|none|data|scan=False"
        assert lines == [{"key": key, "chip": "v5e", "compile": [512, 522, 1.0]}]

        stop_after_first[0] = False
        compiled.clear()
        aot_table.main([])
    finally:
        flags.FLAGS.unparse_flags()
    rows, stopped = aot_table._read(str(out))
    # 512 does not fit in 110: the rerun searches below it from the line through 512 and 256.
    assert compiled == [256, 100, 139, 112]  # 512 is not compiled again
    assert len(rows) == 1 and rows[0]["compiles"][0] == [512, 522, 1.0]
    assert (rows[0]["fits"], rows[0]["misfit"]) == (100, 112)
    assert len(stopped[(key, "v5e")]) == len(rows[0]["compiles"])


def test_aot_table_ignores_a_last_line_cut_short_and_names_a_damaged_one(tmp_path):
    from mim_jax.benchmark import aot_table
    out = tmp_path / "table.jsonl"
    out.write_text('{"key": "k", "chip": "v5e", "compile": [8, 10, 1.0]}\n{"key": "k", "ch')
    assert aot_table._read(str(out)) == ([], {("k", "v5e"): [(8, 10, 1.0)]})
    out.write_text('{"key": "k", "ch\n{"key": "k", "chip": "v5e", "compile": [8, 10, 1.0]}\n')
    with pytest.raises(ValueError, match="table.jsonl:1 is not a JSON line"):
        aot_table._read(str(out))


def test_aot_table_seeds_from_any_chip_searched_before():
    from mim_jax.benchmark import aot_table
    key = aot_table.CELLS[0].key
    v5e, v4 = {"chip": "v5e"}, {"chip": "v4"}
    done = {(key, "v5e"): v5e, (key, "v4"): v4}
    # The chip searched last in this run wins; else any chip of an earlier sitting.
    assert aot_table.seed_row(done, key, "v5p", ["v5e", "v4"]) is v4
    assert aot_table.seed_row(done, key, "v5p", []) is v5e
    assert aot_table.seed_row({(key, "v5p"): v4}, key, "v5p", []) is None  # not itself
    assert aot_table.seed_row(done, "other|key", "v5p", []) is None


def test_a_flat_memory_line_contradicted_by_a_misfit_is_bisected():
    """XLA's own remat near HBM: 104, 120 and 240 per chip all take ~28.8 GiB of 32 (MAE H/14
    on v4), so the line aims far past the answer; after the first misfit the search bisects
    instead of creeping down from the top of the bracket."""
    gib = 1 << 30
    points = [(104, int(28.87 * gib)), (120, int(28.75 * gib)), (240, int(28.81 * gib))]
    assert aot._next_guess(points, 240, None, 32 * gib, 1 / 8) == 960  # 4 x the largest fit
    assert aot._next_guess(points, 240, 960, 32 * gib, 1 / 8) == 600  # not 780


def test_aot_table_selects_rows_by_model_label_and_by_key():
    from mim_jax.benchmark import aot_table
    picked = [c.key for c in aot_table.CELLS
              if aot_table.selected(c, ["H/14"], ["full|fsdp4"])]
    assert picked == ["MAE H/14|full|fsdp4|scan=False"]
    swin = [c for c in aot_table.CELLS if aot_table.selected(c, ["Swin-B"])]
    assert len(swin) == 2 and all("Swin-B" in c.model for c in swin)
    assert all(aot_table.selected(c) for c in aot_table.CELLS)
    assert not any(aot_table.selected(c, [], ["no such key"]) for c in aot_table.CELLS)
