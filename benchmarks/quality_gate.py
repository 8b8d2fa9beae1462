"""Where the quality gate's limits come from, and what it costs: ``pipeline.imaging.gate`` on PAN's
outputs of real photos (Set5, Set14 and the first 20 BSDS200 images, from ``../shared``) and of
inputs PAN is known to break on (noise, salt-and-pepper, a 1-px checkerboard: seeds 0 and 1 at
96 px, seed 2 at 160 px), at each scale, beside the gate it replaced (PSNR against a bicubic
upscale of the input, at the output's size, flagged under 15 dB; written out below as it was).

Prints, per scale: the photos' lowest ``psnr_vs_input`` and highest ``pattern_levels``; each
synthetic case's measures and both gates' decisions (σ25 noise is no breakage: PAN handles it);
how many cases the two gates decide differently (must be 0); and the CPU-ms per output megapixel
of each gate on the photos (best of 3, one thread).

Usage::

    .venv/bin/python benchmarks/quality_gate.py [--scales 2 3 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from images import SHARED  # benchmarks/images.py
from PIL import Image

FORMER_MIN_PSNR_VS_BICUBIC = 15.0
BREAKAGES = ("uniform noise", "gaussian noise sigma 64", "salt and pepper", "1-px checkerboard")


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


def former_psnr_vs_bicubic(source: np.ndarray, output: np.ndarray) -> float:
    """The former gate's measure: the output against Pillow's bicubic upscale of its input."""
    height, width = output.shape[:2]
    peak = float(np.iinfo(output.dtype).max)
    sources = source[..., None] if source.ndim == 2 else source
    outputs = output[..., None] if output.ndim == 2 else output
    squares = 0.0
    for c in range(sources.shape[2]):
        plane = Image.fromarray(sources[..., c].astype(np.float32), "F").resize(
            (width, height), Image.BICUBIC
        )
        error = np.clip(np.asarray(plane), 0, peak)
        error -= outputs[..., c]
        squares += float(np.dot(error.ravel(), error.ravel()))
    mse = squares / output.size
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def _cpu_ms_per_mp(measure, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    megapixels = sum(o.shape[0] * o.shape[1] for _, o in pairs) / 1e6
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for source, output in pairs:
            measure(source, output)
        best = min(best, time.process_time() - start)
    return best / megapixels * 1e3


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipeline.core.engine import Upscaler
    from pipeline.imaging import decode_image
    from pipeline.imaging.gate import MAX_PATTERN_LEVELS, MIN_PSNR_VS_INPUT, gate_score
    from pipeline.io.weights import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", choices=(2, 3, 4), default=[2, 3, 4])
    args = parser.parse_args(argv)
    if not (SHARED / "weights").is_dir() or not (SHARED / "train/BSDS200").is_dir():
        print(f"SKIPPED: needs {SHARED}/weights, benchmarks and train/BSDS200 (set PAN_SHARED)")
        return 0
    torch.set_num_threads(1)

    def flagged(score) -> bool:
        return score.suspect(MIN_PSNR_VS_INPUT, MAX_PATTERN_LEVELS) is not None

    print(f"gate: psnr_vs_input < {MIN_PSNR_VS_INPUT} dB or pattern_levels > {MAX_PATTERN_LEVELS}; "
          f"former: psnr_vs_bicubic < {FORMER_MIN_PSNR_VS_BICUBIC} dB")  # fmt: skip
    disagreements = cases = 0
    for scale in args.scales:
        model = load_pretrained(str(SHARED / "weights" / f"PANx{scale}_DF2K.pth"), scale=scale)
        upscaler = Upscaler(model, device="cpu", precision="fp32", tile=0)
        paths = sorted((SHARED / "benchmarks").glob(f"Set*/LR_bicubic/X{scale}/*.png"))
        paths += sorted((SHARED / "train" / "BSDS200").iterdir())[:20]
        photos = []
        for path in paths:
            pixels = decode_image(path.read_bytes()).pixels
            photos.append((pixels, upscaler.upscale(pixels)))
        scores = [gate_score(s, o) for s, o in photos]
        former = [former_psnr_vs_bicubic(s, o) for s, o in photos]
        cases += len(photos)
        disagreements += sum(
            flagged(g) != (f < FORMER_MIN_PSNR_VS_BICUBIC) for g, f in zip(scores, former, strict=True)
        )
        lowest, highest = min(g.psnr_vs_input for g in scores), max(g.pattern_levels for g in scores)
        print(f"x{scale} photos ({len(photos)}): psnr_vs_input min {lowest:.1f} dB, pattern_levels max "
              f"{highest:.1f}; flagged {sum(map(flagged, scores))}, former flagged "
              f"{sum(f < FORMER_MIN_PSNR_VS_BICUBIC for f in former)}")  # fmt: skip
        for seed, size in ((0, 96), (1, 96), (2, 160)):
            for name, pixels in synthetic(np.random.default_rng(seed), size).items():
                output = upscaler.upscale(pixels)
                score, before = gate_score(pixels, output), former_psnr_vs_bicubic(pixels, output)
                cases += 1
                disagreements += flagged(score) != (before < FORMER_MIN_PSNR_VS_BICUBIC)
                expected = name in BREAKAGES
                said = ("flagged" if flagged(score) else "passes") + (
                    "" if flagged(score) == expected else " (WRONG)"
                )
                print(f"  x{scale} {name}, seed {seed}, {size} px: psnr_vs_input "
                      f"{score.psnr_vs_input:.1f} dB, pattern {score.pattern_levels:.1f} -> {said}; "
                      f"former {before:.1f} dB")  # fmt: skip
        now, then = _cpu_ms_per_mp(gate_score, photos), _cpu_ms_per_mp(former_psnr_vs_bicubic, photos)
        ratio = then / now
        cost = f"{now:.1f} CPU-ms per output MP, former {then:.1f} ({ratio:.1f}x)"
        print(f"x{scale} gate cost on the photos: {cost}")
    print(f"decisions that differ from the former gate's: {disagreements} of {cases}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
