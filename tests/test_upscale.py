"""The batch job end to end on a real local Ray, local folders and a loopback S3 server."""

import hashlib
import io
import json
import shutil
import tarfile

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import pipeline
from pipeline.batch.job import run_upscale
from pipeline.cli import main
from pipeline.config.settings import UpscaleJob
from pipeline.errors import DestinationError
from pipeline.imaging import decode_image
from pipeline.io.storage import Files
from pipeline.ray_runtime.pool import ActorPool, actor_pool

FILES = Files()  # no storage options: local files and the loopback S3 of the environment

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BAD = {"empty.png", "notes.jpg", "sub/truncated.png"}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_inputs(benchmarks_dir, tmp_path_factory):
    """Set14 X4 LR plus a subfolder, with bad, grayscale, RGBA and 16-bit files mixed in."""
    root = tmp_path_factory.mktemp("inputs")
    lr = benchmarks_dir / "Set14/LR_bicubic/X4"
    for p in sorted(lr.glob("*.png"))[:6]:
        shutil.copy(p, root / p.name)
    (root / "sub").mkdir()
    comic = Image.open(lr / "comicx4.png").convert("RGB")
    comic.convert("L").save(root / "sub/gray.png")
    rgba = comic.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(comic.size))
    rgba.save(root / "sub/alpha.png")
    deep = np.asarray(comic.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(root / "sub/deep16.png")
    comic.save(root / "sub/comic.jpg", quality=92)
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image")
    (root / "sub/truncated.png").write_bytes((lr / "zebrax4.png").read_bytes()[:2000])
    return root


def _expected_pngs(root) -> set[str]:
    return {
        p.relative_to(root).with_suffix(".png").as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in BAD
    }


def _errors(dest) -> dict[str, str]:
    table = pq.read_table(f"{dest}/_errors")
    return dict(zip(table.column("key").to_pylist(), table.column("error_type").to_pylist(), strict=True))


def test_local_end_to_end_then_resume_skips_all(local_ray, mixed_inputs, weights_dir, tmp_path, capsys):
    dest = tmp_path / "out"
    weights = str(weights_dir / "PANx4_DF2K.pth")
    # fp32 (not the default auto): the outputs are compared with single-image ones below
    fp32 = ["--weights", weights, "--precision", "fp32"]
    assert main(["upscale", str(mixed_inputs), str(dest), "--scale", "4", *fp32]) == 0
    written = {f for f in FILES.list_files(str(dest)) if not f.startswith("_")}
    assert written == _expected_pngs(mixed_inputs)
    # each output equals what `pan upscale-image` writes for that file
    for name in ["sub/gray.png", "sub/alpha.png", "sub/deep16.png", "sub/comic.png", "baboonx4.png"]:
        src = next(mixed_inputs.glob(f"{name[:-4]}.*"))
        single = tmp_path / "single.png"
        assert main(["upscale-image", str(src), str(single), "--scale", "4", *fp32]) == 0
        ours, theirs = decode_image((dest / name).read_bytes()), decode_image(single.read_bytes())
        # Same pipeline of code; torch's thread count differs between a Ray actor and the CLI, which
        # can flip a rounding: pixels agree within one level, everything else exactly.
        assert ours.pixels.shape == theirs.pixels.shape and ours.pixels.dtype == theirs.pixels.dtype, name
        assert np.abs(ours.pixels.astype(int) - theirs.pixels).max() <= 1, name
        assert (ours.alpha is None) == (theirs.alpha is None), name
    with Image.open(dest / "sub/gray.png") as im:
        assert im.mode == "L"
    with Image.open(dest / "sub/alpha.png") as im:
        assert im.mode == "RGBA" and im.size == (62 * 4, 90 * 4)
    assert decode_image((dest / "sub/deep16.png").read_bytes()).pixels.dtype == np.uint16
    assert set(_errors(dest)) == BAD
    assert _errors(dest)["sub/truncated.png"] == "TruncatedImageError"
    summary = json.loads((dest / "_summary.json").read_text())
    assert summary["succeeded"] == len(_expected_pngs(mixed_inputs)) and summary["failed"] == 3
    assert summary["inputs"] == summary["succeeded"] + summary["failed"] + summary["skipped"]
    assert summary["output_megapixels"] == pytest.approx(16 * summary["input_megapixels"])
    assert summary["precision"] == {"fp32": summary["succeeded"]}
    assert f"MP/s, {summary['succeeded']} in fp32) -> {dest}" in capsys.readouterr().out

    again = run_upscale(UpscaleJob(source=str(mixed_inputs), dest=str(dest), scale=4, weights=weights))
    assert again.skipped == summary["succeeded"] and again.succeeded == 0 and again.failed == 3
    assert again.inputs == summary["inputs"]


def test_max_error_fraction_fails_the_run(local_ray, mixed_inputs, weights_dir, tmp_path, capsys):
    argv = ["upscale", str(mixed_inputs), str(tmp_path / "o"), "--scale", "4", "--max-error-fraction", "0.1"]
    assert main([*argv, "--weights", str(weights_dir / "PANx4_DF2K.pth")]) == 2
    assert "inputs failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "o/_summary.json").read_text())["failed"] == 3


def test_s3_to_s3(local_ray, s3_server, benchmarks_dir, weights_dir):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="photos")
    lr = sorted((benchmarks_dir / "Set5/LR_bicubic/X4").glob("*.png"))
    for p in lr:
        s3.put_object(Bucket="photos", Key=f"in/nested/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket="photos", Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n broken")
    job = UpscaleJob(
        source="s3://photos/in", dest="s3://photos/out", scale=4, weights=str(weights_dir / "PANx4_DF2K.pth")
    )
    summary = run_upscale(job)
    assert (summary.succeeded, summary.failed) == (5, 1)
    # precision auto (the default): each actor's choice, counted per output
    assert sum(summary.precision.values()) == 5 and set(summary.precision) <= {"fp32", "bf16"}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="photos", Prefix="out/")["Contents"]}
    assert {f"out/nested/{p.name}" for p in lr} <= keys and "out/_summary.json" in keys
    body = s3.get_object(Bucket="photos", Key="out/nested/birdx4.png")["Body"].read()
    assert decode_image(body).pixels.shape == (288, 288, 3)
    assert run_upscale(job).skipped == 5


