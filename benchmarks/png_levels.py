"""PNG encoding cost and size at every zlib level, on PAN's real outputs (Set14 + Set5 LR upscaled).

Prints, per level, the milliseconds per image of ``encode_image(..., png_compress_level=L)`` and the
encoded size relative to the raw pixels: the trade-off behind ``UpscaleJob.png_compress_level``.

Usage::

    .venv/bin/python benchmarks/png_levels.py [--scale 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from images import SHARED  # benchmarks/images.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, choices=(2, 3, 4), default=4)
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per level (best is shown)")
    args = parser.parse_args(argv)
    weights = SHARED / "weights" / f"PANx{args.scale}_DF2K.pth"
    files = [
        f
        for name in ("Set14", "Set5")
        for f in sorted(SHARED.glob(f"benchmarks/{name}/LR_bicubic/X{args.scale}/*.png"))
    ]
    if not weights.is_file() or not files:
        print(f"SKIPPED: benchmark images or weights not found under {SHARED} (set PAN_SHARED)")
        return 0

    from PIL import features

    from pipeline.engine import Upscaler
    from pipeline.imaging import decode_image, encode_image
    from pipeline.weights import load_pretrained

    upscaler = Upscaler(load_pretrained(str(weights), scale=args.scale), device="cpu")
    outputs = []
    for f in files:
        image = decode_image(f.read_bytes(), name=f.name)
        outputs.append(replace(image, pixels=upscaler.upscale(image.pixels)))
    raw = sum(o.pixels.nbytes for o in outputs)
    megapixels = sum(o.pixels.shape[0] * o.pixels.shape[1] for o in outputs) / 1e6
    zlib_ng = features.check_feature("zlib_ng") if "zlib_ng" in features.get_supported_features() else False
    print(f"x{args.scale} outputs of {len(files)} images ({megapixels:.1f} MP); Pillow zlib-ng: {zlib_ng}")
    print("level  ms/image  size/raw")
    for level in range(10):
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            size = sum(len(encode_image(o, "png", png_compress_level=level)) for o in outputs)
            best = min(best, time.perf_counter() - start)
        print(f"{level:5d}  {best / len(outputs) * 1e3:8.1f}  {size / raw:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
