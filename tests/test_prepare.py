"""``pan prepare``: sub-images and their LR made bit-exactly from real photos, official LR paired by
name, bad images as error rows, re-runs that skip what is done and finish what a killed run left,
refusals before any work, and the same job to and from a loopback S3 on a real local Ray."""

import json
import os
import shutil

import boto3
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config.settings import PrepareJob
from pipeline.errors import DestinationError, SettingsError
from pipeline.imaging import decode_image, encode_image, imresize
from pipeline.imaging.codec import DecodedImage
from pipeline.io.pairs import as_rgb8, crop_to_multiple
from pipeline.io.storage import Files
from pipeline.training.prepare import crop_positions, plan_sources, prepare_image, run_prepare
from pipeline.training.prepared import (
    CLAIM_NAME,
    ERRORS_NAME,
    HR_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    lr_name,
    open_prepared,
    shard_file,
)

FILES = Files()  # no storage options: local files and the loopback S3 of the environment


def _pixels(path) -> np.ndarray:
    return as_rgb8(decode_image(path.read_bytes(), name=path.name).pixels)


def _png(pixels: np.ndarray) -> bytes:
    return encode_image(DecodedImage(pixels, None, "RGB", None), "png")


def _shard(dest, shard: str, name: str) -> np.ndarray:
    return np.load(dest / shard_file(shard, name))


