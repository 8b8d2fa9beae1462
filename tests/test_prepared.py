"""Prepared sets read back: patches cut from real sub-images are aligned and share their transform,
each pass takes every sub-image once, and Ray Train workers get disjoint, complete, balanced shares."""

import json

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.errors import DatasetError
from pipeline.imaging import decode_image, imresize
from pipeline.io.pairs import crop_to_multiple
from pipeline.io.storage import Files
from pipeline.training.prepared import (
    CLAIM_NAME,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PatchSampler,
    PreparedSet,
    Shard,
    dihedral,
    open_prepared,
)

FILES = Files()


def _sub_images(benchmarks_dir, scale: int, crop: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` HR sub-images of Set5's baby down its diagonal, and their LR: slices of the whole
    image's MATLAB-bicubic LR, as ``pan prepare`` makes them."""
    path = benchmarks_dir / "Set5/HR/baby.png"
    hr = crop_to_multiple(decode_image(path.read_bytes(), name=path.name).pixels, scale)
    lr = imresize(hr, 1 / scale)
    corners = [crop * i for i in range(count)]  # apart: each patch lies in one sub-image only
    c = crop // scale
    hr_subs = np.stack([hr[y : y + crop, y : y + crop] for y in corners])
    lr_subs = np.stack([lr[y // scale : y // scale + c, y // scale : y // scale + c] for y in corners])
    return hr_subs, lr_subs


def _channels_last(batch: np.ndarray) -> np.ndarray:
    return batch.transpose(0, 2, 3, 1)


def _find(window: np.ndarray, image: np.ndarray) -> list[tuple[int, int]]:
    """Every (y, x) where ``window`` (h x w x 3) lies in ``image``."""
    views = sliding_window_view(image, window.shape)[:, :, 0]
    return [tuple(int(v) for v in yx) for yx in np.argwhere((views == window).all(axis=(2, 3, 4)))]


@pytest.mark.integration
@pytest.mark.parametrize("scale", [2, 4])
def test_patches_are_aligned_and_lr_and_hr_get_the_same_transform(benchmarks_dir, scale):
    """Each LR patch, undone by one of the 8 transforms, lies in its sub-image at (y, x); its HR
    patch, undone by the same transform, is the HR sub-image's at (s*y, s*x). All 8 occur."""
    hr, lr = _sub_images(benchmarks_dir, scale, crop=96, count=3)
    sampler = PatchSampler([hr[:2], hr[2:]], [lr[:2], lr[2:]], scale, np.random.default_rng(0))
    p = 12
    lr_batch, hr_batch = sampler.batch(48, p)
    assert lr_batch.shape == (48, 3, p, p) and hr_batch.shape == (48, 3, scale * p, scale * p)
    assert lr_batch.dtype == hr_batch.dtype == np.uint8
    inverse = {k: next(j for j in range(8) if np.array_equal(dihedral(dihedral(lr[0], k), j), lr[0]))
               for k in range(8)}  # fmt: skip
    seen = set()
    for lr_patch, hr_patch in zip(_channels_last(lr_batch), _channels_last(hr_batch), strict=True):
        found = [(k, i, yx) for k in range(8) for i in range(3)
                 for yx in _find(np.ascontiguousarray(dihedral(lr_patch, inverse[k])), lr[i])]  # fmt: skip
        assert len(found) == 1, found  # real content: one place, one transform
        k, i, (y, x) = found[0]
        expected = hr[i, scale * y : scale * (y + p), scale * x : scale * (x + p)]
        assert np.array_equal(dihedral(hr_patch, inverse[k]), expected)
        seen.add(k)
    assert seen == set(range(8))


@pytest.mark.integration
def test_each_pass_takes_every_sub_image_once(benchmarks_dir):
    hr, lr = _sub_images(benchmarks_dir, 2, crop=64, count=5)
    sampler = PatchSampler([hr[:3], hr[3:]], [lr[:3], lr[3:]], 2, np.random.default_rng(1))
    assert len(sampler) == 5
    whole = 32  # the patch is the whole LR sub-image: it names its sub-image
    picked = [next(i for i in range(5) if np.array_equal(patch, lr[i]))
              for patch in _channels_last(sampler.batch(15, whole, augment=False)[0])]  # fmt: skip
    for start in (0, 5, 10):
        assert sorted(picked[start : start + 5]) == [0, 1, 2, 3, 4]
    assert picked[:5] != picked[5:10] or picked[5:10] != picked[10:]  # shuffled anew each pass
    with pytest.raises(ValueError, match="does not fit"):
        sampler.batch(1, whole + 1)


def _set(crops: list[int], location: str = "/data/set") -> PreparedSet:
    shards = tuple(Shard(f"src/{i:03d}", n, {}) for i, n in enumerate(crops))
    return PreparedSet(location, (2, 4), 360, 180, shards, "0" * 16)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_are_disjoint_complete_balanced_and_the_same_everywhere(world):
    prepared = _set([77, 77, 88, 88, 88, 40, 77, 12, 90, 77, 77, 60, 77, 88, 5, 66])
    shares = prepared.shares(world)
    assert len(shares) == world
    names = [s.name for share in shares for s in share]
    assert sorted(names) == sorted(s.name for s in prepared.shards) and len(set(names)) == len(names)
    loads = [sum(s.crops for s in share) for share in shares]
    assert max(loads) - min(loads) <= max(s.crops for s in prepared.shards)
    assert shares == _set([77, 77, 88, 88, 88, 40, 77, 12, 90, 77, 77, 60, 77, 88, 5, 66]).shares(world)


def test_more_workers_than_shards_are_refused_by_name():
    with pytest.raises(DatasetError, match=r"holds 3 shard.*fewer than the 4 workers"):
        _set([10, 10, 10]).shares(4)


def test_a_run_the_set_cannot_feed_is_refused_naming_what_to_change():
    prepared = _set([10, 10])
    with pytest.raises(DatasetError, match="prepared at x2, x4, not x3: prepare a set with --scale 3"):
        prepared.check(3, 64, 1)
    with pytest.raises(DatasetError, match="90 px at x4: smaller than the 96-px LR patch"):
        prepared.check(4, 96, 1)
    prepared.check(4, 90, 2)


def test_open_prepared_knows_a_set_by_its_manifest(tmp_path, benchmarks_dir):
    assert open_prepared(str(benchmarks_dir / "Set5"), FILES) is None  # image sources: no manifest
    assert open_prepared(str(tmp_path / "a.zip"), FILES) is None
    (tmp_path / CLAIM_NAME).write_text("{}")
    with pytest.raises(DatasetError, match=r"has not finished.*run the same pan prepare again"):
        open_prepared(str(tmp_path), FILES)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "scales": [2], "crop_size": 96, "step": 48,
                "sources": [{"location": "/photos", "digest": {"sha256": "0", "of": "listing"}, "lr": {}}],
                "shards": [{"name": "s/a", "crops": 4, "bytes": {"hr.npy": 1}}]}  # fmt: skip
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    prepared = open_prepared(str(tmp_path), FILES)
    assert prepared.scales == (2,) and prepared.crops == 4 and prepared.shards[0].name == "s/a"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "version": FORMAT_VERSION + 1}))
    with pytest.raises(DatasetError, match="prepare it again with this pan"):
        open_prepared(str(tmp_path), FILES)
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(DatasetError, match="is damaged"):
        open_prepared(str(tmp_path), FILES)
