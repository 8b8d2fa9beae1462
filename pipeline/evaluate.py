"""Paper-protocol evaluation of an Upscaler on a benchmark set, with the bicubic baseline.

Data sources (``load_benchmark``):
- a folder in the usual layout: ``HR/<name>.<ext>`` and, when present,
  ``LR_bicubic/X{s}/<name>x{s}.<ext>`` (otherwise LR is made with the MATLAB bicubic ``imresize``
  from HR cropped to a multiple of the scale);
- anything Hugging Face ``datasets`` loads (a hub id, a Parquet file or folder, an imagefolder)
  with an ``hr`` image column (``image`` is accepted for imagefolders) and an optional ``lr`` one.

Protocol: see ``pipeline.metrics``. Images are scored as RGB (grayscale replicated, as the authors'
OpenCV-based code reads them); PAN outputs are rounded to uint8; ``scale`` pixels are cropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engine import Upscaler
from pipeline.errors import DatasetError, InvalidImageError
from pipeline.imaging import decode_image, imresize
from pipeline.metrics import psnr_y, ssim_y

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
FORMS_THAT_WORK = (
    "a folder with HR/ (and optionally LR_bicubic/X{s}/), a Parquet file or folder, an imagefolder, "
    "or a hub dataset stored as Parquet with an 'hr' image column (optional 'lr')"
)


@dataclass(frozen=True)
class BenchmarkPair:
    """One test image: HR cropped to a multiple of the scale, and its LR; both HxWx3 uint8."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


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


def as_rgb8(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: grayscale replicated, 16-bit rounded down to 8 bits."""
    if pixels.dtype == np.uint16:
        pixels = np.rint(pixels / 257.0).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def make_pair(name: str, hr: np.ndarray, lr: np.ndarray | None, scale: int) -> BenchmarkPair:
    """Crop HR, make LR with MATLAB bicubic when absent, and check the sizes agree."""
    hr = crop_to_multiple(as_rgb8(hr), scale)
    lr = imresize(hr, 1.0 / scale) if lr is None else as_rgb8(lr)
    if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
        raise DatasetError(
            f"{name}: LR is {lr.shape[1]}x{lr.shape[0]}, which is not HR "
            f"{hr.shape[1]}x{hr.shape[0]} divided by {scale}"
        )
    return BenchmarkPair(name, hr, lr)


def _decode_file(path: Path) -> np.ndarray:
    try:
        return decode_image(path.read_bytes(), name=str(path)).pixels
    except InvalidImageError as exc:
        raise DatasetError(str(exc)) from exc


def _folder_pairs(root: Path, scale: int) -> Iterator[BenchmarkPair]:
    hr_files = sorted(p for p in (root / "HR").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not hr_files:
        raise DatasetError(f"{root / 'HR'} holds no images")
    lr_dir = root / "LR_bicubic" / f"X{scale}"
    for hr_path in hr_files:
        lr_path = None
        if lr_dir.is_dir():
            candidates = [lr_dir / f"{hr_path.stem}x{scale}{hr_path.suffix}", lr_dir / hr_path.name]
            lr_path = next((c for c in candidates if c.is_file()), None)
            if lr_path is None:
                raise DatasetError(f"{lr_dir} has no LR image for {hr_path.name}")
        lr = _decode_file(lr_path) if lr_path else None
        yield make_pair(hr_path.stem, _decode_file(hr_path), lr, scale)


def _load_hf(source: str, split: str | None) -> Any:
    """A ``datasets.Dataset`` from a hub id, a Parquet file/folder or an imagefolder."""
    import datasets

    path = Path(source)
    try:
        if path.is_file() and path.suffix == ".parquet":
            loaded = datasets.load_dataset("parquet", data_files=str(path), split=split)
        else:
            loaded = datasets.load_dataset(source, split=split)
    except Exception as exc:
        text = str(exc)
        if "scripts are no longer supported" in text or re.search(r"\bfound \S+\.py\b", text):
            raise DatasetError(
                f"{source} is a loading-script dataset, which `datasets` 4 and later refuse to run; "
                f"use {FORMS_THAT_WORK}"
            ) from exc
        raise DatasetError(
            f"cannot load dataset {source}: {text.splitlines()[0] if text else exc!r}"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        for preferred in ("test", "validation", "train"):
            if preferred in loaded and (len(loaded) == 1 or preferred != "train"):
                return loaded[preferred]
        raise DatasetError(f"{source} has splits {sorted(loaded)}; choose one with --split")
    return loaded


def _hf_pairs(source: str, scale: int, split: str | None) -> Iterator[BenchmarkPair]:
    import datasets

    ds = _load_hf(source, split)
    hr_col = "hr" if "hr" in ds.column_names else "image" if "image" in ds.column_names else None
    if hr_col is None:
        raise DatasetError(f"{source} has no 'hr' column (columns: {ds.column_names}); use {FORMS_THAT_WORK}")
    lr_col = "lr" if "lr" in ds.column_names else None
    for col in filter(None, (hr_col, lr_col)):
        if not isinstance(ds.features[col], datasets.Image):
            raise DatasetError(
                f"column '{col}' of {source} holds {ds.features[col]}, not images (a Parquet export "
                f"of a loading-script dataset keeps only file paths); use {FORMS_THAT_WORK}"
            )
        ds = ds.cast_column(col, datasets.Image(decode=False))  # our decoder, our mode rules
    for index, row in enumerate(ds):
        hr = row[hr_col]
        name = Path(hr.get("path") or "").stem or f"{index:04d}"
        lr = _decode_cell(row[lr_col], name) if lr_col else None
        yield make_pair(name, _decode_cell(hr, name), lr, scale)


def _decode_cell(cell: dict[str, Any], name: str) -> np.ndarray:
    data = cell.get("bytes")
    if data is None and cell.get("path"):
        data = Path(cell["path"]).read_bytes()
    try:
        return decode_image(data or b"", name=name).pixels
    except InvalidImageError as exc:
        raise DatasetError(str(exc)) from exc


def load_benchmark(source: str, scale: int, *, split: str | None = None) -> tuple[str, list[BenchmarkPair]]:
    """(dataset name, pairs) for a benchmark folder or a ``datasets``-loadable source."""
    path = Path(source)
    if (path / "HR").is_dir():
        return path.name, list(_folder_pairs(path, scale))
    if path.is_dir() and not any(path.iterdir()):
        raise DatasetError(f"{source} is empty")
    pairs = list(_hf_pairs(source, scale, split))
    if not pairs:
        raise DatasetError(f"{source} holds no images")
    return path.stem if path.exists() else source, pairs


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
