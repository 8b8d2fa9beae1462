import io

from pipeline.cli.progress import JobProgress


def test_status_line_counts_rate_and_time_left(monkeypatch):
    clock = iter([100.0, 100.0, 110.0, 110.0])
    monkeypatch.setattr("pipeline.cli.progress.time.monotonic", lambda: next(clock))
    progress = JobProgress("upscaling", stream=io.StringIO(), live=False)
    # 10 inputs skipped at the start, then 5 done in 10 s: 25 left at that rate is 50 s
    assert (
        progress.describe({"succeeded": 0, "failed": 0, "skipped": 10}, 0, 40) == "10/40 inputs (10 skipped)"
    )
    line = progress.describe({"succeeded": 4, "failed": 1, "skipped": 10}, 20_000_000, 40)
    assert line == "15/40 inputs (4 succeeded, 1 failed, 10 skipped) · 2.00 MP/s · 0:50 left"


def test_unknown_total_has_no_time_left():
    progress = JobProgress("upscaling", stream=io.StringIO(), live=False)
    assert progress.describe({"succeeded": 3}, 0, None) == "3 inputs (3 succeeded)"


def test_without_a_terminal_a_line_every_interval_and_one_at_the_end():
    stream = io.StringIO()
    with JobProgress("upscaling", stream=stream, live=False, interval=0) as progress:
        progress.update({"succeeded": 1}, 0, 2)
        progress.update({"succeeded": 2}, 0, 2)
    lines = stream.getvalue().splitlines()
    assert lines == ["upscaling: 1/2 inputs (1 succeeded)", "upscaling: 2/2 inputs (2 succeeded)"]
    quiet = io.StringIO()
    with JobProgress("upscaling", stream=quiet, live=False, interval=3600) as progress:
        progress.update({"succeeded": 1}, 0, 2)
        progress.update({"succeeded": 2}, 0, 2)
    assert quiet.getvalue().splitlines() == ["upscaling: 2/2 inputs (2 succeeded)"]  # the last one only
