"""MATLAB-compatible bicubic imresize: exact reproduction of the benchmark LR files and contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.imaging.resize import imresize

SET_SIZES = {"Set5": 5, "Set14": 14}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def _hr_lr_pairs(benchmarks_dir: Path, set_name: str, scale: int):
    """Yield (name, HR cropped to a multiple of ``scale``, MATLAB-made LR)."""
    for hr_path in sorted((benchmarks_dir / set_name / "HR").glob("*.png")):
        hr = _load(hr_path)
        h, w = hr.shape[:2]
        hr = hr[: h - h % scale, : w - w % scale]
        lr_dir = benchmarks_dir / set_name / "LR_bicubic" / f"X{scale}"
        yield hr_path.stem, hr, _load(lr_dir / f"{hr_path.stem}x{scale}.png")


def _y_psnr(a: np.ndarray, b: np.ndarray, border: int) -> float:
    def y(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.float64)
        return 16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255

    diff = (y(a) - y(b))[border:-border, border:-border]
    return float(10 * np.log10(255.0**2 / np.mean(diff**2)))


def _ramp(h: int = 37, w: int = 53) -> np.ndarray:
    """Deterministic smooth-plus-edges test image in [0, 1], HxWx3."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = (xx / (w - 1)) * (yy / (h - 1))
    g = 0.5 + 0.5 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    b = ((xx // 7 + yy // 5) % 2).astype(np.float64)  # checkerboard: sharp edges overshoot
    return np.stack([r, g, b], axis=-1)


@pytest.mark.integration
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("set_name", ["Set5", "Set14"])
def test_reproduces_matlab_lr_exactly(benchmarks_dir: Path, set_name: str, scale: int) -> None:
    checked, mismatched = 0, []
    for name, hr, lr in _hr_lr_pairs(benchmarks_dir, set_name, scale):
        out = imresize(hr, 1 / scale)
        assert out.dtype == np.uint8
        if out.shape != lr.shape or not np.array_equal(out, lr):
            ndiff = int((out != lr).sum()) if out.shape == lr.shape else -1
            mismatched.append((name, out.shape, lr.shape, ndiff))
        checked += 1
    assert checked == SET_SIZES[set_name]
    assert mismatched == []


@pytest.mark.integration
def test_output_shape_matches_scale(benchmarks_dir: Path) -> None:
    _, hr, lr = next(_hr_lr_pairs(benchmarks_dir, "Set5", 2))
    out = imresize(hr, output_shape=lr.shape[:2])
    np.testing.assert_array_equal(out, lr)


@pytest.mark.integration
def test_grayscale_2d(benchmarks_dir: Path) -> None:
    hr = _load(benchmarks_dir / "Set14" / "HR" / "bridge.png")
    assert hr.ndim == 2
    out = imresize(hr[:-1, :-1], 1 / 3)  # 511x511 -> ceil: 171x171
    assert out.shape == (171, 171) and out.dtype == np.uint8
    lr = _load(benchmarks_dir / "Set14" / "LR_bicubic" / "X4" / "bridgex4.png")
    np.testing.assert_array_equal(imresize(hr, 0.25), lr)


def test_channels_are_independent() -> None:
    img = np.round(_ramp() * 255).astype(np.uint8)
    out = imresize(img, 0.4)
    for c in range(3):
        np.testing.assert_array_equal(imresize(img[..., c], 0.4), out[..., c])


def test_identity_and_constant() -> None:
    img = np.round(_ramp() * 255).astype(np.uint8)
    np.testing.assert_array_equal(imresize(img, output_shape=img.shape[:2]), img)
    flat = np.full((20, 30, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(imresize(flat, 0.3), np.full((6, 9, 3), 77, dtype=np.uint8))
    np.testing.assert_array_equal(imresize(flat, 2.5), np.full((50, 75, 3), 77, dtype=np.uint8))


def test_uint16_keeps_dtype_and_clips() -> None:
    img8 = np.round(_ramp() * 255).astype(np.uint8)
    img16 = img8.astype(np.uint16) * 257
    out16 = imresize(img16, 1.7)
    out8 = imresize(img8, 1.7)
    assert out16.dtype == np.uint16 and out16.shape == out8.shape == (63, 91, 3)
    # Smooth channels agree up to the uint8 path's per-pass quantisation.
    assert np.abs(out16[..., :2].astype(np.float64) / 257 - out8[..., :2]).max() <= 1.5
    # The checkerboard's ringing overshoots the range: it must saturate, not wrap.
    assert out16[..., 2].min() == 0 and out16[..., 2].max() == 65535


def test_float_keeps_dtype_and_does_not_clip() -> None:
    img = _ramp()
    out64 = imresize(img, 1.7)
    out32 = imresize(img.astype(np.float32), 1.7)
    assert out64.dtype == np.float64 and out32.dtype == np.float32
    assert out64.shape == (63, 91, 3)
    np.testing.assert_allclose(out32, out64, atol=1e-5)
    assert out64[..., 2].min() < 0 and out64[..., 2].max() > 1
    out8 = imresize(np.round(img * 255).astype(np.uint8), 1.7)
    # Smooth channels only: on the checkerboard the uint8 path clips between passes.
    assert np.abs(out64[..., :2] * 255 - out8[..., :2]).max() <= 1.5


def test_anisotropic_output_shape() -> None:
    img = np.round(_ramp() * 255).astype(np.uint8)
    out = imresize(img, output_shape=(20, 100))
    assert out.shape == (20, 100, 3) and out.dtype == np.uint8


@pytest.mark.integration
@pytest.mark.parametrize(("scale", "expected"), [(2, 33.66), (3, 30.39), (4, 28.42)])
def test_bicubic_upscale_psnr_set5(benchmarks_dir: Path, scale: int, expected: float) -> None:
    psnrs = []
    for _, hr, lr in _hr_lr_pairs(benchmarks_dir, "Set5", scale):
        sr = imresize(lr, scale)
        assert sr.shape == hr.shape and sr.dtype == np.uint8
        psnrs.append(_y_psnr(sr, hr, border=scale))
    assert len(psnrs) == 5
    assert abs(np.mean(psnrs) - expected) < 0.05


@pytest.mark.parametrize(
    ("image", "kwargs"),
    [
        (np.zeros((8, 8), np.uint8), {}),
        (np.zeros((8, 8), np.uint8), {"scale": 0.5, "output_shape": (4, 4)}),
        (np.zeros((8, 8), np.uint8), {"scale": 0.0}),
        (np.zeros((8, 8), np.uint8), {"scale": -2.0}),
        (np.zeros((8, 8), np.uint8), {"scale": float("nan")}),
        (np.zeros((8, 8), np.uint8), {"output_shape": (0, 4)}),
        (np.zeros((8, 8), np.uint8), {"output_shape": (4, -1)}),
        (np.zeros((8, 8), np.uint8), {"output_shape": (4, 4, 3)}),
        (np.zeros((8, 8), np.uint8), {"output_shape": (4.5, 4)}),
        (np.zeros(8, np.uint8), {"scale": 2.0}),
        (np.zeros((2, 8, 8, 3), np.uint8), {"scale": 2.0}),
        (np.zeros((0, 8), np.uint8), {"scale": 2.0}),
        (np.zeros((8, 8), np.int32), {"scale": 2.0}),
    ],
)
def test_bad_arguments_raise(image: np.ndarray, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        imresize(image, **kwargs)
