"""``pipeline.core.tiling.TileAssembler`` against a whole-output accumulator. Plain numpy: the window
outputs here are arbitrary arrays (no network runs), so any values test the assembly."""

import numpy as np
import pytest

from pipeline.core.tiling import TileAssembler, TilePlan, blend_weights, plan_axis


def _window_outputs(plan_y: TilePlan, plan_x: TilePlan, scale: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (3, plan_y.length * scale, plan_x.length * scale)
    return [rng.random(shape, dtype=np.float32) for _ in range(len(plan_y.windows) * len(plan_x.windows))]


def _accumulated(plan_y: TilePlan, plan_x: TilePlan, scale: int, outputs: list[np.ndarray]) -> np.ndarray:
    """The straightforward assembly: a zeroed float output the size of the image, each window's
    output added with its blend weights, in raster order."""
    total = np.zeros((3, plan_y.size * scale, plan_x.size * scale), dtype=np.float32)
    windows = [(wy, wx) for wy in plan_y.windows for wx in plan_x.windows]
    for (wy, wx), output in zip(windows, outputs, strict=True):
        weight = np.outer(blend_weights(plan_y, wy, scale), blend_weights(plan_x, wx, scale))
        top, left = wy.start * scale, wx.start * scale
        total[:, top : top + output.shape[1], left : left + output.shape[2]] += output * weight
    return total


@pytest.mark.parametrize(
    ("height", "width", "tile", "context", "scale"),
    [
        (200, 150, 48, 24, 2),  # remainders on both axes
        (97, 301, 32, 24, 4),  # many columns, a short remainder row
        (60, 250, 48, 24, 3),  # one tile row: the image is as tall as a window
        (250, 60, 48, 24, 2),  # one tile column
        (130, 140, 40, 0, 2),  # no context: hard seams, nothing overlaps
        (130, 140, 40, 3, 2),  # a context too small to blend: hard seams over overlapping windows
        (300, 300, 256, 24, 4),  # a large tile with a small remainder
    ],
)
def test_the_assembly_is_bit_identical_to_a_whole_output_accumulator(height, width, tile, context, scale):
    plan_y, plan_x = plan_axis(height, tile, context), plan_axis(width, tile, context)
    outputs = _window_outputs(plan_y, plan_x, scale, seed=height * width)
    expected = _accumulated(plan_y, plan_x, scale, outputs)
    assembled = np.full_like(expected, np.nan)
    written = np.zeros(expected.shape[1:], dtype=int)
    held: list[int] = []

    def write(top: int, left: int, block: np.ndarray) -> None:
        assembled[:, top : top + block.shape[1], left : left + block.shape[2]] = block
        written[top : top + block.shape[1], left : left + block.shape[2]] += 1

    assembler = TileAssembler(plan_y, plan_x, scale, write)
    windows = [(r, c) for r in range(len(plan_y.windows)) for c in range(len(plan_x.windows))]
    for (row, column), output in zip(windows, outputs, strict=True):
        assert not assembler.done
        assembler.add(row, column, output)
        seams = (assembler._seam_above, assembler._seam_below, assembler._seam_left)
        held.append(sum({id(seam): seam.nbytes for seam in seams}.values()))
    assert assembler.done
    assert (written == 1).all(), "every output pixel is written exactly once"
    assert np.array_equal(assembled, expected)
    # what stays in float between windows: the seams (two of the image's width), never the image
    below = plan_y.blend * scale * plan_x.size * scale
    right = plan_y.length * scale * plan_x.blend * scale
    assert max(held) <= 3 * 4 * (2 * below + right)


def test_windows_out_of_raster_order_are_refused():
    plan = plan_axis(100, 32, 8)
    assembler = TileAssembler(plan, plan, 2, lambda top, left, block: None)
    output = np.zeros((3, plan.length * 2, plan.length * 2), dtype=np.float32)
    assembler.add(0, 0, output)
    with pytest.raises(ValueError, match="raster order"):
        assembler.add(1, 0, output)
