"""Tile geometry for PAN inference: where each tile reads, what it keeps, how seams blend, and the
tile sizes we accept. Plain numpy, no torch: job settings are checked with it before any model loads.

Along each axis an image is cut into cores of ``tile`` input pixels; each core is read with
``context`` pixels of image around it, and every window has the same length (``tile + 2*context``)
so windows batch. Neighbouring cores cross-fade over ``BLEND`` pixels with linear ramps.

How close tiled output is to the whole image's, per precision (the README's contract for ``--tile``;
benchmarks/tiling_bound.py measures it, on the CPU): a window sees zeros where the whole image has
pixels, and PAN's receptive field reaches 36 input pixels (35 at x3), so output within 36 px of a
window's edge differs; ``context`` keeps that edge away from the core (less half the blend, which
reaches 4 px beyond a core).
- fp32: the edge's influence fades fast, under 0.001 level at the default context, so tiled output
  equals the whole image's within one level (the rounding to integers).
- bf16: each layer rounds its activations to 8 significant bits. Where the edge's tiny difference
  moves an activation across a rounding step it becomes a whole step, which the next layers carry
  on and round again, so it does not fade within the receptive field: within 4 levels with the
  default context (measured at most 3 on Set14 x2-x4 and 4 on 20 BSDS200 photos at x4, tiles
  48-256; a few values in 10^5 more than one level off).
- any precision, ``context`` of 40 or more (the receptive field plus half the blend): no core pixel
  sees a window's edge, and tiled output equals the whole image's within one level (the CPU's bf16
  kernels give a pixel the same value wherever it sits in a window: what is left is the blend's
  float rounding). Not the default: it costs 1.1x (tiles of 256) to 2.2x (tiles of 48) the time on
  an image that needs tiles.
- fp16 and the GPU's kernels are not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import SettingsError

DEFAULT_CONTEXT = 24  # input pixels read around each tile: tiled == whole within 1 level in fp32, 4 in bf16
BLEND = 8  # input pixels over which neighbouring tiles cross-fade
# The smallest core worth computing: a 32-px core already computes (32 + 2*24)^2 / 32^2 = 6x the
# pixels it keeps; smaller ones grow that without bound (a 1-px tile ran 11 minutes on a 72-px image).
MIN_TILE = 32


def check_tile(tile: int) -> int:
    """``tile`` if it is 0 (whole image) or at least ``MIN_TILE``; else ``SettingsError``."""
    if isinstance(tile, bool) or not isinstance(tile, int) or (tile != 0 and tile < MIN_TILE):
        raise SettingsError(
            f"tile {tile!r} is out of range: use 0 (whole image) or at least {MIN_TILE} px "
            f"(each tile also reads {DEFAULT_CONTEXT} px of context on every side)"
        )
    return tile


@dataclass(frozen=True)
class Window:
    """One tile along one axis: the input it reads and the core of the output it owns."""

    start: int  # first input pixel read (the window is ``TilePlan.length`` long)
    core_start: int
    core_end: int


@dataclass(frozen=True)
class TilePlan:
    """Equal-length windows along one axis; cores tile the axis, seams are cross-faded."""

    windows: tuple[Window, ...]
    length: int
    size: int
    blend: int  # input pixels over which two neighbouring cores cross-fade


def plan_axis(size: int, tile: int, context: int) -> TilePlan:
    """Cores of ``tile`` pixels, each read with ``context`` pixels around it (fewer at edges).

    Every window has the same length, ``tile + 2*context`` (so tiles batch): windows near an edge
    are shifted inwards and read more on the other side instead.
    """
    length = tile + 2 * context
    if length >= size:
        return TilePlan((Window(0, 0, size),), size, size, 0)
    windows = tuple(
        Window(min(max(c - context, 0), size - length), c, min(c + tile, size)) for c in range(0, size, tile)
    )
    return TilePlan(windows, length, size, min(context // 2, BLEND) // 2 * 2)


def blend_weights(plan: TilePlan, window: Window, scale: int) -> np.ndarray:
    """1-D output weights of one window: 1 on its core, linear ramps across interior seams."""
    x = np.arange(window.start * scale, (window.start + plan.length) * scale, dtype=np.float32) + 0.5
    half = plan.blend * scale / 2
    width = max(2 * half, 1e-6)  # no blend: a hard seam at the core's edge
    weights = np.ones_like(x)
    if window.core_start > 0:
        weights = np.minimum(weights, np.clip((x - window.core_start * scale + half) / width, 0, 1))
    if window.core_end < plan.size:
        weights = np.minimum(weights, np.clip((window.core_end * scale + half - x) / width, 0, 1))
    return weights


def weight_span(plan: TilePlan, window: Window, scale: int) -> tuple[int, int, np.ndarray]:
    """Where ``window``'s ``blend_weights`` are nonzero along the axis, in output pixels: (first,
    end, the weights there). Outside it a window adds nothing: its core, widened by half the blend
    across each interior seam."""
    weights = blend_weights(plan, window, scale)
    nonzero = np.flatnonzero(weights)
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    return window.start * scale + first, window.start * scale + last, weights[first:last]


class TileAssembler:
    """One image's output, assembled from its windows' outputs as they arrive in raster order (tile
    rows top to bottom, each left to right), holding in float only what a later window may still
    add to; final pixels go to ``write(top, left, block)`` (``block``: 3 x h x w float32, a view
    that is valid during the call) as soon as they are final, each exactly once.

    Each window adds ``output * weight`` over its ``weight_span`` rectangle. Spans of neighbouring
    windows overlap across their seam only (tiles are at least ``MIN_TILE`` wide, blends at most
    ``BLEND``), so after window (row j, column i) the pixels left of column i+1's span and above
    row j+1's span are final. Kept in float meanwhile: the window's own rectangle while it is
    added, the seam on its right (its span's height) for column i+1, and the seam below tile row
    j (the image's width) for row j+1. For a 4000 x 3000 input at x4 with 584-px tiles that is
    about 75 MB, where a whole-output accumulator takes 2.3 GB.

    Every pixel is the sum of the same terms in the windows' order, as in a whole-output accumulator
    started at zero, so the result is bit-identical to it."""

    def __init__(
        self, plan_y: TilePlan, plan_x: TilePlan, scale: int, write: Callable[[int, int, np.ndarray], None]
    ) -> None:
        self._rows = [weight_span(plan_y, w, scale) for w in plan_y.windows]
        self._columns = [weight_span(plan_x, w, scale) for w in plan_x.windows]
        self._starts = ([w.start * scale for w in plan_y.windows], [w.start * scale for w in plan_x.windows])
        self._write = write
        self._width = plan_x.size * scale
        self._next = (0, 0)  # the window expected next
        self._seam_above = self._seam_below = np.zeros((3, 0, self._width), dtype=np.float32)
        self._seam_left = self._seam_above[:, :, :0]

    @property
    def done(self) -> bool:
        """Whether every window was added (and every pixel written)."""
        return self._next[0] == len(self._rows)

    def add(self, row: int, column: int, output: np.ndarray) -> None:
        """Add window (``row``, ``column``) of the plans: its output, 3 x (length_y*scale) x
        (length_x*scale) float32, which this overwrites (the sum is made in it, so that no window
        sized temporary is). Windows must come in raster order."""
        if (row, column) != self._next:
            raise ValueError(f"window {(row, column)} out of raster order: {self._next} expected")
        top, bottom, weights_y = self._rows[row]
        left, right, weights_x = self._columns[column]
        y0, x0 = top - self._starts[0][row], left - self._starts[1][column]
        acc = output[:, y0 : y0 + bottom - top, x0 : x0 + right - left]
        acc *= np.outer(weights_y, weights_x)
        # Plus what earlier windows added here: the seam above (tile row j-1's), except where the
        # seam on the left (window i-1's, which took the seam above in there) overlaps it. The sum
        # of two terms is the same whichever comes first: bit-identical to adding in order.
        above = self._seam_above.shape[1]
        seam_left = self._seam_left.shape[2] if column else 0
        acc[:, :above, seam_left:] += self._seam_above[:, :, left + seam_left : right]
        if seam_left:
            acc[:, :, :seam_left] += self._seam_left
        # What later windows add to: rows from tile row j+1's span, columns from column i+1's.
        last_row, last_column = row + 1 == len(self._rows), column + 1 == len(self._columns)
        below = bottom if last_row else self._rows[row + 1][0]
        after = right if last_column else self._columns[column + 1][0]
        if column == 0:
            self._seam_below = np.empty((3, bottom - below, self._width), dtype=np.float32)
        self._seam_below[:, :, left:after] = acc[:, below - top :, : after - left]
        self._seam_left = acc[:, :, after - left :].copy()  # a copy: ``output`` is the caller's
        self._write(top, left, acc[:, : below - top, : after - left])
        if last_column:
            self._seam_above = self._seam_below
        self._next = (row + 1, 0) if last_column else (row, column + 1)
