"""Tiled, batched PAN inference on one device.

Array contract: ``Upscaler.upscale`` takes an H x W x 3 RGB or H x W (or H x W x 1) grayscale
``np.ndarray`` of dtype uint8 or uint16 and returns (scale*H) x (scale*W) in the same layout and
dtype. Values are mapped to [0, 1] by the dtype's maximum, the network output is clamped to [0, 1],
scaled back and rounded (the evaluation convention). Grayscale is run as RGB with equal channels and
averaged back.

Large images are cut into tiles: each tile's core is read with ``context`` pixels of image around
it, all windows have one shape (so they batch), and neighbouring cores cross-fade over a few pixels
with linear ramps, which blends the seams away. Tiles that come out
non-finite in reduced precision are recomputed in fp32.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import replace

import numpy as np
import torch

from pipeline.errors import DeviceError
from pipeline.imaging import DecodedImage, imresize
from pipeline.jobspec import AUTO, PRECISIONS
from pipeline.model import PAN
from pipeline.tiling import DEFAULT_CONTEXT, MIN_TILE, TilePlan, blend_weights, check_tile, plan_axis

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # one per PRECISIONS
MAX_BATCH = 16


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when visible, else CPU. Asking for CUDA without one is an error."""
    if device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} asked for, but CUDA sees no GPU on this machine "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); use --device cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"{device} asked for, but CUDA sees {torch.cuda.device_count()} GPU(s)")
    elif resolved.type != "cpu":
        raise DeviceError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


def bytes_per_lr_pixel(model: PAN, dtype: torch.dtype = torch.float32) -> int:
    """A conservative estimate of peak activation memory per input pixel under inference_mode.

    Measured on CPU with fp32: peak RSS growth per LR pixel is about 0.9 KB at x2 and 3 KB at x4;
    this formula (the LR trunk's live tensors plus the HR stage's at scale**2) stays above it.
    """
    cfg = model.config
    elements = 6 * cfg.nf + 5 * cfg.unf * cfg.scale**2
    return elements * torch.finfo(dtype).bits // 8