def test_parquet_and_tar_shards_to_parquet_sink(local_ray, benchmarks_dir, weights_dir, tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    lr = sorted((benchmarks_dir / "Set5/LR_bicubic/X2").glob("*.png"))
    pq.write_table(
        pa.table({"key": [p.stem for p in lr[:3]], "image": [p.read_bytes() for p in lr[:3]]}),
        src / "a.parquet",
    )
    with tarfile.open(src / "b.tar", "w") as tar:
        for p in lr[3:]:
            tar.add(p, arcname=f"{p.stem}.png")
            info = tarfile.TarInfo(f"{p.stem}.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    dest = tmp_path / "out"
    job = UpscaleJob(
        source=str(src),
        dest=str(dest),
        scale=2,
        weights=str(weights_dir / "PANx2_DF2K.pth"),
        format="parquet",
    )
    summary = run_upscale(job)
    assert (summary.succeeded, summary.failed) == (5, 0)
    table = pq.read_table(dest / "parquet")
    assert sorted(table.column("name").to_pylist()) == sorted(
        [f"a/{p.stem}.png" for p in lr[:3]] + [f"b/{p.stem}.png" for p in lr[3:]]
    )
    for row in table.to_pylist():
        image = decode_image(row["png"])
        assert (image.width, image.height) == (row["output_width"], row["output_height"])
        assert (row["output_width"], row["output_height"]) == (
            2 * row["input_width"],
            2 * row["input_height"],
        )
        assert row["weights_id"] == "PANx2_DF2K" and len(row["weights_sha256"]) == 64 and row["scale"] == 2
    assert run_upscale(job).skipped == 5  # shard members are resumed too


def test_cpu_cluster_gets_one_single_threaded_model_actor_per_cpu(local_ray):
    job = UpscaleJob(source="in", dest="out", scale=2)
    # on 2 CPUs the actors reserve none: both stay free for a read and an encode task
    two = ActorPool(size=2, num_gpus=0, num_cpus=0.0, calls=1, threads=1)
    assert actor_pool(job.actors, job.actor_cpus, 100) == two
    # fewer actors than CPUs (asked for, or one input): each computes on its share of the cores
    one = ActorPool(size=1, num_gpus=0, num_cpus=0.0, calls=1, threads=2)
    assert actor_pool(job.actors, job.actor_cpus, 1) == one
    assert actor_pool(1, job.actor_cpus, 100) == one


# ---------------------------------------------------------------------------------------------
# Data safety: one output per input in each sink, whatever the sequence of runs; inputs untouched.


def _checksums(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def five(benchmarks_dir, tmp_path):
    """Set5 X4 LR in two folders plus one corrupt file: 6 inputs, 5 good."""
    root = tmp_path / "five"
    for i, p in enumerate(sorted((benchmarks_dir / "Set5/LR_bicubic/X4").glob("*.png"))):
        (root / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / f"d{i % 2}" / p.name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def _parquet_names(dest) -> list[str]:
    if not (dest / "parquet").exists():
        return []
    return pq.read_table(dest / "parquet", columns=["name"]).column("name").to_pylist()


def test_every_sequence_of_sinks_leaves_one_output_per_input(local_ray, five, weights_dir, tmp_path):
    weights, dest = str(weights_dir / "PANx4_DF2K.pth"), tmp_path / "out"
    good = sorted(p.relative_to(five).as_posix() for p in five.rglob("*.png") if p.name != "broken.png")
    before = _checksums(five)
    # (format, expected succeeded): an input counts as skipped only when every sink holds it
    for fmt, succeeded in [("parquet", 5), ("both", 5), ("png", 0), ("both", 0), ("parquet", 0)]:
        summary = run_upscale(  # the broken input is tried each time (max_attempts: tests/test_ledger.py)
            UpscaleJob(source=str(five), dest=str(dest), scale=4, weights=weights, format=fmt, max_attempts=9)
        )
        assert (summary.succeeded, summary.failed, summary.skipped) == (
            succeeded,
            1,
            5 - succeeded,
        ), fmt
        names = _parquet_names(dest)
        assert sorted(names) == good, fmt  # every image once in Parquet, never twice
        pngs = sorted(
            f for f in FILES.list_files(str(dest)) if f.endswith(".png") and not f.startswith("parquet/")
        )
        assert pngs == (good if fmt != "parquet" or summary.skipped else []), fmt
    assert _checksums(five) == before


def test_outputs_deleted_by_hand_are_made_again_by_a_rescan(local_ray, five, weights_dir, tmp_path):
    weights, dest = str(weights_dir / "PANx4_DF2K.pth"), tmp_path / "out"
    job = UpscaleJob(source=str(five), dest=str(dest), scale=4, weights=weights, format="both")
    run_upscale(job)
    (dest / "d0/babyx4.png").unlink()
    rows = len(_parquet_names(dest))
    assert run_upscale(job).skipped == 5  # the ledger says it is done: no output is listed
    summary = run_upscale(job.model_copy(update={"rescan_dest": True}))
    assert (summary.succeeded, summary.skipped) == (1, 4)
    # finished in the sink that lacked it only: its Parquet row was there
    assert (dest / "d0/babyx4.png").exists() and len(_parquet_names(dest)) == rows


def test_dest_inside_source_only_when_asked_and_never_read_back(local_ray, five, weights_dir):
    weights = str(weights_dir / "PANx4_DF2K.pth")
    job = UpscaleJob(source=str(five), dest=str(five / "x4"), scale=4, weights=weights)
    with pytest.raises(DestinationError, match="--dest-inside-source"):
        run_upscale(job)
    assert not (five / "x4").exists()
    job = job.model_copy(update={"dest_inside_source": True})
    first = run_upscale(job)
    second = run_upscale(job)
    assert (first.succeeded, first.inputs) == (5, 6)
    assert (second.succeeded, second.skipped, second.inputs) == (0, 5, 6)  # no upscales of upscales
    assert not any(p.name.startswith("x4") for p in (five / "x4").iterdir() if p.is_dir())


def test_dest_made_with_other_weights_is_refused_unless_overwrite(local_ray, five, weights_dir, tmp_path):
    official = weights_dir / "PANx2_DF2K.pth"
    tuned = tmp_path / "tuned_x2.pth"  # same architecture, other numbers: another sha256
    state = torch.load(official, weights_only=True)
    state["conv_last.bias"] = state["conv_last.bias"] + 0.01
    torch.save(state, tuned)
    dest = tmp_path / "out"
    job = UpscaleJob(source=str(five), dest=str(dest), scale=2, weights=str(official))
    assert run_upscale(job).succeeded == 5
    made = _checksums(dest)
    other = job.model_copy(update={"weights": str(tuned)})
    with pytest.raises(DestinationError, match=r"PANx2_DF2K.*tuned_x2\.pth.*--overwrite"):
        run_upscale(other)
    with pytest.raises(DestinationError, match=r"x2 with weights PANx2_DF2K.*this run is x3"):
        run_upscale(
            UpscaleJob(source=str(five), dest=str(dest), scale=3, weights=str(weights_dir / "PANx3_DF2K.pth"))
        )
    assert _checksums(dest) == made

    # An --overwrite that is killed half-way leaves a record that says so: only --overwrite goes on.
    record = json.loads((dest / "_pan.json").read_text())
    replacing = {**record, "weights_id": str(tuned), "replacing": {"scale": 2, "weights_id": "PANx2_DF2K"}}
    (dest / "_pan.json").write_text(json.dumps(replacing))
    with pytest.raises(DestinationError, match="did not finish"):
        run_upscale(other)
    summary = run_upscale(other.model_copy(update={"overwrite": True}))
    assert summary.succeeded == 5 and summary.skipped == 0
    record = json.loads((dest / "_pan.json").read_text())
    assert record["weights_id"] == str(tuned) and record["replacing"] is None
    assert run_upscale(other).skipped == 5


def test_a_destination_keeps_the_precision_of_its_first_outputs(local_ray, five, weights_dir, tmp_path):
    """Later runs with precision auto make their outputs as the first run did; --overwrite, which
    redoes them all, decides again."""
    from pipeline.core.engine import auto_precision

    auto = auto_precision(torch.device("cpu"))[0]
    first = "fp32" if auto == "bf16" else "bf16"  # what auto would not choose here
    dest = tmp_path / "out"
    job = UpscaleJob(source=str(five), dest=str(dest), scale=4, weights=str(weights_dir / "PANx4_DF2K.pth"))
    assert run_upscale(job.model_copy(update={"precision": first})).precision == {first: 5}
    assert json.loads((dest / "_pan.json").read_text())["precision"] == first
    shutil.copy(five / "d0/babyx4.png", five / "d0/baby_again.png")
    assert run_upscale(job).precision == {first: 1}
    assert run_upscale(job.model_copy(update={"overwrite": True})).precision == {auto: 6}
    assert json.loads((dest / "_pan.json").read_text())["precision"] == auto


def test_files_pan_did_not_write_are_never_replaced(local_ray, five, weights_dir, tmp_path):
    dest = tmp_path / "theirs"
    (dest / "d0").mkdir(parents=True)
    (dest / "d0/babyx4.png").write_bytes(b"the user's own picture")
    (dest / ".DS_Store").write_bytes(b"hidden files do not count")
    job = UpscaleJob(source=str(five), dest=str(dest), scale=4, weights=str(weights_dir / "PANx4_DF2K.pth"))
    for attempt in (job, job.model_copy(update={"overwrite": True})):
        with pytest.raises(DestinationError, match="files that pan did not write"):
            run_upscale(attempt)
    assert (dest / "d0/babyx4.png").read_bytes() == b"the user's own picture"
    assert not (dest / "_pan.json").exists()
    (dest / "d0/babyx4.png").unlink()
    assert run_upscale(job).succeeded == 5  # an empty folder (hidden files aside) is fine


def test_a_later_input_never_replaces_an_earlier_inputs_output(
    local_ray, benchmarks_dir, weights_dir, tmp_path
):
    """The issue's reproduction: x.png is upscaled, then x.jpg (same output name) arrives."""
    src, dest = tmp_path / "col", tmp_path / "out"
    src.mkdir()
    shutil.copy(benchmarks_dir / "Set5/LR_bicubic/X4/birdx4.png", src / "x.png")
    job = UpscaleJob(source=str(src), dest=str(dest), scale=2, weights=str(weights_dir / "PANx2_DF2K.pth"))
    job = job.model_copy(update={"format": "both"})
    assert run_upscale(job).succeeded == 1
    made = (dest / "x.png").read_bytes()
    Image.open(benchmarks_dir / "Set5/LR_bicubic/X4/headx4.png").save(src / "x.jpg")
    summary = run_upscale(job)
    assert (summary.inputs, summary.succeeded, summary.failed, summary.skipped) == (2, 0, 1, 1)
    assert (dest / "x.png").read_bytes() == made  # the owner's output keeps its bytes, in both sinks
    assert _parquet_names(dest) == ["x.png"]
    assert pq.read_table(dest / "parquet").column("png").to_pylist() == [made]
    errors = pq.read_table(dest / "_errors").to_pylist()
    assert [(e["key"], e["error_type"]) for e in errors] == [("x.jpg", "OutputNameCollision")]
    assert "x.jpg: its output name x.png is taken by the input x.png" in errors[0]["message"]
    (src / "x.png").unlink()  # the owner leaves the source: its output stays its own
    assert run_upscale(job).failed == 1 and (dest / "x.png").read_bytes() == made


def test_underscore_names_are_upscaled_and_hidden_files_counted(
    local_ray, benchmarks_dir, weights_dir, tmp_path, capsys
):
    src, dest = tmp_path / "src", tmp_path / "out"
    (src / "_2024").mkdir(parents=True)
    lr = benchmarks_dir / "Set5/LR_bicubic/X4"
    for name, image in [("_DSC0001.png", "birdx4"), ("_2024/head.png", "headx4"), ("DSC0002.png", "babyx4"),
                        (".hidden.png", "womanx4")]:  # fmt: skip
        shutil.copy(lr / f"{image}.png", src / name)
    (src / "notes.txt").write_text("not an image")
    argv = ["upscale", str(src), str(dest), "--scale", "4", "--weights", str(weights_dir / "PANx4_DF2K.pth")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "3 inputs: 3 succeeded" in out
    assert "not inputs: 1 file(s) hidden (a name starting with '.'): .hidden.png" in err
    assert "not inputs: 1 file(s) not an image, .parquet or .tar shard (by extension): notes.txt" in err
    assert {"_DSC0001.png", "_2024/head.png", "DSC0002.png"} <= set(FILES.list_files(str(dest)))
    assert json.loads((dest / "_summary.json").read_text())["ignored"] == {"hidden": 1, "other": 1}


def test_outputs_inconsistent_with_their_inputs_are_flagged_suspect_but_kept(
    local_ray, benchmarks_dir, weights_dir, tmp_path
):
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((benchmarks_dir / "Set5/LR_bicubic/X2").glob("*.png"))[:2]:
        shutil.copy(p, src / p.name)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (src / "noise.png").write_bytes(_png(Image.fromarray(noise)))
    dest = tmp_path / "out"
    job = UpscaleJob(source=str(src), dest=str(dest), scale=2, weights=str(weights_dir / "PANx2_DF2K.pth"),
                     format="both", device="cpu", actors=1)  # fmt: skip
    summary = run_upscale(job)
    assert (summary.succeeded, summary.failed, summary.suspect) == (3, 0, 1)
    assert _errors(dest) == {"noise.png": "Suspect"} and (dest / "noise.png").exists()
    table = pq.read_table(dest / "parquet", columns=["key", "psnr_vs_input", "pattern_levels"]).to_pylist()
    scores = {row["key"]: (row["psnr_vs_input"], row["pattern_levels"]) for row in table}
    photos = [v for k, v in scores.items() if k != "noise.png"]
    assert scores["noise.png"][0] < 24 < min(psnr for psnr, _ in photos)
    assert max(levels for _, levels in photos) < 20 < scores["noise.png"][1]
    assert "averages back to its input" in pq.read_table(dest / "_errors").column("message")[0].as_py()
    # Lineage: which bytes, weights, code and run made each output (and each flagged one).
    columns = ["key", "input_sha256", "weights_sha256", "package_version", "run_id"]
    for row in pq.read_table(dest / "parquet", columns=columns).to_pylist():
        assert row["input_sha256"] == hashlib.sha256((src / row["key"]).read_bytes()).hexdigest()
        assert (
            row["weights_sha256"] == hashlib.sha256((weights_dir / "PANx2_DF2K.pth").read_bytes()).hexdigest()
        )
        assert (row["package_version"], row["run_id"]) == (pipeline.__version__, summary.run_id)
    (flagged,) = pq.read_table(dest / "_errors").to_pylist()
    assert (
        flagged["run_id"] == summary.run_id
        and flagged["input_sha256"] == hashlib.sha256((src / "noise.png").read_bytes()).hexdigest()
    )
    # The gate off: nothing measured, nothing flagged.
    off = job.model_copy(
        update={"dest": str(tmp_path / "off"), "min_psnr_vs_input": None, "max_pattern_levels": None}
    )
    off = run_upscale(off)
    assert off.suspect == 0 and not (tmp_path / "off/_errors").exists()
