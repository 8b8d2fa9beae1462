import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.core.engine import Upscaler
from pipeline.imaging import decode_image
from pipeline.io.weights import load_pretrained

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
    argv = ["upscale-image", str(src), str(out), "--scale", "4", "--weights", weights, "--tile", "48"]
    run = subprocess.run(
        [PAN_BIN, *argv, "--precision", "fp32"],
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
    assert ".png, .jxl, .jpg or .webp" in _one_error_line(
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


BAD_SPEC = "kind: upscale\nsource: in\ndest: out\nscale: 5\nbogus_key: 1\ntile: 8\n"


def _every_problem_of_bad_spec(path) -> list[str]:
    """What ``pan`` prints on stderr for ``BAD_SPEC`` at ``path``: the summary, then each problem."""
    return [
        f"pan: error: invalid job settings in {path}: 3 problems",
        f"  {path}: scale: Input should be 2, 3 or 4",
        f"  {path}: bogus_key: not a setting of upscale jobs",
        f"  {path}: tile: tile 8 is out of range: use 0 (whole image) or at least 32 px "
        "(each tile also reads 24 px of context on every side)",
    ]


def test_validate_prints_every_problem_of_each_spec(tmp_path, capsys):
    bad, misspelt = tmp_path / "bad.yaml", tmp_path / "misspelt.yaml"
    bad.write_text(BAD_SPEC)
    misspelt.write_text("kind: upscale\nsource: in\ndest: out\nscael: 2\n")
    assert main(["validate", str(bad), str(misspelt)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        *_every_problem_of_bad_spec(bad),
        f"pan: error: invalid job settings in {misspelt}: 2 problems",
        f"  {misspelt}: scael: not a setting of upscale jobs (did you mean scale?)",
        f"  {misspelt}: scale is required (is scael a misspelling of it?)",
    ]


def test_run_and_submit_print_every_problem_before_anything_starts(tmp_path, capsys, monkeypatch):
    import pipeline.cli.submit

    def reached_the_cluster(*args, **kwargs):
        raise AssertionError("a spec that does not validate reached the cluster")

    monkeypatch.setattr(pipeline.cli.submit, "client", reached_the_cluster)
    monkeypatch.setattr(pipeline.cli.submit, "submit", reached_the_cluster)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(BAD_SPEC)
    for argv in (["run", "bad.yaml"], ["submit", "bad.yaml", "--address", "http://127.0.0.1:1", "--wait"]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.splitlines() == _every_problem_of_bad_spec("bad.yaml"), argv
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Every mistake a user can make ends in one line on stderr and exit 2, in seconds, before any
# image is computed; inputs are never written over. Each case runs `pan` as a user would.


def _checksums(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _pan(argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 120) -> tuple[int, str, float]:
    started = time.perf_counter()
    run = subprocess.run([PAN_BIN, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return run.returncode, run.stderr, time.perf_counter() - started


def _assert_user_error(argv, cwd, *, expect: str, env=None, within: float = 20.0) -> str:
    code, err, seconds = _pan(argv, cwd, env)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("pan: error: "), err
    assert expect in lines[0], lines[0]
    assert seconds < within, f"{seconds:.1f} s to fail"
    return lines[0]


@pytest.fixture
def workdir(benchmarks_dir, weights_dir, tmp_path):
    """A user's folder: photos/ (5 LR images) and the x4 and x2 weights, used by relative paths."""
    (tmp_path / "photos").mkdir()
    for p in sorted((benchmarks_dir / "Set5/LR_bicubic/X4").glob("*.png")):
        shutil.copy(p, tmp_path / "photos" / p.name)
    for s in (2, 4):
        shutil.copy(weights_dir / f"PANx{s}_DF2K.pth", tmp_path / f"x{s}.pth")
    return tmp_path


W4 = ["--scale", "4", "--weights", "x4.pth"]
USER_ERRORS = {
    # inputs are read-only to us
    "dest is the source": (["upscale", "photos", "photos", *W4, "--overwrite"], "is the source"),
    "dest is the source (trailing slash)": (["upscale", "photos/", "./photos", *W4], "is the source"),
    "dest inside the source": (["upscale", "photos", "photos/x4", *W4], "--dest-inside-source"),
    "source inside the dest": (["upscale", "photos", ".", *W4], "holds the source"),
    "upscale-image onto its input": (["upscale-image", "photos/babyx4.png", "photos/babyx4.png", *W4],
                                     "is also an input"),
    "compare onto its input": (["compare", "photos/babyx4.png", "photos/babyx4.png", *W4],
                               "is also an input"),
    # settings in range
    "negative tile": (["upscale-image", "photos/babyx4.png", "o.png", *W4, "--tile", "-5"], "tile -5"),
    "tile of 1 px": (["upscale-image", "photos/babyx4.png", "o.png", *W4, "--tile", "1"], "at least 32"),
    "tile of 1 px, batch": (["upscale", "photos", "out", *W4, "--tile", "1"], "at least 32"),
    "tile of 1 px, eval": (["eval", "--data", "photos", "--scale", "4", "--weights", "x4.pth", "--tile", "1"],
                           "at least 32"),
    "no actors": (["upscale", "photos", "out", *W4, "--actors", "0"], "actors"),
    "bad scale": (["upscale", "photos", "out", "--scale", "5"], "--scale: Input should be 2, 3 or 4"),
    "bad JSON": (["upscale", "photos", "out", *W4, "--storage-options", "{"], "not valid YAML"),
    "unknown key in a spec": (["upscale", "photos", "out", "--config", "spec.yaml"], "spec.yaml"),
    # what is read
    "missing source": (["upscale", "nope", "out", *W4], "source not found"),
    "missing input image": (["upscale-image", "nope.png", "o.png", *W4], "No such file"),
    "mistyped weights path": (["upscale", "photos", "out", "--scale", "4", "--weights", "weights/x4.pth"],
                              "no such file or folder"),
    "weights of another scale": (["upscale", "photos", "out", "--scale", "2", "--weights", "x4.pth"],
                                 "x4 weights but scale 2"),
    "mistyped training data": (["train", "--data", "../shared/train/BSDS20", "--scale", "2", "--name", "t"],
                               "no such file or folder"),
    "mistyped eval data": (["eval", "--data", "benchmarks/Set55", "--scale", "4", "--weights", "x4.pth"],
                           "no such file or folder"),
    # where it is written
    "dest is a file": (["upscale", "photos", "photos/babyx4.png/out", *W4], "inside the source"),
    "dest under a file": (["upscale", "photos", "afile/out", *W4], "a file, not a folder"),
    "report under a file": (["eval", "--data", "photos", "--scale", "4", "--weights", "x4.pth",
                             "--report", "afile/r.json"], "a file, not a folder"),
}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_line_exit_2_and_fast(workdir, case):
    argv, expect = USER_ERRORS[case]
    (workdir / "afile").write_text("a file")
    (workdir / "spec.yaml").write_text("scale: 4\nwieghts: x4.pth\n")
    before = _checksums(workdir)
    _assert_user_error(argv, workdir, expect=expect)
    assert _checksums(workdir) == before  # nothing written over, nothing computed
    assert not (workdir / "out").exists() and not (workdir / "photos/x4").exists()


@pytest.mark.integration
def test_hub_weights_offline_fail_in_seconds_naming_weights(workdir):
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    env.pop("HF_HUB_OFFLINE", None)
    line = _assert_user_error(
        ["upscale", "photos", "out", "--scale", "2"], workdir, expect="--weights", env=env
    )
    assert "eugenesiow/pan" in line and "cannot be reached" in line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_storage_failures_are_one_line_before_any_work(workdir, s3_server):
    boto3.client("s3").create_bucket(Bucket="photos")
    _assert_user_error(
        ["upscale", "photos", "s3://no-such-bucket/out", *W4], workdir, expect="no-such-bucket"
    )
    down = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}
    _assert_user_error(
        ["upscale", "photos", "s3://photos/out", *W4], workdir, expect="cannot reach", env=down
    )
    _assert_user_error(["upscale", "s3://photos/in", "out", *W4], workdir, expect="cannot reach", env=down)
    no_credentials = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS_KEY")}
    no_credentials["AWS_SHARED_CREDENTIALS_FILE"] = str(workdir / "none")
    _assert_user_error(
        ["upscale", "photos", "s3://photos/out", *W4], workdir, expect="credentials", env=no_credentials
    )
    assert not (workdir / "out").exists()


def _in_a_small_mount(argv: list[str], cwd: Path, mount: Path, options: str) -> tuple[int, str]:
    """Run ``pan`` with a tmpfs of ``options`` at ``mount``, in private namespaces (unprivileged)."""
    mount.mkdir(exist_ok=True)
    script = f"mount -t tmpfs -o {options} tmpfs {mount} && exec {PAN_BIN} " + " ".join(argv)
    run = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=cwd, capture_output=True, text=True)
    if "mount" in run.stderr and ("not permitted" in run.stderr or "unshare" in run.stderr):
        pytest.skip(f"no private mounts here: {run.stderr.strip()}")
    return run.returncode, run.stderr


@pytest.mark.integration
def test_read_only_dest_is_one_line_before_any_work(workdir):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private read-only mount")
    code, err = _in_a_small_mount(["upscale", "photos", "ro/out", *W4], workdir, workdir / "ro", "ro,size=1m")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "read-only" in err


@pytest.mark.integration
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_inputs_stay(workdir, benchmarks_dir):
    """A destination that fills up mid-run (a 600 kB tmpfs): the run stops with one line."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private small mount")
    for p in sorted((benchmarks_dir / "Set14/LR_bicubic/X2").glob("*.png")):
        shutil.copy(p, workdir / "photos" / p.name)
    before = _checksums(workdir / "photos")
    argv = ["upscale", "photos", "small/out", *W4]
    code, err = _in_a_small_mount(argv, workdir, workdir / "small", "size=600k")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "no space left" in err
    assert _checksums(workdir / "photos") == before