def default_memory_budget(device: torch.device) -> int:
    """Bytes of activations we allow per batch: half the free GPU memory, or 1 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 1 << 30


class Upscaler:
    """PAN on a device, with tiling and batching.

    ``tile``: input tile size in pixels; ``0`` runs the whole image at once; ``"auto"`` runs it
    whole when it fits ``memory_budget`` (bytes of activations) and tiles it otherwise.
    ``context``: input pixels read around each tile's core (PAN's receptive field is wide: with
    about 20 or more, tiled output equals whole-image output within one level).
    ``precision``: fp32 everywhere; bf16 on CPU and recent GPUs; fp16 on CUDA only.
    """

    def __init__(
        self,
        model: PAN,
        *,
        device: str = AUTO,
        precision: str = "fp32",
        tile: int | str = AUTO,
        context: int = DEFAULT_CONTEXT,
        batch_size: int | str = AUTO,
        memory_budget: int | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if tile != AUTO:
            check_tile(tile)
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise DeviceError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("this GPU has no bf16 support; use fp16 or fp32")
        self.precision = precision
        self.scale = model.scale
        self.tile = tile
        self.context = context
        self.batch_size = batch_size
        self.memory_budget = memory_budget or default_memory_budget(self.device)
        self._bytes_per_px = bytes_per_lr_pixel(model, _DTYPES[precision])
        self.weights_info = getattr(model, "weights_info", None)
        self._fp32 = self._prepare(model, torch.float32)
        self._model = self._fp32 if precision == "fp32" else self._prepare(model, _DTYPES[precision])

    def _prepare(self, model: PAN, dtype: torch.dtype) -> PAN:
        prepared = copy.deepcopy(model).eval().requires_grad_(False)
        return prepared.to(device=self.device, dtype=dtype, memory_format=torch.channels_last)

    # -- planning -------------------------------------------------------------------------------

    def tile_size(self, height: int, width: int) -> int:
        """The tile size used for an image of this size; 0 means the whole image (as ``tile``)."""
        if self.tile == 0:
            return 0
        if self.tile == AUTO:
            if height * width * self._bytes_per_px <= self.memory_budget:
                return 0
            side = int(math.sqrt(self.memory_budget / self._bytes_per_px)) // 8 * 8
            return max(side - 2 * self.context, MIN_TILE)
        return int(self.tile)

    def _batch_for(self, tile_h: int, tile_w: int) -> int:
        if self.batch_size != AUTO:
            return max(1, int(self.batch_size))
        per_tile = tile_h * tile_w * self._bytes_per_px
        return int(min(MAX_BATCH, max(1, self.memory_budget // per_tile)))

    # -- running --------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x h x w float32 in [0, 1] -> N x 3 x sh x sw float32 clamped to [0, 1]."""
        x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=torch.channels_last)
        out = self._model(x.to(_DTYPES[self.precision])).float()
        if self._model is not self._fp32:
            bad = ~torch.isfinite(out).flatten(1).all(dim=1)
            if bad.any():  # reduced precision overflowed on some tiles: redo those in fp32
                out[bad] = self._fp32(x[bad])
        return out.clamp_(0, 1).cpu().numpy()

    def plan(self, height: int, width: int) -> tuple[TilePlan, TilePlan]:
        """The tile windows along y and x for an image of this size."""
        tile = self.tile_size(height, width)
        if tile == 0:
            return plan_axis(height, height, 0), plan_axis(width, width, 0)
        return plan_axis(height, tile, self.context), plan_axis(width, tile, self.context)

    def upscale_float(self, image: np.ndarray) -> np.ndarray:
        """3 x H x W float32 in [0, 1] -> 3 x sH x sW float32 in [0, 1]."""
        _, height, width = image.shape
        s = self.scale
        py, px = self.plan(height, width)
        if len(py.windows) == 1 and len(px.windows) == 1:
            return self._run(image[None])[0]
        out = np.zeros((3, height * s, width * s), dtype=np.float32)
        tiles = [(wy, wx) for wy in py.windows for wx in px.windows]
        batch = self._batch_for(py.length, px.length)
        for i in range(0, len(tiles), batch):
            chunk = tiles[i : i + batch]
            inputs = np.stack(
                [
                    image[:, wy.start : wy.start + py.length, wx.start : wx.start + px.length]
                    for wy, wx in chunk
                ]
            )
            for (wy, wx), result in zip(chunk, self._run(inputs), strict=True):
                weight = np.outer(blend_weights(py, wy, s), blend_weights(px, wx, s))
                region = np.s_[
                    :, wy.start * s : (wy.start + py.length) * s, wx.start * s : (wx.start + px.length) * s
                ]
                out[region] += result * weight
        return out

    def upscale(self, image: np.ndarray) -> np.ndarray:
        """Upscale an HxWx3 / HxW / HxWx1 uint8 or uint16 array; same layout and dtype back."""
        if not isinstance(image, np.ndarray) or image.dtype not in (np.uint8, np.uint16):
            raise TypeError(f"expected a uint8 or uint16 numpy array, got {_describe(image)}")
        squeeze = image.ndim == 3 and image.shape[2] == 1
        gray = image.ndim == 2 or squeeze
        if not gray and (image.ndim != 3 or image.shape[2] != 3):
            raise ValueError(f"expected HxWx3, HxW or HxWx1 pixels, got shape {image.shape}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"empty image of shape {image.shape}")
        maxval = float(np.iinfo(image.dtype).max)
        plane = image.reshape(image.shape[:2]) if gray else image
        chw = plane.astype(np.float32) / maxval
        chw = np.broadcast_to(chw, (3, *chw.shape)) if gray else chw.transpose(2, 0, 1)
        result = self.upscale_float(np.ascontiguousarray(chw))
        result = result.mean(axis=0) if gray else result.transpose(1, 2, 0)
        pixels = np.rint(result * maxval).astype(image.dtype)
        return pixels[..., None] if squeeze else pixels

    def upscale_image(self, image: DecodedImage) -> DecodedImage:
        """Upscale a decoded image; its alpha channel, if any, is enlarged with bicubic."""
        alpha = None
        if image.alpha is not None:
            alpha = imresize(image.alpha, float(self.scale))
        return replace(image, pixels=self.upscale(image.pixels), alpha=alpha)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__
