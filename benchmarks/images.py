"""Where the benchmarks' data lies (``SHARED``: ``../shared``, or ``PAN_SHARED``, the variable the
tests read too), and the benchmark images that are made, not read as they are (``peer.py``,
``allocator.py``)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

SHARED = Path(os.environ.get("PAN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
HD_SOURCE = "monarch.png"  # Set14 HR image the 1920x1080-output workload is made from
HD_LR_SIZE = (480, 270)  # width, height


def rgb(path: Path) -> Image.Image:
    """An image file as RGB (Set14's bridge.png is grayscale: run as R = G = B)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def hd_lr(shared: Path) -> Image.Image:
    """One LR image of 480x270, whose x4 output is 1920x1080: ``monarch.png`` centre-cropped to
    16:9, then Pillow bicubic."""
    hr = rgb(shared / "benchmarks" / "Set14" / "HR" / HD_SOURCE)
    width, height = HD_LR_SIZE
    crop_h = hr.width * height // width
    top = (hr.height - crop_h) // 2
    return hr.crop((0, top, hr.width, top + crop_h)).resize(HD_LR_SIZE, Image.BICUBIC)
