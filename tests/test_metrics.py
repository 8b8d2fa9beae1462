import numpy as np
import pytest

from pipeline.core.metrics import psnr_y, rgb_to_y, ssim_y
from pipeline.imaging import decode_image


def _gradient(h=64, w=80):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 3 % 256, y * 4 % 256, (x + y) * 2 % 256], axis=2).astype(np.uint8)


def test_y_channel_formula():
    assert rgb_to_y(np.array([[[0, 0, 0]]]))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.array([[[255, 255, 255]]]))[0, 0] == pytest.approx(235.0)
    gray = np.array([[10, 200]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(gray), rgb_to_y(np.repeat(gray[..., None], 3, axis=2)))


def test_identical_images():
    img = _gradient()
    assert psnr_y(img, img, crop=2) == float("inf")
    assert ssim_y(img, img, crop=2) == pytest.approx(1.0)


def test_psnr_of_a_known_offset():
    img = _gradient().astype(np.float64)
    # A uniform Y offset of d gives PSNR = 20 log10(255 / d).
    shifted = img + 255.0 / (65.481 + 128.553 + 24.966)  # Y moves by exactly 1
    assert psnr_y(shifted, img, crop=0) == pytest.approx(20 * np.log10(255.0))


def test_crop_removes_the_border():
    a = _gradient()
    b = a.copy()
    b[:3] = 0  # damage only the top 3 rows
    assert psnr_y(b, a, crop=3) == float("inf")
    assert psnr_y(b, a, crop=2) < 40


def test_ssim_drops_with_blur(benchmarks_dir):
    hr = decode_image((benchmarks_dir / "Set5/HR/butterfly.png").read_bytes()).pixels
    blurred = ((hr[:-1, :-1].astype(int) + hr[1:, 1:]) // 2).astype(np.uint8)
    assert 0.5 < ssim_y(blurred, hr[:-1, :-1], crop=2) < 0.99


def test_bad_input():
    with pytest.raises(ValueError, match="differ"):
        psnr_y(_gradient(10, 10), _gradient(10, 12), crop=0)
    with pytest.raises(ValueError, match="crop"):
        psnr_y(_gradient(10, 10), _gradient(10, 10), crop=5)
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(_gradient(20, 20), _gradient(20, 20), crop=5)
