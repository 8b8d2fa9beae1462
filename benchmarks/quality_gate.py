"""Where the quality gate's threshold comes from: ``upscale.psnr_vs_bicubic`` of PAN's outputs on
real photos (Set5, Set14 and the first 20 BSDS200 images, from ``../shared``) and on inputs PAN is
known to break on (noise, salt-and-pepper, a 1-px checkerboard), at each scale.

Prints one line per group (min / 5th percentile / median for photos) and per synthetic input; the
default ``--min-psnr-vs-bicubic`` must sit between the photos' minimum and the breakages' maximum.

Usage::

    .venv/bin/python benchmarks/quality_gate.py [--scales 2 4]
"""

from __future__ import annotations

import argparse

import numpy as np
from images import SHARED  # benchmarks/images.py


def synthetic(rng: np.random.Generator, size: int = 96) -> dict[str, np.ndarray]:
    shape = (size, size, 3)
    checker = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    return {
        "uniform noise": rng.integers(0, 256, shape, dtype=np.uint8),
        "gaussian noise sigma 64": np.clip(128 + 64 * rng.standard_normal(shape), 0, 255).astype(np.uint8),
        "gaussian noise sigma 25": np.clip(128 + 25 * rng.standard_normal(shape), 0, 255).astype(np.uint8),
        "salt and pepper": ((rng.random((size, size)) < 0.5) * 255).astype(np.uint8).repeat(3).reshape(shape),
        "1-px checkerboard": np.repeat(checker[..., None], 3, axis=2),
    }


def main(argv: list[str] | None = None) -> int:
    from pipeline.batch.stages import psnr_vs_bicubic
    from pipeline.config.settings import UpscaleJob
    from pipeline.core.engine import Upscaler
    from pipeline.imaging import decode_image, upscale_image
    from pipeline.io.weights import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", choices=(2, 3, 4), default=[2, 4])
    args = parser.parse_args(argv)
    print(f"default --min-psnr-vs-bicubic: {UpscaleJob.model_fields['min_psnr_vs_bicubic'].default} dB")
    for scale in args.scales:
        model = load_pretrained(str(SHARED / "weights" / f"PANx{scale}_DF2K.pth"), scale=scale)
        upscaler = Upscaler(model, device="cpu", tile=0)
        photos = sorted((SHARED / "benchmarks").glob(f"Set*/LR_bicubic/X{scale}/*.png"))
        photos += sorted((SHARED / "train" / "BSDS200").iterdir())[:20]
        values = []
        for path in photos:
            image = decode_image(path.read_bytes())
            values.append(psnr_vs_bicubic(image.pixels, upscale_image(upscaler, image).pixels))
        low, p5, median = min(values), np.percentile(values, 5), np.median(values)
        print(f"x{scale} photos ({len(values)}): min {low:.1f}  p5 {p5:.1f}  median {median:.1f} dB")
        for name, pixels in synthetic(np.random.default_rng(0)).items():
            print(f"x{scale} {name}: {psnr_vs_bicubic(pixels, upscaler.upscale(pixels)):.1f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
