import json

from mim_jax import reporting


def test_progress_images_per_sec_mfu_and_eta(monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
    p = reporting.Progress(total_steps=1000, start_step=0, global_batch_size=64,
                           flops_per_image=1e9, peak_flops=1e12)
    p.start(100)
    stats = p.report(200)  # 100 steps in 10 s
    assert stats["steps_per_sec"] == 10.0
    assert stats["images_per_sec"] == 640.0
    assert stats["mfu"] == 640.0 * 1e9 / 1e12
    assert stats["eta_seconds"] == 80.0
    line = p.line(200, stats, 0.25)
    assert line == "step 200/1000 (20.0%) loss 0.2500, 640.0 img/s, MFU 64.0%, ETA 1m20s"


def test_no_mfu_without_a_known_peak(monkeypatch):
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
    p = reporting.Progress(10, 0, 8, flops_per_image=1e9, peak_flops=None)
    p.start(1)
    stats = p.report(2)
    assert "mfu" not in stats and "MFU" not in p.line(2, stats, 1.0)


def test_jsonl_writer_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    for step in (1, 2):
        w = reporting.JsonlWriter(str(path))
        w.write_scalars(step, {"loss": 0.5 / step})
        w.close()
    assert [json.loads(line) for line in open(path)] == [{"step": 1, "loss": 0.5},
                                                        {"step": 2, "loss": 0.25}]
