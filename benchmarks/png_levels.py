"""PNG encoding cost and size at every zlib level, on PAN's real outputs (Set14 + Set5 LR upscaled).

Prints, per level, the milliseconds per image of ``encode_image(..., png_compress_level=L)`` and the
encoded size relative to the raw pixels: the trade-off behind ``UpscaleJob.png_compress_level``.
Beside it, in the same rounds, Pillow's PNG writer at the same level (all five row filters tried,
zlib's default strategy: how the pipeline wrote PNGs before it chose imagecodecs).

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

    import io

    from PIL import Image, features

    from pipeline.core.engine import Upscaler
    from pipeline.imaging import decode_image, encode_image
    from pipeline.io.weights import load_pretrained

    upscaler = Upscaler(load_pretrained(str(weights), scale=args.scale), device="cpu")
    outputs = []
    for f in files:
        image = decode_image(f.read_bytes(), name=f.name)
        outputs.append(replace(image, pixels=upscaler.upscale(image.pixels)))
    raw = sum(o.pixels.nbytes for o in outputs)
    megapixels = sum(o.pixels.shape[0] * o.pixels.shape[1] for o in outputs) / 1e6
    zlib_ng = features.check_feature("zlib_ng") if "zlib_ng" in features.get_supported_features() else False
    print(f"x{args.scale} outputs of {len(files)} images ({megapixels:.1f} MP); Pillow zlib-ng: {zlib_ng}")

    def pillow(image, level: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image.pixels).save(buffer, "PNG", compress_level=level)
        return buffer.getvalue()

    def ours(image, level: int) -> bytes:
        return encode_image(image, "png", png_compress_level=level)

    print("level  ms/image  size/raw  | Pillow: ms/image  size/raw")
    for level in range(10):
        best, size = {ours: float("inf"), pillow: float("inf")}, {}
        for _ in range(args.repeat):
            for encode in best:  # interleaved, so that a noisy moment hits both
                start = time.perf_counter()
                size[encode] = sum(len(encode(o, level)) for o in outputs)
                best[encode] = min(best[encode], time.perf_counter() - start)
        line = [f"{best[e] / len(outputs) * 1e3:8.1f}  {size[e] / raw:8.3f}" for e in (ours, pillow)]
        print(f"{level:5d}  {line[0]}  |         {line[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
