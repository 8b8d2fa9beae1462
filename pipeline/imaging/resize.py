"""MATLAB-compatible bicubic ``imresize``.

Contract
--------
``imresize(image, scale)`` or ``imresize(image, output_shape=(out_h, out_w))`` reproduces
MATLAB's ``imresize(image, scale, 'bicubic')`` with its defaults, pixel for pixel:

* ``image``: ``(H, W)`` or ``(H, W, C)`` array of dtype ``uint8``, ``uint16`` or any float dtype.
  Channels are resized independently; the channel axis is kept as given.
* ``scale``: one positive factor for both axes; the output is ``(ceil(H*scale), ceil(W*scale))``.
  ``output_shape``: the output ``(out_h, out_w)``; each axis then scales by ``out / in``.
  Exactly one of the two must be given.
* Kernel: Keys cubic with ``a = -0.5``. When an axis shrinks (scale < 1) the kernel is stretched
  by ``1/scale`` (MATLAB's default antialiasing). Out-of-range taps are mirrored symmetrically
  (``... 2 1 1 2 ... n n n-1 ...``), and weights are normalised to sum to 1 per output pixel.
* Axes are resized one at a time, the axis with the smaller scale first (rows first on ties),
  with float64 accumulation. Integer inputs are rounded half away from zero and clipped to the
  dtype's range after *each* pass (as MATLAB's ``imresizemex`` does) and come back in the input
  dtype, values in ``[0, 255]`` / ``[0, 65535]``. Float inputs come back in their dtype, unclipped.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["imresize"]

_KERNEL_WIDTH = 4.0  # support of the cubic kernel, in input pixels, at scale 1
_BLOCK_ELEMS = 1 << 16  # float64 elements per working block (~0.5 MiB)


def _cubic(x: np.ndarray) -> np.ndarray:
    # Same polynomial form and operation order as MATLAB's `cubic`, so weights match bit for bit.
    absx = np.abs(x)
    absx2 = absx**2
    absx3 = absx**3
    return (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1) + (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * (
        (absx > 1) & (absx <= 2)
    )


def _contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-pixel input indices (0-based) and weights, both ``(out_len, taps)``."""
    width = _KERNEL_WIDTH
    shrinking = scale < 1
    if shrinking:
        width = width / scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    # Output pixel centre mapped into input coordinates (1-based, pixel centres at integers).
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    dist = u[:, None] - idx
    weights = scale * _cubic(scale * dist) if shrinking else _cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # Mirror out-of-range taps: index sequence 1..n, n..1 repeated.
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    # Taps that are zero for every output pixel only cost time.
    keep = np.any(weights != 0, axis=0)
    return idx[:, keep], weights[:, keep]


def _round_clip(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    # Half away from zero, like MATLAB's cast to an integer class.
    rounded = np.sign(x) * np.floor(np.abs(x) + 0.5)
    return np.clip(rounded, info.min, info.max).astype(dtype)


def _resize_axis(
    data: np.ndarray, axis: int, out_len: int, scale: float, int_dtype: np.dtype | None
) -> np.ndarray:
    idx, weights = _contributions(data.shape[axis], out_len, scale)
    # Resized axis first and contiguous: each tap then gathers whole rows, and the weights
    # broadcast over one long contiguous run.
    src = np.ascontiguousarray(np.moveaxis(data, axis, 0), dtype=np.float64)
    rest = src.shape[1:]
    out = np.empty((out_len, *rest), dtype=np.float64 if int_dtype is None else int_dtype)
    # Work in blocks of output lines that stay in cache rather than streaming whole images.
    block = max(1, _BLOCK_ELEMS // max(1, math.prod(rest)))
    for start in range(0, out_len, block):
        stop = min(start + block, out_len)
        acc = np.zeros((stop - start, *rest))
        tap = np.empty_like(acc)
        for k in range(idx.shape[1]):
            # Tap by tap, in order, so the float64 sum matches a sequential C loop.
            np.take(src, idx[start:stop, k], axis=0, out=tap, mode="clip")
            tap *= weights[start:stop, k].reshape(-1, *(1,) * len(rest))
            acc += tap
        out[start:stop] = acc if int_dtype is None else _round_clip(acc, int_dtype)
    return np.moveaxis(out, 0, axis)


def imresize(
    image: np.ndarray,
    scale: float | None = None,
    *,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resize ``image`` like MATLAB ``imresize(image, scale, 'bicubic')``; see module docstring."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be HxW or HxWxC, got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"image must be non-empty, got shape {image.shape}")
    if image.dtype in (np.uint8, np.uint16):
        int_dtype: np.dtype | None = image.dtype
    elif np.issubdtype(image.dtype, np.floating):
        int_dtype = None
    else:
        raise ValueError(f"dtype must be uint8, uint16 or float, got {image.dtype}")
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape")

    in_h, in_w = image.shape[:2]
    if scale is not None:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        out_h, out_w = math.ceil(in_h * scale), math.ceil(in_w * scale)
        scales = (float(scale), float(scale))
    else:
        if len(output_shape) != 2:
            raise ValueError(f"output_shape must be (out_h, out_w), got {output_shape}")
        out_h, out_w = (int(v) for v in output_shape)
        if out_h < 1 or out_w < 1 or (out_h, out_w) != tuple(output_shape):
            raise ValueError(f"output_shape must be two positive integers, got {output_shape}")
        scales = (out_h / in_h, out_w / in_w)

    out_sizes = (out_h, out_w)
    data = image
    # MATLAB resizes the axis with the smaller scale first; a stable sort keeps rows first on ties.
    for axis in sorted((0, 1), key=lambda a: scales[a]):
        data = _resize_axis(data, axis, out_sizes[axis], scales[axis], int_dtype)
    return np.ascontiguousarray(data, dtype=image.dtype)
