import csv
import shutil

import numpy as np
import pytest

from pipeline.core.engine import Upscaler
from pipeline.errors import DatasetError
from pipeline.evaluation.scoring import evaluate
from pipeline.io.pairs import load_benchmark
from pipeline.io.weights import load_pretrained

# ../shared/README.md: the means that the official weights give under the paper's protocol
EXPECTED = {
    ("Set5", 2): (38.0007, 0.9605),
    ("Set5", 3): (34.4003, 0.9272),
    ("Set5", 4): (32.1311, 0.8948),
    ("Set14", 2): (33.5927, 0.9181),
    ("Set14", 3): (30.3553, 0.8422),
    ("Set14", 4): (28.6107, 0.7822),
}
BICUBIC_SET5 = {2: 33.66, 3: 30.39, 4: 28.42}  # the literature's figures


@pytest.fixture(scope="module")
def official_results(shared_dir):
    with open(shared_dir / "reference/official_results.tsv") as f:
        return {
            (r["dataset"], int(r["scale"]), r["image"]): float(r["psnr_y"])
            for r in csv.DictReader(f, delimiter="\t")
        }


def _upscaler(weights_dir, scale):
    return Upscaler(load_pretrained(weights_dir / f"PANx{scale}_DF2K.pth", scale=scale), device="cpu")


@pytest.mark.integration
@pytest.mark.parametrize(("dataset", "scale"), list(EXPECTED))
def test_official_weights_reproduce_the_paper(weights_dir, benchmarks_dir, official_results, dataset, scale):
    name, pairs = load_benchmark(str(benchmarks_dir / dataset), scale)
    report = evaluate(_upscaler(weights_dir, scale), name, pairs)
    psnr, ssim = EXPECTED[(dataset, scale)]
    assert report.psnr_y == pytest.approx(psnr, abs=0.005)
    assert report.ssim_y == pytest.approx(ssim, abs=0.0005)
    assert len(report.images) == {"Set5": 5, "Set14": 14}[dataset]
    for image in report.images:
        assert image.psnr_y == pytest.approx(official_results[(dataset, scale, image.name)], abs=0.01), (
            image.name
        )
    if dataset == "Set5":
        assert report.bicubic_psnr_y == pytest.approx(BICUBIC_SET5[scale], abs=0.05)
    assert report.to_json()["bicubic"]["psnr_y"] == report.bicubic_psnr_y


@pytest.mark.integration
def test_lr_is_made_with_matlab_bicubic_when_absent(benchmarks_dir, tmp_path):
    shutil.copytree(benchmarks_dir / "Set5/HR", tmp_path / "Set5/HR")
    _, made = load_benchmark(str(tmp_path / "Set5"), 3)
    _, given = load_benchmark(str(benchmarks_dir / "Set5"), 3)
    for a, b in zip(made, given, strict=True):
        assert a.name == b.name and np.array_equal(a.lr, b.lr) and np.array_equal(a.hr, b.hr)


def _parquet_dataset(benchmarks_dir, path, *, with_lr: bool, hr_column="hr"):
    import datasets

    hr = sorted((benchmarks_dir / "Set5/HR").glob("*.png"))
    data = {hr_column: [str(p) for p in hr]}
    features = {hr_column: datasets.Image()}
    if with_lr:
        data["lr"] = [str(benchmarks_dir / f"Set5/LR_bicubic/X2/{p.stem}x2.png") for p in hr]
        features["lr"] = datasets.Image()
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    ds = ds.cast_column(hr_column, datasets.Image(decode=True))  # embed the bytes, not the paths
    ds.to_parquet(str(path))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("with_lr", [True, False])
def test_datasets_parquet_scores_equal_the_folder(weights_dir, benchmarks_dir, tmp_path, with_lr):
    path = _parquet_dataset(benchmarks_dir, tmp_path / "set5.parquet", with_lr=with_lr)
    name, pairs = load_benchmark(str(path), 2)
    _, folder_pairs = load_benchmark(str(benchmarks_dir / "Set5"), 2)
    assert name == "set5" and len(pairs) == 5
    for a, b in zip(pairs, folder_pairs, strict=True):
        assert np.array_equal(a.hr, b.hr) and np.array_equal(a.lr, b.lr)


@pytest.mark.integration
def test_datasets_imagefolder(benchmarks_dir, tmp_path):
    shutil.copytree(benchmarks_dir / "Set14/HR", tmp_path / "faces")  # no HR/ inside: imagefolder
    name, pairs = load_benchmark(str(tmp_path / "faces"), 4)
    assert name == "faces"
    assert len(pairs) == 14 and all(p.lr.shape[0] * 4 == p.hr.shape[0] for p in pairs)
    assert {p.name for p in pairs} >= {"baboon", "zebra", "bridge"}


def test_loading_script_dataset_is_named_in_one_line(tmp_path):
    repo = tmp_path / "Set5"
    repo.mkdir()
    (repo / "Set5.py").write_text("import datasets\n")
    with pytest.raises(DatasetError, match="loading-script dataset") as info:
        load_benchmark(str(repo), 2)
    assert "\n" not in str(info.value) and "HR/" in str(info.value)


def test_parquet_of_paths_is_explained(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"hr": ["/root/.cache/huggingface/datasets/x/baby.png"], "lr": ["/nope.png"]}
    )
    ds.to_parquet(str(tmp_path / "paths.parquet"))
    with pytest.raises(DatasetError, match=r"not images .* keeps only file paths"):
        load_benchmark(str(tmp_path / "paths.parquet"), 2)


def test_lr_of_the_wrong_size_is_refused(benchmarks_dir, tmp_path):
    shutil.copytree(benchmarks_dir / "Set5/HR", tmp_path / "s/HR")
    shutil.copytree(benchmarks_dir / "Set5/LR_bicubic/X3", tmp_path / "s/LR_bicubic/X2")
    for p in (tmp_path / "s/LR_bicubic/X2").iterdir():
        p.rename(p.with_name(p.name.replace("x3", "x2")))
    with pytest.raises(DatasetError, match=r"not HR .* divided by 2"):
        load_benchmark(str(tmp_path / "s"), 2)
