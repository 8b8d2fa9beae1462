"""Paper-protocol evaluation of an Upscaler on a benchmark set, with the bicubic baseline.

Data comes from ``pipeline.io.pairs`` (``load_benchmark``, ``open_pairs``: benchmark folders, image
folders and archives, anything ``datasets`` loads); its names used by callers are re-exported here.

Protocol: see ``pipeline.core.metrics``. Images are scored as RGB (grayscale replicated, as the authors'
OpenCV-based code reads them); PAN outputs are rounded to uint8; ``scale`` pixels are cropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.engine import Upscaler
from pipeline.core.metrics import psnr_y, ssim_y
from pipeline.imaging import IMAGE_SUFFIXES, imresize
from pipeline.io.pairs import (
    FORMS_THAT_WORK,
    BenchmarkPair,
    as_rgb8,
    crop_to_multiple,
    load_benchmark,
    make_pair,
)

__all__ = [
    "FORMS_THAT_WORK",
    "IMAGE_SUFFIXES",
    "BenchmarkPair",
    "EvalReport",
    "ImageScore",
    "as_rgb8",
    "crop_to_multiple",
    "evaluate",
    "load_benchmark",
    "make_pair",
    "score_pair",
]


@dataclass(frozen=True)
class ImageScore:
    name: str
    psnr_y: float
    ssim_y: float
    bicubic_psnr_y: float
    bicubic_ssim_y: float


@dataclass
class EvalReport:
    dataset: str
    scale: int
    weights: str | None = None
    images: list[ImageScore] = field(default_factory=list)

    def _mean(self, attr: str) -> float:
        return float(np.mean([getattr(i, attr) for i in self.images])) if self.images else float("nan")

    @property
    def psnr_y(self) -> float:
        return self._mean("psnr_y")

    @property
    def ssim_y(self) -> float:
        return self._mean("ssim_y")

    @property
    def bicubic_psnr_y(self) -> float:
        return self._mean("bicubic_psnr_y")

    @property
    def bicubic_ssim_y(self) -> float:
        return self._mean("bicubic_ssim_y")

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "scale": self.scale,
            "weights": self.weights,
            "psnr_y": self.psnr_y,
            "ssim_y": self.ssim_y,
            "bicubic": {"psnr_y": self.bicubic_psnr_y, "ssim_y": self.bicubic_ssim_y},
            "images": [
                {
                    "name": i.name,
                    "psnr_y": i.psnr_y,
                    "ssim_y": i.ssim_y,
                    "bicubic": {"psnr_y": i.bicubic_psnr_y, "ssim_y": i.bicubic_ssim_y},
                }
                for i in self.images
            ],
        }


def score_pair(upscaler: Upscaler, pair: BenchmarkPair) -> tuple[ImageScore, np.ndarray, np.ndarray]:
    """Scores for one image, with the PAN and bicubic outputs (HxWx3 uint8) for pictures."""
    s = upscaler.scale
    sr = upscaler.upscale(pair.lr)
    bicubic = imresize(pair.lr, float(s))
    score = ImageScore(
        pair.name,
        psnr_y(sr, pair.hr, crop=s),
        ssim_y(sr, pair.hr, crop=s),
        psnr_y(bicubic, pair.hr, crop=s),
        ssim_y(bicubic, pair.hr, crop=s),
    )
    return score, sr, bicubic


def evaluate(
    upscaler: Upscaler,
    dataset: str,
    pairs: list[BenchmarkPair],
    *,
    on_image: Callable[[BenchmarkPair, ImageScore, np.ndarray, np.ndarray], None] | None = None,
) -> EvalReport:
    """Score every pair; ``on_image`` sees each result (progress, comparison pictures)."""
    info = upscaler.weights_info
    report = EvalReport(dataset, upscaler.scale, weights=info.id if info else None)
    for pair in pairs:
        score, sr, bicubic = score_pair(upscaler, pair)
        report.images.append(score)
        if on_image:
            on_image(pair, score, sr, bicubic)
    return report
