import pickle
import socket
import time
import zipfile

import numpy as np
import pytest
import torch

import pipeline.io.pairs as pd
from pipeline.errors import DatasetError
from pipeline.imaging import decode_image, encode_image, imresize
from pipeline.imaging.codec import DecodedImage
from pipeline.io.pairs import BenchmarkPair, PairSource, div2k_urls, make_pair, open_pairs
from pipeline.io.storage import Files
from pipeline.training.patches import PatchDataset

FILES = Files()  # no storage options: local files and the loopback S3 of the environment


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images that pipeline.io.pairs decodes."""
    calls = []

    def counting(data, *, name="<bytes>", **kw):
        calls.append(name)
        return decode_image(data, name=name, **kw)

    monkeypatch.setattr(pd, "decode_image", counting)
    return calls


@pytest.fixture(scope="module")
def bsds(shared_dir):
    return shared_dir / "train/BSDS200"


def _photo(bsds, index: int, height: int, width: int) -> np.ndarray:
    """A real photo's top-left height x width pixels (HxWx3 uint8)."""
    path = sorted(bsds.glob("*.jpg"))[index]
    return decode_image(path.read_bytes(), name=path.name).pixels[:height, :width]


class _ListPairs(PairSource):
    def __init__(self, pairs: list[BenchmarkPair], scale: int) -> None:
        self.name, self.scale, self.pairs = "list", scale, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, index: int) -> BenchmarkPair:
        return self.pairs[index]


def _u8(t: torch.Tensor) -> np.ndarray:
    return np.rint(t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# sources


@pytest.mark.integration
def test_benchmark_folder_reads_lr_files_by_name(benchmarks_dir, decodes):
    pairs = open_pairs(str(benchmarks_dir / "Set14"), 3)
    assert pairs.name == "Set14" and len(pairs) == 14 and decodes == []
    pair = pairs.pair(0)
    assert pair.name == "baboon" and len(decodes) == 2 and decodes[1].endswith("baboonx3.png")
    lr_file = benchmarks_dir / "Set14/LR_bicubic/X3/baboonx3.png"
    assert np.array_equal(pair.lr, decode_image(lr_file.read_bytes()).pixels)
    assert pair.hr.shape == (pair.lr.shape[0] * 3, pair.lr.shape[1] * 3, 3)


@pytest.mark.integration
def test_folder_of_photos_is_opened_without_decoding(bsds, decodes):
    pairs = open_pairs(str(bsds), 2)
    assert pairs.name == "BSDS200" and len(pairs) == 200 and decodes == []
    pair = pairs.pair(7)
    stem = sorted(bsds.glob("*.jpg"))[7].stem
    assert pair.name == stem and decodes == [str(bsds / f"{stem}.jpg")]
    hr = decode_image((bsds / f"{stem}.jpg").read_bytes()).pixels
    hr = hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2]
    assert np.array_equal(pair.hr, hr) and np.array_equal(pair.lr, imresize(hr, 0.5))
    with pytest.raises(IndexError):
        pairs.pair(200)


@pytest.mark.integration
def test_parquet_rows_are_read_one_at_a_time(benchmarks_dir, tmp_path, decodes):
    import datasets

    hr = sorted((benchmarks_dir / "Set5/HR").glob("*.png"))
    lr = [benchmarks_dir / f"Set5/LR_bicubic/X2/{p.stem}x2.png" for p in hr]
    features = datasets.Features({"hr": datasets.Image(), "lr": datasets.Image()})
    ds = datasets.Dataset.from_dict(
        {"hr": [str(p) for p in hr], "lr": [str(p) for p in lr]}, features=features
    )
    ds.cast_column("hr", datasets.Image(decode=True)).to_parquet(str(tmp_path / "set5.parquet"))

    pairs = open_pairs(str(tmp_path / "set5.parquet"), 2)
    assert pairs.name == "set5" and len(pairs) == 5 and decodes == []
    got = pairs.pair(3)
    assert decodes == ["head", "headx2"]
    want = open_pairs(str(benchmarks_dir / "Set5"), 2).pair(3)
    assert got.name == want.name
    assert np.array_equal(got.hr, want.hr) and np.array_equal(got.lr, want.lr)


