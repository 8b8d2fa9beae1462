"""Job settings and planning, without Ray."""

import pytest

from pipeline.batch.planner import plan
from pipeline.batch.sources import InputUnit
from pipeline.batch.stages import read_blocks
from pipeline.cli import main
from pipeline.config.settings import UpscaleJob
from pipeline.errors import PipelineError

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_yaml_spec_with_flag_overrides():
    job = UpscaleJob.from_yaml(
        REPO / "jobs/nightly-upscale.yaml", source="s3://a/in", dest="s3://a/out", scale=3
    )
    assert (job.scale, job.format, job.max_error_fraction, job.weights) == (3, "both", 0.05, "eugenesiow/pan")


def test_bad_settings_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("scale: 5\n")
    assert main(["upscale", "in", "out", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pan: error: invalid job settings") and "\n" not in err
    with pytest.raises(PipelineError, match="not a mapping"):
        (tmp_path / "list.yaml").write_text("- 1\n")
        UpscaleJob.from_yaml(tmp_path / "list.yaml", source="a", dest="b")


def test_plan_without_a_ledger_adopts_what_is_done_and_reports_name_collisions(tmp_path):
    src, dest = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    for name in ["a.jpg", "a.png", "b.png", "sub/c.webp", ".hidden.png", "notes.txt"]:
        (src / name).write_bytes(b"x")
    (dest / "sub").mkdir(parents=True)
    (dest / "sub/c.png").write_bytes(b"done")  # made before destinations had a ledger
    work = plan(UpscaleJob(source=str(src), dest=str(dest), scale=2))
    assert work.rescan and [u.rel for u in work.todo] == ["a.jpg", "b.png"]
    assert [(c.unit.rel, c.name) for c in work.collisions] == [("a.png", "a.png")] and work.skipped == 1
    assert [(u.rel, sinks) for u, sinks in work.adopted] == [("sub/c.webp", ("png",))]
    # a shard takes every name under its prefix: a second shard or an image there collides
    (src / "s").mkdir()
    for name in ["s.tar", "s.parquet", "s/d.png"]:
        (src / name).write_bytes(b"x")
    work = plan(UpscaleJob(source=str(src), dest=str(dest), scale=2))
    assert [u.rel for u in work.todo] == ["a.jpg", "b.png", "s.parquet"]
    assert [(c.unit.rel, c.name) for c in work.collisions] == [
        ("a.png", "a.png"),
        ("s.tar", "s/"),
        ("s/d.png", "s/d.png"),
    ]
    for name in ["s.tar", "s.parquet", "s/d.png"]:
        (src / name).unlink()
    work = plan(UpscaleJob(source=str(src), dest=str(dest), scale=2, overwrite=True), since="run-now")
    assert work.skipped == 0 and not work.rescan and "sub/c.webp" in [u.rel for u in work.todo]


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    assert (
        main(
            [
                "upscale",
                str(tmp_path / "nope"),
                str(tmp_path / "o"),
                "--scale",
                "2",
                "--weights",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "pan: error: source not found" in capsys.readouterr().err


def test_read_blocks_batch_images_but_feed_every_actor():
    images = [InputUnit(f"/in/{i}.png", f"{i}.png", "image") for i in range(100)]
    assert read_blocks(images, actors=2) == 7  # 16 images per read task
    assert read_blocks(images[:5], actors=2) == 4  # two per actor
    assert read_blocks(images[:1], actors=8) == 1
    shards = [InputUnit(f"/in/{i}.tar", f"{i}.tar", "tar") for i in range(5)]
    assert read_blocks([*shards, *images[:20]], actors=2) == 25  # a shard holds many images


def test_the_modules_ray_tasks_run_import_no_torch():
    """A read, decode, encode or write task (and ``pan prepare``'s tasks) never needs torch: its
    worker starts without importing it (a second and a few hundred MB per worker process). The
    job's settings, which the driver pickles into tasks, are torch-free too."""
    import subprocess
    import sys

    modules = ["pipeline.batch.stages", "pipeline.config.settings", "pipeline.training.prepare"]
    check = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False", run.stdout
