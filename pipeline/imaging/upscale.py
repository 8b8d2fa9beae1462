"""Decoded images through an engine: the pixels by PAN, the alpha channel by bicubic."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pipeline.imaging.codec import DecodedImage
from pipeline.imaging.resize import imresize


def upscale_images(upscaler: Any, images: Sequence[DecodedImage]) -> list[DecodedImage]:
    """Each image upscaled by ``upscaler`` (a ``pipeline.core.engine.Upscaler``: its pixels' windows
    share forward passes), with its alpha channel, if any, enlarged with the MATLAB bicubic: PAN
    was trained on colour, not on masks."""
    pixels = upscaler.upscale_many([image.pixels for image in images])
    return [
        dataclasses.replace(
            image,
            pixels=p,
            alpha=None if image.alpha is None else imresize(image.alpha, float(upscaler.scale)),
        )
        for image, p in zip(images, pixels, strict=True)
    ]


def upscale_image(upscaler: Any, image: DecodedImage) -> DecodedImage:
    """``upscale_images`` of one image."""
    return upscale_images(upscaler, [image])[0]
