"""The quality gate's measures: whether an upscale is consistent with its input.

PAN breaks on noise and fine patterns (uniform or strong Gaussian noise, salt and pepper, a 1-px
checkerboard): its output clamps to garbage that no longer averages back to the input, or carries
pixel-scale patterns an upscaler never makes on its own. Two measures catch it, both computed at
the input's size or cheaper, so that the gate costs a fraction of the model's CPU:

- ``psnr_vs_input``: the output shrunk back to the input's size with a box filter (the mean of each
  s x s block) against the input, PSNR in dB over every channel with the dtype's peak. A faithful
  upscale averages back to its input: photos score 36.6 dB or more at x2-x4, PAN's breakages
  19.3 dB or less (benchmarks/quality_gate.py, benchmarks/README.md "quality gate").
- ``pattern_levels``: the RMS of the output's finest diagonal detail, ``(a - b - c + d) / 4`` over
  its 2 x 2 blocks, in 8-bit levels. A pattern with zero mean in every block vanishes in a box
  filter; this is where it shows. Photos measure 4.2 levels at most, σ25 noise (which PAN handles)
  4.5, its breakages 17.6 or more, a photo with a ±48 checkerboard added 34.8 or more.

Flag an output when ``psnr_vs_input`` is below ``MIN_PSNR_VS_INPUT`` or ``pattern_levels`` above
``MAX_PATTERN_LEVELS``. On 162 cases (117 photo outputs and 45 breakage and noise runs at x2-x4)
this flags exactly what the former gate (PSNR against a bicubic upscale under 15 dB) flagged, with
wider margins, for 3.9-4.2 CPU-ms per output megapixel instead of 14.6-14.9. Alpha is not judged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Between the worst breakage (σ64 noise at x2: 19.3 dB) and σ25 noise, which passes (29.1 dB or
# more), and 12.6 dB under the worst photo (butterfly x4: 36.6 dB).
MIN_PSNR_VS_INPUT = 24.0
# Above film grain of σ30 added to a photo (15 levels at most) and σ25 noise (4.5), under every
# breakage (17.6 at least, where its PSNR flags it too; 24.6 otherwise) and a ±48 checkerboard (34.8).
MAX_PATTERN_LEVELS = 20.0


@dataclass(frozen=True)
class GateScore:
    psnr_vs_input: float  # dB; inf when the output averages back to the input exactly
    pattern_levels: float  # 8-bit levels, whatever the dtype

    def suspect(self, min_psnr: float | None, max_levels: float | None) -> str | None:
        """Why the output is suspect under these limits (None: a limit not applied), or None."""
        if min_psnr is not None and self.psnr_vs_input < min_psnr:
            psnr = f"{self.psnr_vs_input:.1f} dB"
            return f"it averages back to its input at {psnr}, under --min-psnr-vs-input {min_psnr:g}"
        if max_levels is not None and self.pattern_levels > max_levels:
            levels = f"{self.pattern_levels:.1f} levels"
            return f"it holds a pixel pattern of {levels}, over --max-pattern-levels {max_levels:g}"
        return None


def gate_score(source: np.ndarray, output: np.ndarray) -> GateScore:
    """The measures of ``output``, an upscale of ``source`` (same layout and dtype: HxW or HxWx3,
    uint8 or uint16) by a whole factor, as the engine makes them."""
    scale = output.shape[0] // source.shape[0]
    if output.shape[:2] != (source.shape[0] * scale, source.shape[1] * scale) or output.dtype != source.dtype:
        raise ValueError(
            f"{output.shape} {output.dtype} is no whole-factor upscale of {source.shape} {source.dtype}"
        )
    return GateScore(_psnr_vs_input(source, output, scale), _pattern_levels(output))


def _psnr_vs_input(source: np.ndarray, output: np.ndarray, scale: int) -> float:
    peak = float(np.iinfo(output.dtype).max)
    if output.dtype == np.uint8:  # Pillow's box reduction, in C: 1.2-1.8 ms per output megapixel
        small = np.asarray(Image.fromarray(output).reduce(scale), dtype=np.float32)
    else:  # 16-bit (Pillow holds no 16-bit colour): exact integer block sums
        h, w = source.shape[:2]
        rest = output.shape[2:]
        rows = output.reshape(h, scale, w * scale, *rest).sum(axis=1, dtype=np.int64)
        small = (rows.reshape(h, w, scale, *rest).sum(axis=2) / (scale * scale)).astype(np.float32)
    error = (small - source).ravel()
    mse = float(np.dot(error, error)) / error.size
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def _pattern_levels(output: np.ndarray) -> float:
    """RMS of ``(a - b - c + d) / 4`` over the output's 2 x 2 blocks, in 8-bit levels: row pairs'
    differences first (int16 or int32, no overflow), then those of neighbouring columns."""
    height, width = output.shape[0] // 2 * 2, output.shape[1] // 2 * 2
    if not (height and width):
        return 0.0
    channels = 1 if output.ndim == 2 else output.shape[2]
    peak = float(np.iinfo(output.dtype).max)
    wide = np.int16 if output.dtype == np.uint8 else np.int32
    pairs = output[:height, :width].reshape(height // 2, 2, width * channels)
    rows = np.subtract(pairs[:, 0], pairs[:, 1], dtype=wide).reshape(-1, width // 2, 2 * channels)
    detail = np.subtract(rows[..., :channels], rows[..., channels:], dtype=np.float32).ravel()
    return float(np.sqrt(np.dot(detail, detail) / detail.size)) / 4 * 255.0 / peak
