"""Image bytes in and out (every Pillow format, colour modes, EXIF, 16-bit, bomb guard) and the
MATLAB-compatible bicubic resize used for LR generation and the bicubic baseline. No Ray here."""

from pipeline.imaging.codec import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    DecodedImage,
    decode_image,
    encode_image,
)
from pipeline.imaging.resize import imresize

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "DecodedImage", "decode_image", "encode_image", "imresize"]
