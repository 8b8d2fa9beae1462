import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.engine import Upscaler
from pipeline.imaging import decode_image
from pipeline.weights import load_pretrained

PAN_BIN = str(Path(sys.executable).with_name("pan"))


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pan: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.integration
def test_upscale_image_matches_the_engine(weights_dir, benchmarks_dir, tmp_path):
    src = benchmarks_dir / "Set14/LR_bicubic/X4/comicx4.png"
    out = tmp_path / "out" / "comic.png"
    weights = str(weights_dir / "PANx4_DF2K.pth")
    run = subprocess.run(
        [PAN_BIN, "upscale-image", str(src), str(out), "--scale", "4", "--weights", weights, "--tile", "48"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    result = decode_image(out.read_bytes())
    expected = Upscaler(load_pretrained(weights, scale=4), device="cpu", tile=0).upscale(
        decode_image(src.read_bytes()).pixels
    )
    assert result.pixels.shape == (360, 248, 3)
    assert np.abs(result.pixels.astype(int) - expected).max() <= 1


@pytest.mark.integration
def test_grayscale_stays_grayscale(weights_dir, benchmarks_dir, tmp_path):
    out = tmp_path / "bridge.png"
    src = benchmarks_dir / "Set14/LR_bicubic/X2/bridgex2.png"
    assert (
        main(
            [
                "upscale-image",
                str(src),
                str(out),
                "--scale",
                "2",
                "--weights",
                str(weights_dir / "PANx2_DF2K.pth"),
            ]
        )
        == 0
    )
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (512, 512)


@pytest.mark.integration
def test_compare_picture_with_hr(weights_dir, benchmarks_dir, tmp_path):
    out = tmp_path / "cmp.png"
    argv = ["compare", str(benchmarks_dir / "Set5/LR_bicubic/X2/birdx2.png"), str(out), "--scale", "2"]
    argv += [
        "--hr",
        str(benchmarks_dir / "Set5/HR/bird.png"),
        "--weights",
        str(weights_dir / "PANx2_DF2K.pth"),
    ]
    assert main(argv) == 0
    with Image.open(out) as im:
        assert im.width > 3 * 288 and im.height > 288  # three panels and a label strip


@pytest.mark.integration
def test_eval_writes_the_report(weights_dir, benchmarks_dir, tmp_path, capsys):
    report = tmp_path / "r.json"
    argv = ["eval", "--data", str(benchmarks_dir / "Set5"), "--scale", "4"]
    argv += [
        "--weights",
        str(weights_dir / "PANx4_DF2K.pth"),
        "--report",
        str(report),
        "--compare-dir",
        str(tmp_path / "cmp"),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert (
        "|Dataset|Scale|Bicubic|pan|" in table and "|Set5|4x|28.43/" in table and "**32.13/0.8948**" in table
    )
    data = json.loads(report.read_text())
    assert set(data) >= {"dataset", "scale", "psnr_y", "ssim_y", "bicubic", "images"}
    assert data["dataset"] == "Set5" and data["scale"] == 4 and abs(data["psnr_y"] - 32.1311) < 0.005
    assert set(data["images"][0]) >= {"name", "psnr_y", "ssim_y"}
    assert len(list((tmp_path / "cmp/Set5/x4").glob("*.png"))) == 5


@pytest.mark.integration
@pytest.mark.slow
def test_eval_several_sets_and_scales(weights_dir, benchmarks_dir, tmp_path, capsys):
    report = tmp_path / "all.json"
    argv = ["eval", "--data", str(benchmarks_dir / "Set5"), "--data", str(benchmarks_dir / "Set14")]
    argv += ["--scale", "2", "--scale", "4", "--weights", str(weights_dir / "PANx{scale}_DF2K.pth")]
    assert main([*argv, "--report", str(report)]) == 0
    table = capsys.readouterr().out
    assert "|Set5|2x|33.67/" in table and "|Set14|4x|26.09/" in table
    data = json.loads(report.read_text())
    expected = [("Set5", 2), ("Set5", 4), ("Set14", 2), ("Set14", 4)]
    assert [(r["dataset"], r["scale"]) for r in data] == expected
    assert abs(data[2]["psnr_y"] - 33.5927) < 0.005


def test_user_errors_are_one_line(capsys, tmp_path, weights_dir):
    (tmp_path / "notes.txt").write_text("hello")
    assert "No such file" in _one_error_line(
        capsys, ["upscale-image", str(tmp_path / "none.png"), "o.png", "--scale", "2"]
    )
    err = _one_error_line(capsys, ["upscale-image", str(tmp_path / "notes.txt"), "o.png", "--scale", "2"])
    assert "notes.txt" in err
    assert ".png, .jpg or .webp" in _one_error_line(
        capsys, ["upscale-image", "a.png", "out.gif", "--scale", "2"]
    )
    w = str(weights_dir / "PANx4_DF2K.pth")
    assert "x4 weights but scale 2" in _one_error_line(
        capsys, ["eval", "--data", str(tmp_path), "--scale", "2", "--weights", w]
    )
    assert "no weights at" in _one_error_line(
        capsys, ["eval", "--data", str(tmp_path), "--scale", "2", "--weights", "nope.pth"]
    )


def test_weights_table(capsys):
    assert main(["weights"]) == 0
    assert "PANx2_DF2K" in capsys.readouterr().out