@pytest.fixture
def photos(shared_dir, tmp_path):
    """Three BSDS200 photos (481x321 and 321x481 JPEGs), a truncated PNG and one too small."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("100075.jpg", "100080.jpg", "100098.jpg"):
        shutil.copy(shared_dir / "train/BSDS200" / name, folder / name)
    baby = (shared_dir / "benchmarks/Set5/HR/baby.png").read_bytes()
    (folder / "broken.png").write_bytes(baby[: len(baby) // 3])
    (folder / "small.png").write_bytes(_png(_pixels(shared_dir / "benchmarks/Set5/HR/bird.png")[:100, :90]))
    return folder


def test_sub_images_cover_the_image_and_end_flush_with_its_edges():
    positions = crop_positions(321 - 321 % 4, 481 - 481 % 4, 120, 60)
    ys, xs = sorted({y for y, _ in positions}), sorted({x for _, x in positions})
    assert ys == [0, 60, 120, 180, 200] and xs == [0, 60, 120, 180, 240, 300, 360]
    assert len(positions) == len(ys) * len(xs) and positions[:2] == [(0, 0), (0, 60)]
    assert crop_positions(240, 240, 120, 60) == [(y, x) for y in (0, 60, 120) for x in (0, 60, 120)]


@pytest.mark.integration
def test_prepared_lr_is_the_bicubic_of_the_image_cut_to_the_scale_bit_exact(benchmarks_dir, tmp_path):
    """Every scale's LR sub-image is the MATLAB bicubic of the HR image cut to a multiple of that
    scale, sliced at the sub-image's place; HR sub-images are slices of the HR image."""
    job = PrepareJob(sources=str(benchmarks_dir / "Set5/HR"), dest=str(tmp_path), scale=(2, 3, 4),
                     crop_size=96, step=48)  # fmt: skip
    (plan,) = plan_sources(job)
    assert plan.name == "HR" and plan.images == ("baby", "bird", "butterfly", "head", "woman")
    assert plan.lr == {2: "bicubic", 3: "bicubic", 4: "bicubic"} and plan.digest["of"] == "listing"
    index = prepare_image(job, plan, 4)  # woman: 228x344, cut to 228x336 for x2, x3 and x4 at once
    assert (index["height"], index["width"]) == (336, 228) and index["crops"] == len(index["positions"]) == 24
    hr = _pixels(benchmarks_dir / "Set5/HR/woman.png")
    assert np.array_equal(_shard(tmp_path, "HR/woman", HR_NAME),
                          np.stack([hr[y : y + 96, x : x + 96] for y, x in index["positions"]]))  # fmt: skip
    for s in (2, 3, 4):
        lr = imresize(crop_to_multiple(hr, s), 1 / s)
        c = 96 // s
        expected = np.stack([lr[y // s : y // s + c, x // s : x // s + c] for y, x in index["positions"]])
        assert np.array_equal(_shard(tmp_path, "HR/woman", lr_name(s)), expected), s
    assert json.loads((tmp_path / shard_file("HR/woman", INDEX_NAME)).read_text()) == json.loads(
        json.dumps(index)
    )


@pytest.mark.integration
def test_official_lr_sets_are_paired_by_name_with_their_source_and_scale(benchmarks_dir, tmp_path):
    """An LR set named <name>x2 is the x2 LR of the source whose names it holds; the other scales
    are made with bicubic. Inverted official LR images prove which LR was taken."""
    official = tmp_path / "official_x2"
    official.mkdir()
    for path in (benchmarks_dir / "Set5/LR_bicubic/X2").glob("*.png"):
        (official / path.name).write_bytes(_png(255 - _pixels(path)))
    job = PrepareJob(sources=str(benchmarks_dir / "Set5/HR"), dest=str(tmp_path / "set"), scale=(2, 4),
                     lr_data=str(official), crop_size=96, step=48)  # fmt: skip
    (plan,) = plan_sources(job)
    assert plan.lr == {2: str(official), 4: "bicubic"} and set(plan.lr_digests) == {str(official)}
    index = prepare_image(job, plan, 0)
    lr = _pixels(official / "babyx2.png")  # the inverted LR, as the set's x2 LR must be
    expected = np.stack([lr[y // 2 : y // 2 + 48, x // 2 : x // 2 + 48] for y, x in index["positions"]])
    assert np.array_equal(_shard(tmp_path / "set", "HR/baby", lr_name(2)), expected)
    bicubic = imresize(_pixels(benchmarks_dir / "Set5/HR/baby.png"), 1 / 4)
    assert np.array_equal(_shard(tmp_path / "set", "HR/baby", lr_name(4))[0], bicubic[:24, :24])
    with pytest.raises(SettingsError, match="holds x2 LR images, but --scale asks for"):
        plan_sources(job.model_copy(update={"scale": (3,), "crop_size": 96, "step": 48}))
    with pytest.raises(SettingsError, match="not all named <name>x<scale>"):
        plan_sources(job.model_copy(update={"lr_data": (str(benchmarks_dir / "Set14/HR"),)}))


def test_what_a_user_can_get_wrong_is_refused_before_any_work(benchmarks_dir, tmp_path):
    set5 = str(benchmarks_dir / "Set5/HR")
    with pytest.raises(DestinationError, match="overlap"):
        run_prepare(PrepareJob(sources=str(benchmarks_dir / "Set5"), dest=set5 + "/out", scale=2))
    with pytest.raises(SettingsError, match="both named HR"):
        run_prepare(PrepareJob(sources=(set5, str(benchmarks_dir / "Set14/HR")), dest=str(tmp_path), scale=2))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="holds files pan prepare did not write"):
        run_prepare(PrepareJob(sources=set5, dest=str(tmp_path), scale=2, crop_size=96, step=48))
    with pytest.raises(ValueError, match="350 is not a multiple of 12"):
        PrepareJob(sources=set5, dest=str(tmp_path), scale=(3, 4), crop_size=350)
    assert not (tmp_path / CLAIM_NAME).exists()


@pytest.mark.integration
@pytest.mark.slow
def test_prepare_writes_the_set_and_errors_then_runs_again_skip_and_finish(
    local_ray, photos, tmp_path, capsys
):
    dest = tmp_path / "set"
    argv = [
        "prepare",
        str(photos),
        str(dest),
        "--scale",
        "2",
        "--scale",
        "4",
        "--crop-size",
        "120",
        "--step",
        "60",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "5 images: 3 written, 2 failed, 0 skipped" in out and "35 sub-images" not in out
    assert "105 sub-images of 120 px at x2, x4 in 3 shards" in out and f"{dest}/{ERRORS_NAME}" in err
    errors = {e["image"]: e for e in map(json.loads, (dest / ERRORS_NAME).read_text().splitlines())}
    assert errors["broken"]["error_type"] == "TruncatedImageError"
    assert (
        errors["small"]["error_type"] == "ImageTooSmallError"
        and "--crop-size 88 or less" in errors["small"]["message"]
    )
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest["scales"] == [2, 4] and (manifest["crop_size"], manifest["step"]) == (120, 60)
    assert manifest["package_version"] and manifest["sources"][0]["digest"]["of"] == "listing"
    stored = sum(sum(s["bytes"].values()) for s in manifest["shards"])
    assert manifest["counts"] == {"images": 5, "shards": 3, "failed": 2, "sub_images": 105, "bytes": stored}
    assert [s["name"] for s in manifest["shards"]] == ["photos/100075", "photos/100080", "photos/100098"]
    assert _shard(dest, "photos/100080", HR_NAME).shape == (35, 120, 120, 3)
    assert _shard(dest, "photos/100080", lr_name(4)).shape == (35, 30, 30, 3)
    written = {p: p.stat().st_mtime_ns for p in (dest / "shards").rglob("*.npy")}

    # Again, from a spec file: nothing is written again; the bad images are tried again.
    spec = tmp_path / "prepare.yaml"
    spec.write_text(
        f"kind: prepare\nsources: [{photos}]\ndest: {dest}\nscale: [2, 4]\ncrop_size: 120\nstep: 60\n"
    )
    assert main(["run", str(spec)]) == 0
    assert "5 images: 0 written, 2 failed, 3 skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (dest / "shards").rglob("*.npy")} == written
    assert json.loads((dest / MANIFEST_NAME).read_text())["shards"] == manifest["shards"]

    # A run killed before a shard's index was written: the next one writes that shard alone.
    (dest / shard_file("photos/100098", INDEX_NAME)).unlink()
    (dest / MANIFEST_NAME).unlink()
    with pytest.raises(Exception, match="has not finished"):
        open_prepared(str(dest), FILES)
    assert main(argv) == 0
    assert "5 images: 1 written, 2 failed, 2 skipped" in capsys.readouterr().out
    assert json.loads((dest / MANIFEST_NAME).read_text())["shards"] == manifest["shards"]

    # Other settings would mix two kinds of sub-images: refused, naming the recorded ones.
    assert main([*argv[:-4], "--crop-size", "96", "--step", "48"]) == 2
    assert "was prepared with crop_size 120, step 60" in capsys.readouterr().err
    (photos / "100075.jpg").unlink()  # a source that changed since
    assert main(argv) == 2
    assert "changed since" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_prepare_from_and_to_s3_and_read_a_share_through_a_node_copy(
    local_ray, s3_server, shared_dir, tmp_path, monkeypatch
):
    s3 = boto3.client("s3")
    for bucket in ("raw", "sets"):
        s3.create_bucket(Bucket=bucket)
    for name in ("100075.jpg", "100080.jpg"):
        s3.put_object(
            Bucket="raw", Key=f"photos/{name}", Body=(shared_dir / "train/BSDS200" / name).read_bytes()
        )
    job = PrepareJob(sources="s3://raw/photos", dest="s3://sets/bsds", scale=(2, 4), crop_size=120, step=60)
    summary = run_prepare(job)
    assert (summary.inputs, summary.written, summary.failed, summary.sub_images) == (2, 2, 0, 70)
    listed = FILES.list_files("s3://sets/bsds")
    assert {MANIFEST_NAME, CLAIM_NAME, ERRORS_NAME, shard_file("photos/100075", lr_name(4))} <= set(listed)
    assert run_prepare(job).skipped == 2

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the node's copies go here
    prepared = open_prepared("s3://sets/bsds", FILES)
    (share,) = prepared.shares(1)
    lr, hr = prepared.sampler(share, 4, FILES, seed=(0, 0, 0)).batch(4, 30)
    assert lr.shape == (4, 3, 30, 30) and hr.shape == (4, 3, 120, 120)
    copies = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npy"))
    assert len(copies) == 4 and all("/x2.npy" not in c for c in copies)  # the x4 run's files only
    local = np.load(tmp_path / copies[0])
    assert local.shape[1:] in ((120, 120, 3), (30, 30, 3))
    os.utime(tmp_path / copies[0], (0, 0))  # a complete copy is mapped again, not copied again
    prepared.sampler(share, 4, FILES, seed=(0, 0, 0))
    assert (tmp_path / copies[0]).stat().st_mtime == 0