@pytest.mark.integration
def test_imagefolder_with_metadata_goes_through_datasets(benchmarks_dir, tmp_path):
    root = tmp_path / "captioned"
    root.mkdir()
    for name in ("bird", "baby"):
        (root / f"{name}.png").write_bytes((benchmarks_dir / f"Set5/HR/{name}.png").read_bytes())
    (root / "metadata.jsonl").write_text(
        '{"file_name": "bird.png", "text": "a"}\n{"file_name": "baby.png", "text": "b"}\n'
    )
    pairs = open_pairs(str(root), 4)
    assert pairs.name == "captioned" and sorted(p.name for p in pairs) == ["baby", "bird"]


def _png(pixels: np.ndarray) -> bytes:
    return encode_image(DecodedImage(pixels, None, "RGB", None), "png")


def _div2k_zips(bsds, tmp_path, count=3):
    """Zips with DIV2K's layout made from BSDS photos; LR members stored in reverse order."""
    hrs = [_photo(bsds, i, 320, 480) for i in range(count)]  # a multiple of 2, as DIV2K's HR
    hr_zip, lr_zip = tmp_path / "DIV2K_train_HR.zip", tmp_path / "DIV2K_train_LR_bicubic_X2.zip"
    with zipfile.ZipFile(hr_zip, "w") as z:
        for i, hr in enumerate(hrs, 1):
            z.writestr(f"DIV2K_train_HR/{i:04d}.png", _png(hr))
    with zipfile.ZipFile(lr_zip, "w") as z:
        for i, hr in reversed(list(enumerate(hrs, 1))):
            z.writestr(f"DIV2K_train_LR_bicubic/X2/{i:04d}x2.png", _png(imresize(hr, 0.5)))
    return hr_zip, lr_zip, hrs


@pytest.mark.integration
def test_div2k_zips_are_paired_by_name(bsds, tmp_path, decodes):
    hr_zip, lr_zip, hrs = _div2k_zips(bsds, tmp_path)
    pairs = open_pairs(str(hr_zip), 2, lr_source=str(lr_zip))
    assert pairs.name == "DIV2K_train_HR" and len(pairs) == 3 and decodes == []
    for i, hr in enumerate(hrs):
        pair = pairs.pair(i)
        assert pair.name == f"{i + 1:04d}"
        assert np.array_equal(pair.hr, hr) and np.array_equal(pair.lr, imresize(hr, 0.5))
    assert decodes == ["0001", "0001x2", "0002", "0002x2", "0003", "0003x2"]
    clone = pickle.loads(pickle.dumps(pairs))  # as shipped to DataLoader / Ray workers
    assert np.array_equal(clone.pair(2).lr, imresize(hrs[2], 0.5))


@pytest.mark.integration
def test_div2k_zip_without_lr_makes_it_with_bicubic(bsds, tmp_path, decodes):
    hr_zip, _, hrs = _div2k_zips(bsds, tmp_path, count=2)
    pairs = open_pairs(str(hr_zip), 2)
    pair = pairs.pair(1)
    assert decodes == ["0002"] and np.array_equal(pair.lr, imresize(hrs[1], 0.5))


@pytest.mark.integration
def test_missing_lr_image_is_named(bsds, tmp_path):
    hr_zip, _, _ = _div2k_zips(bsds, tmp_path)
    (tmp_path / "two").mkdir()
    _, lr_zip, _ = _div2k_zips(bsds, tmp_path / "two", count=2)
    with pytest.raises(DatasetError, match="has no LR image for 0003"):
        open_pairs(str(hr_zip), 2, lr_source=str(lr_zip))


def test_div2k_urls():
    assert div2k_urls("valid", 3) == (
        "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip",
        "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_LR_bicubic_X3.zip",
    )
    for bad in (("test", 2), ("train", 8)):
        with pytest.raises(ValueError):
            div2k_urls(*bad)


