"""PSNR and SSIM on the Y channel, under the convention of the PAN paper's test code.

Conventions (kept by every function here):
- Images are H x W x 3 RGB or H x W grayscale, on the 0..255 scale (uint8, or float already
  rounded to uint8 levels); super-resolved outputs are clamped and rounded to uint8 before scoring.
- Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, kept as float64 (grayscale counts as R=G=B).
- ``crop`` pixels (the scale) are removed from every side of both images before scoring.
- PSNR = 20 log10(255 / sqrt(MSE)) in float64.
- SSIM as MATLAB's reference code: 11x11 Gaussian window (sigma 1.5), 'valid' filtering,
  C1 = (0.01*255)^2, C2 = (0.03*255)^2, mean of the SSIM map.
"""

from __future__ import annotations

import numpy as np

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """H x W x 3 (or H x W gray) on 0..255 -> H x W float64 luma Y in [16, 235]."""
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 2:
        return 16.0 + pixels * _Y_WEIGHTS.sum()
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected HxWx3 or HxW, got shape {pixels.shape}")
    return 16.0 + pixels @ _Y_WEIGHTS


def _prepare(sr: np.ndarray, hr: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    if sr.shape[:2] != hr.shape[:2]:
        raise ValueError(f"images differ in size: {sr.shape[:2]} vs {hr.shape[:2]}")
    if crop < 0 or 2 * crop >= min(sr.shape[:2]):
        raise ValueError(f"crop {crop} leaves nothing of a {sr.shape[0]}x{sr.shape[1]} image")
    window = np.s_[crop : sr.shape[0] - crop, crop : sr.shape[1] - crop] if crop else np.s_[:, :]
    return rgb_to_y(sr)[window], rgb_to_y(hr)[window]


def psnr_y(sr: np.ndarray, hr: np.ndarray, *, crop: int) -> float:
    """PSNR in dB between the Y channels; inf for identical images."""
    a, b = _prepare(sr, hr, crop)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(20.0 * np.log10(255.0 / np.sqrt(mse)))


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation with the outer product of ``kernel`` with itself."""
    n = len(kernel)
    h, w = image.shape
    rows = sum(kernel[i] * image[i : h - n + 1 + i, :] for i in range(n))
    return sum(kernel[j] * rows[:, j : w - n + 1 + j] for j in range(n))


def ssim_y(sr: np.ndarray, hr: np.ndarray, *, crop: int) -> float:
    """MATLAB-style SSIM between the Y channels (needs at least 11x11 pixels after the crop)."""
    a, b = _prepare(sr, hr, crop)
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {a.shape}")
    k = _gaussian_1d()
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    var_a = _filter_valid(a * a, k) - mu_a**2
    var_b = _filter_valid(b * b, k) - mu_b**2
    cov = _filter_valid(a * b, k) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + _C1) * (2 * cov + _C2)) / (
        (mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2)
    )
    return float(ssim_map.mean())
