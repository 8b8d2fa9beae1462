"""The lossless writers for PAN's outputs: speed (output megapixels per CPU-second, one thread) and
size, against libpng at zlib level 1 (the writer before fpng), with a bit-exact round trip checked
for each file. What ``png_compress_level: fast`` (the default) and ``jxl`` cost and save.

Workloads: PAN's real x2 and x4 outputs of Set5 + Set14 LR (RGB; Set14's gray bridge is left
out: gray PNGs stay on libpng), and the x4 outputs of the first ``--photos`` BSDS200 photos
(camera JPEGs: smooth upscales, where fpng's files grow most).

Usage::

    .venv/bin/python benchmarks/png_writers.py [--repeat 3] [--photos 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from images import SHARED  # benchmarks/images.py

TARGET_SPEED, TARGET_SIZE = 6.0, 1.3  # the default PNG writer against libpng level 1 (issue 26)


def outputs(scale: int, paths: list) -> list[np.ndarray]:
    from pipeline.core.engine import Upscaler
    from pipeline.imaging import decode_image
    from pipeline.io.weights import load_pretrained

    upscaler = Upscaler(
        load_pretrained(str(SHARED / f"weights/PANx{scale}_DF2K.pth"), scale=scale), device="cpu"
    )
    images = [decode_image(p.read_bytes(), name=p.name).pixels for p in paths]
    return [upscaler.upscale(pixels) for pixels in images if pixels.ndim == 3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per writer (best is shown)")
    parser.add_argument("--photos", type=int, default=8, help="BSDS200 photos in the third workload")
    args = parser.parse_args(argv)
    lr = {s: sorted(SHARED.glob(f"benchmarks/Set*/LR_bicubic/X{s}/*.png")) for s in (2, 4)}
    photos = sorted((SHARED / "train/BSDS200").glob("*"))[: args.photos]
    if not (lr[2] and lr[4] and photos):
        print(f"SKIPPED: needs {SHARED}/benchmarks/Set5, Set14, train/BSDS200 and weights (set PAN_SHARED)")
        return 0

    import imagecodecs
    import torch

    from pipeline.imaging import DecodedImage, decode_image, encode_image

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: the job runs one encode per core
    torch.set_num_threads(1)
    workloads = {"x2 Set5+Set14": outputs(2, lr[2]), "x4 Set5+Set14": outputs(4, lr[4]),
                 f"x4 BSDS200 x{len(photos)}": outputs(4, photos)}  # fmt: skip
    writers = {
        "libpng level 1": lambda image: encode_image(image, "png", png_compress_level=1),
        "png fast (default)": lambda image: encode_image(image, "png"),
        "JPEG XL lossless e1": lambda image: encode_image(image, "jxl"),
    }
    decoders = {"JPEG XL lossless e1": imagecodecs.jpegxl_decode}
    print(f"one core, best of {args.repeat}; fpng {_version('fpng')}, imagecodecs {imagecodecs.__version__}")
    print(
        "| workload | writer | output MP per CPU-s | vs libpng L1 | size / libpng L1 | size / raw | exact |"
    )
    print("|---|---|---|---|---|---|---|")
    verdict = []
    for label, arrays in workloads.items():
        images = [DecodedImage(a, None, "RGB", None) for a in arrays]
        megapixels = sum(a.shape[0] * a.shape[1] for a in arrays) / 1e6
        raw = sum(a.nbytes for a in arrays)
        speed, size, exact = {}, {}, {}
        for _ in range(args.repeat):
            for name, write in writers.items():  # interleaved: a noisy moment hits every writer
                start = time.process_time()
                encoded = [write(image) for image in images]
                speed[name] = max(speed.get(name, 0.0), megapixels / (time.process_time() - start))
                size[name] = sum(len(e) for e in encoded)
                decode = decoders.get(name, lambda data: decode_image(data).pixels)
                exact[name] = all(np.array_equal(decode(e), a) for e, a in zip(encoded, arrays, strict=True))
        base = "libpng level 1"
        for name in writers:
            cells = [f"{label} ({megapixels:.1f} MP)", name, f"{speed[name]:.0f}",
                     f"{speed[name] / speed[base]:.2f}x", f"{size[name] / size[base]:.3f}",
                     f"{size[name] / raw:.3f}", "yes" if exact[name] else "NO"]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
        fast = "png fast (default)"
        verdict.append((label, speed[fast] / speed[base], size[fast] / size[base]))
    for label, ratio, grown in verdict:
        met = "met" if ratio >= TARGET_SPEED and grown <= TARGET_SIZE else "NOT met"
        print(f"{label}: default PNG writer {ratio:.2f}x the speed at {grown:.3f}x the size "
              f"(target >= {TARGET_SPEED}x, <= {TARGET_SIZE}x): {met}")  # fmt: skip
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
