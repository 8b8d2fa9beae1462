"""What evaluation and comparison runs show people: a Markdown table like the model card's, and
side-by-side pictures (bicubic | PAN | HR) labelled with PSNR."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.evaluation.scoring import EvalReport

LABEL_HEIGHT = 28
GAP = 8


def markdown_table(reports: Sequence[EvalReport], model_name: str = "pan") -> str:
    """|Dataset|Scale|Bicubic|pan| rows of PSNR_Y/SSIM_Y, as on the super-image model card."""
    lines = [f"|Dataset|Scale|Bicubic|{model_name}|", "|---|---|---|---|"]
    for r in reports:
        lines.append(
            f"|{r.dataset}|{r.scale}x|{r.bicubic_psnr_y:.2f}/{r.bicubic_ssim_y:.4f}"
            f"|**{r.psnr_y:.2f}/{r.ssim_y:.4f}**|"
        )
    return "\n".join(lines)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def comparison_picture(panels: Sequence[tuple[str, np.ndarray]]) -> Image.Image:
    """Panels of equal size side by side, each with its label underneath, on white.

    ``panels``: (label, HxWx3 or HxW uint8) pairs, e.g. ("Bicubic 30.40 dB", ...).
    """
    if not panels:
        raise ValueError("nothing to compare")
    shapes = {p.shape[:2] for _, p in panels}
    if len(shapes) != 1:
        raise ValueError(f"panels differ in size: {sorted(shapes)}")
    (h, w), n = shapes.pop(), len(panels)
    canvas = Image.new("RGB", (n * w + (n - 1) * GAP, h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(max(12, min(18, w // 14)))
    for i, (label, pixels) in enumerate(panels):
        x = i * (w + GAP)
        canvas.paste(Image.fromarray(pixels).convert("RGB"), (x, 0))
        text_w = draw.textlength(label, font=font)
        draw.text((x + max(0, (w - text_w) / 2), h + 5), label, fill="black", font=font)
    return canvas
