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


def test_orbax_records_are_one_line_and_info_is_dropped():
    import logging as std_logging
    import sys as _sys
    quiet = reporting.QuietLibraries()

    def record(level, path, exc=False):
        exc_info = None
        if exc:
            try:
                raise OSError("No space left on device")
            except OSError:
                exc_info = _sys.exc_info()
        return std_logging.LogRecord("absl", level, path, 1, "save failed: %s", ("x",),
                                     exc_info)

    assert not quiet.filter(record(std_logging.INFO, "/site-packages/orbax/checkpoint/a.py"))
    failed = record(std_logging.ERROR, "/site-packages/orbax/checkpoint/future.py", exc=True)
    assert quiet.filter(failed) and failed.exc_info is None
    assert "\n" not in std_logging.Formatter().format(failed)
    ours = record(std_logging.ERROR, "/mim_jax/train.py", exc=True)
    assert quiet.filter(ours) and ours.exc_info is not None  # our own records are untouched
