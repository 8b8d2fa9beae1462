"""Training patches cut from image pairs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import DatasetError
from pipeline.io.pairs import BenchmarkPair, PairSource
from pipeline.training.prepared import dihedral


class PatchDataset(Dataset):
    """Random aligned training patches, for ``torch.utils.data.DataLoader`` and Ray Train.

    ``dataset[i]`` -> ``(lr, hr)``: float32 tensors in [0, 1], RGB, channels first; ``lr`` is
    3 x P x P and ``hr`` 3 x sP x sP, where the LR patch at ``(y, x)`` goes with the HR patch at
    ``(s*y, s*x)``. Every call draws a new position and, with ``augment``, one of the 8 flips and
    rotations (the same for LR and HR), from torch's RNG, so DataLoader and Ray Train seeding apply.

    ``five_crop``: super-image's pre-augmentation, without files on disk: each image is 5 crops of half
    its LR height and width (top-left, top-right, bottom-left, bottom-right, centre), HR cropped at
    ``s`` times the LR box (super-image re-makes LR from the HR crop; we keep the source's LR). Item
    ``i`` is crop ``i % 5`` of image ``i // 5``, the random patch is drawn inside that crop.

    An image (or crop) smaller than the patch raises ``DatasetError`` naming it: padding would teach
    the network borders that are not in the data.

    ``cache_images``: up to N decoded pairs kept in a per-process LRU (a 2K DIV2K pair at x2 is about
    10 MB); decoding a 2K PNG for each 64-pixel patch is wasteful. Pickling (to DataLoader or Ray
    workers) drops the cache.
    """

    def __init__(
        self,
        pairs: PairSource,
        scale: int,
        patch_size: int = 64,
        *,
        five_crop: bool = False,
        augment: bool = True,
        cache_images: int = 0,
    ) -> None:
        if getattr(pairs, "scale", scale) != scale:
            raise ValueError(f"{pairs.name} holds x{pairs.scale} pairs, not x{scale}")
        if patch_size < 1 or cache_images < 0:
            raise ValueError(
                f"patch_size must be >= 1 and cache_images >= 0, not {patch_size}, {cache_images}"
            )
        self.pairs, self.scale, self.patch_size = pairs, scale, patch_size
        self.five_crop, self.augment, self.cache_images = five_crop, augment, cache_images
        self._cache: OrderedDict[int, BenchmarkPair] = OrderedDict()

    def __len__(self) -> int:
        return len(self.pairs) * (5 if self.five_crop else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        image, crop = divmod(index, 5) if self.five_crop else (index, None)
        pair = self._pair(image)
        top, left, height, width = self._region(pair, crop)
        p, s = self.patch_size, self.scale
        y, x = top + _randint(height - p + 1), left + _randint(width - p + 1)
        lr, hr = pair.lr[y : y + p, x : x + p], pair.hr[s * y : s * (y + p), s * x : s * (x + p)]
        if self.augment:
            k = _randint(8)
            lr, hr = dihedral(lr, k), dihedral(hr, k)
        return _to_tensor(lr), _to_tensor(hr)

    def _region(self, pair: BenchmarkPair, crop: int | None) -> tuple[int, int, int, int]:
        """(top, left, height, width) in LR pixels of the whole image or of five-crop ``crop``."""
        h, w = pair.lr.shape[:2]
        if crop is None:
            top, left, height, width, what = 0, 0, h, w, "LR image"
        else:
            height, width = h // 2, w // 2
            tops = (0, 0, h - height, h - height, (h - height) // 2)
            lefts = (0, w - width, 0, w - width, (w - width) // 2)
            top, left, what = tops[crop], lefts[crop], f"five-crop {crop} of its LR image"
        if height < self.patch_size or width < self.patch_size:
            raise DatasetError(
                f"{self.pairs.name}/{pair.name}: {what} is {width}x{height}, smaller than the "
                f"{self.patch_size}-pixel LR patch; use a smaller patch_size"
                + (" or no five_crop" if crop is not None else "")
            )
        return top, left, height, width

    def _pair(self, index: int) -> BenchmarkPair:
        if not self.cache_images:
            return self.pairs.pair(index)
        pair = self._cache.pop(index, None)  # popped and re-inserted: now the most recent
        if pair is None:
            pair = self.pairs.pair(index)
            while len(self._cache) >= self.cache_images:
                self._cache.popitem(last=False)
        self._cache[index] = pair
        return pair

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}


def _randint(n: int) -> int:
    return int(torch.randint(n, ()).item())


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1], contiguous."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