def test_loading_script_dataset_names_the_forms_that_work(tmp_path):
    repo = tmp_path / "Div2k"
    repo.mkdir()
    (repo / "Div2k.py").write_text("import datasets\n")
    with pytest.raises(DatasetError, match="loading-script dataset") as info:
        open_pairs(str(repo), 2)
    message = str(info.value)
    assert "\n" not in message and "HR/" in message and "DIV2K_train_HR.zip" in message


def test_a_mistyped_local_path_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source in ("../shared/train/BSDS20", "./photos", "data/train/hr", "photos"):
        with pytest.raises(DatasetError, match="no such file or folder"):
            open_pairs(source, 2)


def test_a_hub_id_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(
        DatasetError, match=r"no such file or folder, and the .* hub cannot .*HF_HUB_OFFLINE=1"
    ):
        open_pairs("someone/div2k-parquet", 2)
    assert time.perf_counter() - started < 5


# ---------------------------------------------------------------------------------------------
# PatchDataset


@pytest.mark.integration
def test_patches_have_the_stated_shapes_dtypes_and_range(bsds):
    ds = PatchDataset(open_pairs(str(bsds), 3), 3, patch_size=48)
    assert len(ds) == 200
    lr, hr = ds[11]
    assert lr.shape == (3, 48, 48) and hr.shape == (3, 144, 144)
    assert lr.dtype == hr.dtype == torch.float32 and lr.is_contiguous() and hr.is_contiguous()
    assert lr.min() >= 0 and lr.max() <= 1 and hr.min() >= 0 and hr.max() <= 1
    assert lr.std() > 0.01  # real content, not a blank patch
    with pytest.raises(IndexError):
        ds[200]
    with pytest.raises(ValueError, match="x3 pairs, not x2"):
        PatchDataset(open_pairs(str(bsds), 3), 2)


@pytest.mark.integration
def test_hr_patch_is_aligned_with_lr_patch(bsds):
    """LR made by the source from the whole HR: away from the patch border (where the bicubic kernel
    reads outside the patch), shrinking the HR patch gives exactly the LR patch."""
    s, m = 2, 3
    ds = PatchDataset(open_pairs(str(bsds), s), s, patch_size=32, augment=False)
    torch.manual_seed(0)
    for i in (0, 5, 42, 199):
        lr, hr = (_u8(t) for t in ds[i])
        shrunk = imresize(hr, 1 / s)
        assert np.array_equal(shrunk[m:-m, m:-m], lr[m:-m, m:-m]), i
        assert not np.array_equal(shrunk[m:-m, m + 1 : -m + 1], lr[m:-m, m:-m])  # the check can fail


def _dihedral_group(a: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(a, r) for r in range(4)] + [np.rot90(a[:, ::-1], r) for r in range(4)]


@pytest.mark.integration
def test_all_8_flips_and_rotations_occur_and_lr_and_hr_get_the_same(bsds):
    pair = make_pair("crop", _photo(bsds, 3, 64, 64), None, 2)
    lr_group, hr_group = _dihedral_group(pair.lr), _dihedral_group(pair.hr)
    assert len({g.tobytes() for g in lr_group}) == 8  # the photo has no symmetry
    ds = PatchDataset(_ListPairs([pair], 2), 2, patch_size=32)  # patch = whole LR: only the transform varies
    seen = set()
    torch.manual_seed(1)
    for _ in range(100):
        lr, hr = (_u8(t) for t in ds[0])
        (k,) = [k for k, g in enumerate(lr_group) if np.array_equal(g, lr)]
        assert np.array_equal(hr_group[k], hr)
        seen.add(k)
    assert seen == set(range(8))


