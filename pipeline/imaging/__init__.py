"""Image bytes in and out (every Pillow format, colour modes, EXIF, 16-bit, bomb guard), the
MATLAB-compatible bicubic resize used for LR generation and the bicubic baseline, and decoded
images through an engine (``upscale_image``). No Ray here."""

from pipeline.imaging.codec import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    DecodedImage,
    decode_image,
    encode_image,
)
from pipeline.imaging.resize import imresize
from pipeline.imaging.upscale import upscale_image, upscale_images

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "DecodedImage",
    "decode_image",
    "encode_image",
    "imresize",
    "upscale_image",
    "upscale_images",
]
