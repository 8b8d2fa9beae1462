"""Distributed evaluation on a real local Ray: the same numbers as the single-process path."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.engine import Upscaler
from pipeline.errors import DatasetError, PipelineError, WeightsError
from pipeline.evaluation.job import evaluate_many
from pipeline.evaluation.report import GAP, LABEL_HEIGHT
from pipeline.evaluation.scoring import evaluate
from pipeline.io.pairs import load_benchmark
from pipeline.io.storage import Files
from pipeline.io.weights import load_pretrained

FILES = Files()  # no storage options: local files and the loopback S3 of the environment

SETS = ("Set5", "Set14")
SCALES = (2, 3, 4)


def _weights(weights_dir) -> str:
    return str(weights_dir / "PANx{scale}_DF2K.pth")


@pytest.fixture(scope="module")
def distributed(local_ray, benchmarks_dir, weights_dir, tmp_path_factory):
    compare_dir = tmp_path_factory.mktemp("compare")
    sources = [str(benchmarks_dir / s) for s in SETS]
    weights = _weights(weights_dir)
    reports = evaluate_many(sources, SCALES, weights, device="cpu", compare_dir=str(compare_dir))
    return reports, compare_dir


def _actor_threads(ray) -> int:
    """torch's thread count in a worker holding half a CPU, as the eval actors do."""

    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(ray.remote(num_cpus=0.5)(threads).remote())


@pytest.mark.integration
@pytest.mark.slow
def test_scores_equal_the_single_process_path(distributed, local_ray, benchmarks_dir, weights_dir):
    reports, _ = distributed
    assert [(r.dataset, r.scale) for r in reports] == [(d, s) for d in SETS for s in SCALES]
    # PAN's CPU convolutions sum in another order with one thread than with several, which moves
    # a float32 output by one ulp and, rarely, flips a uint8 rounding (measured: 2 pixels of Set14
    # 'man' x4, about 1e-5 dB). The actors run one torch thread (Ray sets OMP_NUM_THREADS=1 for
    # fractional-CPU workers), so the reference runs one too, and then every number is equal.
    threads = _actor_threads(local_ray)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for report in reports:
            model = load_pretrained(weights_dir / f"PANx{report.scale}_DF2K.pth", scale=report.scale)
            name, pairs = load_benchmark(str(benchmarks_dir / report.dataset), report.scale)
            reference = evaluate(Upscaler(model, device="cpu"), name, pairs)
            assert report.weights == reference.weights == f"PANx{report.scale}_DF2K"
            assert [i.name for i in report.images] == [p.name for p in pairs]
            assert report.images == reference.images, (report.dataset, report.scale)
            assert report.to_json() == reference.to_json()
    finally:
        torch.set_num_threads(saved)


@pytest.mark.integration
@pytest.mark.slow
def test_comparison_pictures_are_written(distributed, benchmarks_dir):
    reports, compare_dir = distributed
    written = sorted(p.relative_to(compare_dir).as_posix() for p in compare_dir.rglob("*") if p.is_file())
    assert written == sorted(f"{r.dataset}/x{r.scale}/{i.name}.png" for r in reports for i in r.images)
    _, pairs = load_benchmark(str(benchmarks_dir / "Set14"), 3)
    hr = next(p.hr for p in pairs if p.name == "zebra")
    with Image.open(compare_dir / "Set14/x3/zebra.png") as picture:
        assert picture.format == "PNG"
        assert picture.size == (3 * hr.shape[1] + 2 * GAP, hr.shape[0] + LABEL_HEIGHT)
        hr_panel = np.asarray(picture.convert("RGB"))[: hr.shape[0], 2 * (hr.shape[1] + GAP) :]
    assert np.array_equal(hr_panel, hr)


@pytest.mark.integration
@pytest.mark.slow
def test_comparison_pictures_go_to_s3(local_ray, s3_server, benchmarks_dir, weights_dir):
    import boto3

    boto3.client("s3").create_bucket(Bucket="eval")
    (report,) = evaluate_many(
        [str(benchmarks_dir / "Set5")],
        [4],
        _weights(weights_dir),
        device="cpu",
        compare_dir="s3://eval/pictures",
        actors=1,
    )
    assert FILES.list_files("s3://eval/pictures") == sorted(f"Set5/x4/{i.name}.png" for i in report.images)


@pytest.mark.integration
@pytest.mark.slow
def test_loading_script_set_is_a_one_line_dataset_error(local_ray, weights_dir, tmp_path):
    repo = tmp_path / "Set5"
    repo.mkdir()
    (repo / "Set5.py").write_text("import datasets\n")
    with pytest.raises(DatasetError, match="loading-script dataset") as info:
        evaluate_many([str(repo)], [2], _weights(weights_dir), device="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.integration
@pytest.mark.slow
def test_two_sets_of_one_name_are_refused(local_ray, benchmarks_dir, weights_dir, tmp_path):
    shutil.copytree(benchmarks_dir / "Set5/HR", tmp_path / "Set5/HR")
    sources = [str(benchmarks_dir / "Set5"), str(tmp_path / "Set5")]
    with pytest.raises(PipelineError, match="two benchmark sets are named Set5"):
        evaluate_many(sources, [2], _weights(weights_dir), device="cpu")


@pytest.mark.integration
def test_bad_weights_fail_before_any_ray_work(weights_dir, benchmarks_dir, monkeypatch):
    def no_ray(address):
        raise AssertionError("Ray was reached")

    monkeypatch.setattr("pipeline.evaluation.job.connect", no_ray)
    sources = [str(benchmarks_dir / "Set5")]
    with pytest.raises(WeightsError, match=r"holds x2 weights .*put \{scale\} in the weights path"):
        evaluate_many(sources, [2, 3], str(weights_dir / "PANx2_DF2K.pth"))
    with pytest.raises(WeightsError):
        evaluate_many(sources, [2], str(weights_dir / "nope_x{scale}.pth"))


def test_two_batches_at_once_build_each_scales_engine_once(weights_dir, monkeypatch):
    """A GPU actor takes two batches at once: both asking for x2 must get one engine, built once."""
    import threading
    import time

    from pipeline.config.settings import EvalJob
    from pipeline.evaluation.job import EvalActor

    built = []

    def slow_build(spec, scale, **kwargs):
        built.append(scale)
        time.sleep(0.2)  # loading weights: the window in which a second call would build again
        return object()

    monkeypatch.setattr("pipeline.config.builder.build_upscaler", slow_build)
    job = EvalJob(data=["Set5"], scale=[2, 4], weights=_weights(weights_dir), device="cpu")
    actor = EvalActor(job, threads=torch.get_num_threads())  # this process's, left as they are
    got = []
    threads = [threading.Thread(target=lambda s=s: got.append((s, actor._upscaler(s)))) for s in (2, 2, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(built) == [2, 4]
    assert len({id(engine) for scale, engine in got if scale == 2}) == 1
