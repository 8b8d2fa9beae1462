"""pipeline.imaging.gate: the quality gate's measures against their definitions, and its decisions
on PAN's real outputs: photos pass; the inputs PAN breaks on, and a pattern a box filter cannot see,
are flagged."""

import numpy as np
import pytest
from PIL import Image

from pipeline.core.engine import Upscaler
from pipeline.imaging.gate import MAX_PATTERN_LEVELS, MIN_PSNR_VS_INPUT, gate_score
from pipeline.io.weights import load_pretrained


def _pair(benchmarks_dir, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Set14 comic: the LR image and its HR original (cropped to 4x the LR), in ``mode``."""
    with Image.open(benchmarks_dir / "Set14/LR_bicubic/X4/comicx4.png") as lr:
        small = np.asarray(lr.convert("L" if mode.startswith("L") else "RGB"))
    with Image.open(benchmarks_dir / "Set14/HR/comic.png") as hr:
        big = np.asarray(hr.convert("L" if mode.startswith("L") else "RGB"))
    big = np.ascontiguousarray(big[: small.shape[0] * 4, : small.shape[1] * 4])
    if mode.endswith("16"):
        small, big = small.astype(np.uint16) * 257, big.astype(np.uint16) * 257
    return small, big


@pytest.mark.parametrize("mode", ["RGB", "L", "RGB16", "L16"])
def test_the_measures_equal_their_definitions_over_all_channels(benchmarks_dir, mode):
    """Written out in float64 over whole arrays; the gate computes them with Pillow's box filter
    (8-bit) or integer block sums (16-bit), and in int16/int32 row pairs."""
    small, big = _pair(benchmarks_dir, mode)
    peak = float(np.iinfo(big.dtype).max)
    h, w = small.shape[:2]
    blocks = big.astype(np.float64).reshape(h, 4, w, 4, -1).mean(axis=(1, 3)).reshape(small.shape)
    if big.dtype == np.uint8:
        blocks = np.floor(blocks + 0.5)  # Pillow rounds its 8-bit means
    expected_psnr = 10 * np.log10(peak**2 / np.mean((blocks - small) ** 2))
    b = big.astype(np.float64)
    detail = (b[0::2, 0::2] - b[0::2, 1::2] - b[1::2, 0::2] + b[1::2, 1::2]) / 4
    expected_levels = np.sqrt(np.mean(detail**2)) * 255 / peak
    score = gate_score(small, big)
    assert 30 < expected_psnr < 50  # an HR photo averages back to its LR closely, not exactly
    assert score.psnr_vs_input == pytest.approx(expected_psnr, abs=0.05)
    assert score.pattern_levels == pytest.approx(expected_levels, rel=1e-4)
    assert score.suspect(MIN_PSNR_VS_INPUT, MAX_PATTERN_LEVELS) is None


def test_what_is_no_upscale_of_the_input_is_refused():
    with pytest.raises(ValueError, match="no whole-factor upscale"):
        gate_score(np.zeros((10, 10, 3), np.uint8), np.zeros((20, 21, 3), np.uint8))
    with pytest.raises(ValueError, match="no whole-factor upscale"):
        gate_score(np.zeros((10, 10), np.uint8), np.zeros((20, 20), np.uint16))


@pytest.fixture(scope="module")
def pan_x2(weights_dir):
    return Upscaler(
        load_pretrained(str(weights_dir / "PANx2_DF2K.pth"), scale=2), device="cpu", precision="fp32"
    )


def test_photos_pass_and_what_pan_breaks_on_is_flagged(benchmarks_dir, pan_x2):
    """PAN's real outputs at x2 (benchmarks/quality_gate.py has the full study, x2-x4)."""
    for path in sorted((benchmarks_dir / "Set5/LR_bicubic/X2").glob("*.png"))[:3]:
        photo = np.asarray(Image.open(path).convert("RGB"))
        score = gate_score(photo, pan_x2.upscale(photo))
        assert score.psnr_vs_input > 36 and score.pattern_levels < 5, path.name
        assert score.suspect(MIN_PSNR_VS_INPUT, MAX_PATTERN_LEVELS) is None
    rng = np.random.default_rng(0)
    checker = np.repeat((np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None], 3, axis=2)
    for name, broken in [("uniform noise", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                         ("1-px checkerboard", checker)]:  # fmt: skip
        score = gate_score(broken, pan_x2.upscale(broken))
        why = score.suspect(MIN_PSNR_VS_INPUT, MAX_PATTERN_LEVELS)
        assert why is not None, name
        assert score.suspect(None, None) is None  # both checks off: nothing flagged


def test_a_pattern_a_box_filter_cannot_see_is_flagged(benchmarks_dir, pan_x2):
    """±48 levels in a 1-px checkerboard have zero mean in every 2x2 block: the output averages
    back to its input as well as before, and only the pattern measure sees it."""
    photo = np.asarray(Image.open(benchmarks_dir / "Set5/LR_bicubic/X2/birdx2.png").convert("RGB"))
    output = pan_x2.upscale(photo)
    sign = np.where(np.indices(output.shape[:2]).sum(0) % 2 == 0, 48, -48)[..., None]
    patterned = np.clip(output.astype(np.int16) + sign, 0, 255).astype(np.uint8)
    clean, bad = gate_score(photo, output), gate_score(photo, patterned)
    assert bad.psnr_vs_input > MIN_PSNR_VS_INPUT and bad.pattern_levels > MAX_PATTERN_LEVELS
    assert "pattern" in bad.suspect(MIN_PSNR_VS_INPUT, MAX_PATTERN_LEVELS)
    assert clean.suspect(MIN_PSNR_VS_INPUT, MAX_PATTERN_LEVELS) is None