@pytest.mark.integration
def test_randomness_comes_from_torch_so_dataloader_seeding_applies(bsds):
    ds = PatchDataset(open_pairs(str(bsds), 2), 2, patch_size=24)
    subset = torch.utils.data.Subset(ds, range(8))

    def batches(seed):
        loader = torch.utils.data.DataLoader(
            subset, batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(seed)
        )
        return [lr for lr, _ in loader]

    first, again, other = batches(0), batches(0), batches(1)
    assert first[0].shape == (4, 3, 24, 24)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    np.random.seed(0)
    torch.manual_seed(5)
    a = ds[0]
    np.random.seed(1)
    torch.manual_seed(5)
    assert torch.equal(a[0], ds[0][0])


@pytest.mark.integration
def test_five_crop_items_are_patches_of_the_five_crops(bsds):
    s, p = 2, 40
    pair = make_pair("crop", _photo(bsds, 9, 160, 240), None, s)  # LR 80x120 -> crops 40x60
    ds = PatchDataset(_ListPairs([pair, pair], s), s, patch_size=p, five_crop=True, augment=False)
    assert len(ds) == 10
    boxes = [(0, 0), (0, 60), (40, 0), (40, 60), (20, 30)]  # (top, left) of TL, TR, BL, BR, centre
    torch.manual_seed(2)
    for item in range(10):
        lr, hr = (_u8(t) for t in ds[item])
        found = [
            (y, x)
            for y in range(81 - p)
            for x in range(121 - p)
            if np.array_equal(pair.lr[y : y + p, x : x + p], lr)
        ]
        assert len(found) == 1
        (y, x), (top, left) = found[0], boxes[item % 5]
        assert y == top and left <= x <= left + 20, (item, found)
        assert np.array_equal(pair.hr[s * y : s * (y + p), s * x : s * (x + p)], hr)


@pytest.mark.integration
def test_images_smaller_than_the_patch_are_refused_by_name(bsds):
    pair = make_pair("tiny", _photo(bsds, 0, 64, 64), None, 2)  # LR 32x32
    with pytest.raises(DatasetError, match=r"tiny: LR image is 32x32, smaller than the 40-pixel"):
        PatchDataset(_ListPairs([pair], 2), 2, patch_size=40)[0]
    with pytest.raises(DatasetError, match=r"tiny: five-crop 4 of its LR image is 16x16, .* or no five_crop"):
        PatchDataset(_ListPairs([pair], 2), 2, patch_size=20, five_crop=True)[4]


@pytest.mark.integration
def test_decoded_pairs_are_cached_per_process(bsds, decodes):
    ds = PatchDataset(open_pairs(str(bsds), 2), 2, patch_size=16, cache_images=2)
    for i in (0, 0, 1, 0, 2, 1, 0):
        ds[i]
    # 0 and 1 decoded once; then 2 evicts 1 (0 was used later), 1 evicts 0, 0 evicts 2
    assert len(decodes) == 5
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._cache == {} and len(ds._cache) == 2
    uncached = PatchDataset(open_pairs(str(bsds), 2), 2, patch_size=16)
    uncached[0], uncached[0]
    assert len(decodes) == 7


@pytest.mark.integration
def test_a_benchmark_folder_at_a_url_reads_as_the_local_one(s3_server, benchmarks_dir):
    """A cluster's driver has no local copy of Set5: the set in the folder layout on S3 is fetched."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="sets")
    local = benchmarks_dir / "Set5"
    for path in [
        *(local / "HR").iterdir(),
        *(local / "LR_bicubic/X2").iterdir(),
        *(local / "LR_bicubic/X3").iterdir(),
    ]:
        FILES.write_bytes(f"s3://sets/bench/Set5/{path.relative_to(local).as_posix()}", path.read_bytes())
    remote = open_pairs("s3://sets/bench/Set5", 2)
    expected = open_pairs(str(local), 2)
    assert remote.name == "Set5" and len(remote) == len(expected) == 5
    for got, want in zip(remote, expected, strict=True):
        assert got.name == want.name and np.array_equal(got.hr, want.hr) and np.array_equal(got.lr, want.lr)
    # not a benchmark folder: datasets' turn
    assert pd._benchmark_copy("s3://sets/bench/nothing", 2, FILES) is None
