"""Decode untrusted image bytes into numpy arrays, and encode arrays back to PNG / JPEG / WebP.

Contract
--------
``decode_image(data, name=..., max_pixels=...)`` returns a :class:`DecodedImage` whose ``pixels``
are C-contiguous uint8 or uint16, either HxWx3 RGB or HxW grayscale, with the alpha channel (if
any) split off into ``alpha`` (HxW, same dtype). EXIF orientation is applied, so pixels are
upright. Only the first frame of an animated / multi-page file is read. Colour profiles (ICC) are
not applied or carried. Every failure the input can cause is a typed ``InvalidImageError`` whose
message names the input:

=============================================  ==========================
zero bytes                                     ``EmptyImageError``
no format Pillow reads (e.g. a text file)      ``NotAnImageError``
data that ends early                           ``TruncatedImageError``
any other damage                               ``CorruptImageError``
more than ``max_pixels`` pixels                ``ImageTooLargeError``
a mode we cannot represent (float, 32-bit)     ``UnsupportedImageError``
=============================================  ==========================

Modes (Pillow's mode of the opened file -> result):
``1``, ``L`` -> gray uint8; ``LA``, ``La`` -> gray + alpha; ``RGB``, ``RGBX``, ``CMYK``,
``YCbCr``, ``LAB``, ``HSV`` -> RGB uint8; ``RGBA``, ``RGBa``, ``PA`` -> RGB + alpha; ``P`` -> RGB,
or RGB + alpha when it has transparency; ``I;16*`` -> gray uint16; ``I`` -> gray uint16 when every
value is in 0..65535, else unsupported; ``F`` -> unsupported. A tRNS colour key (PNG ``L``,
``RGB``, ``I;16``) becomes an alpha channel.

16-bit colour PNGs (RGB, RGBA and gray + alpha) are read with imagecodecs (libpng) because Pillow
reads them as 8-bit (keeping only the high byte), which would throw away the precision the file was
made for. Other 16-bit colour files (e.g. TIFF) come out as 8-bit, as Pillow gives them.

``encode_image`` writes PNG (8- or 16-bit, alpha kept: see ``encode_png``), JPEG XL lossless
(8- or 16-bit, alpha kept: ``JXL_EFFORT``), JPEG (8-bit, alpha dropped, 4:4:4 chroma) or WebP
(8-bit, alpha kept, gray stored as RGB because WebP has no gray mode). 16-bit pixels are scaled to
8-bit with rounding where the format needs it. Metadata (EXIF, ICC) is not written.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    InvalidImageError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

DEFAULT_MAX_PIXELS: int = 40_000_000
# How PNGs are written by default: ``encode_png``'s fastest standard writer (fpng where it applies).
PNG_FAST = "fast"
# libpng's zlib level for what fpng does not write (gray, gray + alpha, 16-bit): 1, the fastest,
# makes files as small as 6 does (``_png_settings``).
PNG_LIBPNG_LEVEL = 1
# JPEG XL lossless at effort 1 (libjxl's fastest): 5.7-8.7x the speed of libpng at level 1 for files
# 0.69-0.86x its size on PAN's outputs, 8- and 16-bit; effort 2 costs 10x the time for 5-10 % less
# (benchmarks/png_writers.py). One thread: the job runs one encode task per core.
JXL_EFFORT = 1
# File extensions taken as images when walking folders (decode_image itself goes by content).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".tga"}
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# PNG colour types that Pillow reduces to 8 bits when the bit depth is 16 (gray + alpha, RGB, RGBA).
_PNG16_NOT_PILLOW = {2, 4, 6}
_EXIF_ORIENTATION = 0x0112

# What Pillow (and imagecodecs) raise for damaged data. Pillow documents OSError, but its plugins also
# leak SyntaxError, ValueError, EOFError, struct.error and friends for malformed headers.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
    imagecodecs.PngError,
)


@dataclass(frozen=True, repr=False)
class DecodedImage:
    pixels: np.ndarray  # HxWx3 RGB or HxW gray, uint8 or uint16, C-contiguous
    alpha: np.ndarray | None  # HxW, same dtype as pixels, or None
    source_mode: str  # Pillow's mode of the input as opened ("RGB", "P", "I;16", ...)
    format: str | None  # Pillow's format name ("PNG", "JPEG", ...); None if built in memory

    def __post_init__(self) -> None:
        pixels, alpha = self.pixels, self.alpha
        if pixels.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"pixels must be uint8 or uint16, not {pixels.dtype}")
        if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
            raise ValueError(f"pixels must be HxW or HxWx3, not shape {pixels.shape}")
        if alpha is not None and (alpha.shape != pixels.shape[:2] or alpha.dtype != pixels.dtype):
            raise ValueError(
                f"alpha must be {pixels.shape[:2]} {pixels.dtype}, not {alpha.shape} {alpha.dtype}"
            )
        # Frozen dataclass: normalise layout once here so consumers can rely on it.
        object.__setattr__(self, "pixels", np.ascontiguousarray(pixels))
        if alpha is not None:
            object.__setattr__(self, "alpha", np.ascontiguousarray(alpha))

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_grayscale(self) -> bool:
        return self.pixels.ndim == 2

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    def __repr__(self) -> str:
        """What the image is, not its pixels: Ray Data writes out ``str`` of a whole column of
        images each time it turns one into an Arrow block (it tries Arrow's own types first and
        keeps the message of that failure), and printing the pixel arrays would cost about 0.24 ms
        per image at each stage boundary (benchmarks/README.md)."""
        kind = "gray" if self.is_grayscale else "RGB"
        alpha = " + alpha" if self.alpha is not None else ""
        return (
            f"DecodedImage({self.width}x{self.height} {kind}{alpha}, {self.bit_depth}-bit, "
            f"source_mode={self.source_mode!r}, format={self.format!r})"
        )


# ---------------------------------------------------------------------------------------------
# decode


def decode_image(data: bytes, *, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes (anything Pillow reads) into an upright :class:`DecodedImage`."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, not {max_pixels}")
    if not data:
        raise EmptyImageError(f"empty image (0 bytes): {name}")
    kind = _sniff(data)
    try:
        with _pillow_bomb_limit(max_pixels):
            return _decode(data, name, max_pixels)
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised by Image.open before we could read the size; Pillow's message has the count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageTooLargeError(_too_large(name, size, max_pixels)) from exc
    except UnidentifiedImageError as exc:
        if kind is None:
            raise NotAnImageError(f"not an image (no format Pillow reads): {name}") from exc
        # A known signature Pillow still cannot open: its header is cut short or damaged.
        if _is_truncated(data, kind, exc):
            raise TruncatedImageError(f"truncated {kind}: {name}") from exc
        raise CorruptImageError(f"corrupt {kind} (unreadable header): {name}") from exc
    except _DECODE_ERRORS as exc:
        kind = kind or "image"
        if _is_truncated(data, kind, exc):
            raise TruncatedImageError(f"truncated {kind}: {name}") from exc
        raise CorruptImageError(f"corrupt {kind}: {name} ({exc})") from exc


def _decode(data: bytes, name: str, max_pixels: int) -> DecodedImage:
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        # Image.open only parsed the header: refuse bombs before any pixel memory is allocated.
        if width * height > max_pixels:
            size = f"{width}x{height} = {width * height:,} pixels"
            raise ImageTooLargeError(_too_large(name, size, max_pixels))
        if width == 0 or height == 0:
            raise CorruptImageError(f"corrupt {im.format}: {name} (size {width}x{height})")
        source_mode, fmt = im.mode, im.format
        im.load()  # decode with Pillow first: it validates the data and classifies damage for us
        if fmt == "PNG" and data[24] == 16 and data[25] in _PNG16_NOT_PILLOW:
            pixels, alpha = _read_png16(data, im.info.get("transparency"))
            orientation = 1
            with suppress(*_DECODE_ERRORS):  # malformed EXIF: keep the pixels as stored
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            pixels = _orient(pixels, orientation)
            alpha = None if alpha is None else _orient(alpha, orientation)
        else:
            # Malformed EXIF: the pixels are fine, so keep them as stored rather than reject.
            with suppress(*_DECODE_ERRORS):
                ImageOps.exif_transpose(im, in_place=True)
            pixels, alpha = _pillow_to_arrays(im, name)
    return DecodedImage(pixels, alpha, source_mode, fmt)


def _pillow_to_arrays(im: Image.Image, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    mode = im.mode
    if mode in ("1", "La", "RGBa", "PA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        # Premultiplied alpha is undone and colour spaces become sRGB-ish RGB by Pillow's convert.
        target = {"1": "L", "La": "LA", "RGBa": "RGBA", "PA": "RGBA"}.get(mode, "RGB")
        im, mode = im.convert(target), target
    elif mode == "P":
        mode = "RGBA" if im.has_transparency_data else "RGB"
        im = im.convert(mode)

    if mode in ("LA", "RGBA"):
        arr = np.asarray(im)
        pixels = arr[..., 0] if mode == "LA" else arr[..., :3]
        return np.ascontiguousarray(pixels), np.ascontiguousarray(arr[..., -1])
    if mode in ("L", "RGB"):
        pixels = np.asarray(im, dtype=np.uint8)
    elif mode.startswith("I;16"):
        pixels = np.asarray(im).astype(np.uint16)  # I;16B is big-endian: make it native
    elif mode == "I":
        # 32-bit ints: 16-bit PNG/TIFF data may arrive as "I"; accept it only if nothing is lost.
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImageError(
                f"unsupported 32-bit integer image (values {values.min()}..{values.max()} do not "
                f"fit 16 bits): {name}"
            )
        pixels = values.astype(np.uint16)
    else:
        raise UnsupportedImageError(f"unsupported image mode {mode!r}: {name}")
    pixels = np.ascontiguousarray(pixels)
    return pixels, _colour_key_alpha(pixels, im.info.get("transparency"))


def _colour_key_alpha(pixels: np.ndarray, key: object) -> np.ndarray | None:
    """A PNG tRNS colour key (one gray value, or an RGB triple) as an explicit alpha channel."""
    if isinstance(key, int) and pixels.ndim == 2:
        hit = pixels == key
    elif isinstance(key, tuple) and len(key) == 3 and pixels.ndim == 3:
        hit = np.all(pixels == np.asarray(key, dtype=pixels.dtype), axis=-1)
    else:
        return None
    return np.where(hit, 0, np.iinfo(pixels.dtype).max).astype(pixels.dtype)


def _read_png16(data: bytes, colour_key: object) -> tuple[np.ndarray, np.ndarray | None]:
    """Full-precision decode of a 16-bit gray+alpha / RGB / RGBA PNG; ``colour_key`` is its tRNS
    colour (Pillow's ``info["transparency"]``: the file's 16-bit values), if any."""
    values = imagecodecs.png_decode(data)  # native-endian uint16, HxWxplanes
    if values.shape[2] in (2, 4):  # gray + alpha, RGBA
        pixels = values[..., 0] if values.shape[2] == 2 else values[..., :3]
        return np.ascontiguousarray(pixels), np.ascontiguousarray(values[..., -1])
    pixels = np.ascontiguousarray(values)
    return pixels, _colour_key_alpha(pixels, colour_key)


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """numpy twin of ImageOps.exif_transpose for arrays Pillow cannot hold (16-bit colour)."""
    flips = {
        2: lambda x: x[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda x: x[::-1, ::-1],  # ROTATE_180
        4: lambda x: x[::-1],  # FLIP_TOP_BOTTOM
        5: lambda x: x.swapaxes(0, 1),  # TRANSPOSE
        6: lambda x: np.rot90(x, -1),  # ROTATE_270 (90° clockwise)
        7: lambda x: x[::-1, ::-1].swapaxes(0, 1),  # TRANSVERSE
        8: lambda x: np.rot90(x, 1),  # ROTATE_90 (90° counter-clockwise)
    }
    flip = flips.get(orientation)
    return a if flip is None else np.ascontiguousarray(flip(a))


# Pillow's own guard compares against the module global Image.MAX_IMAGE_PIXELS (warning above it,
# DecompressionBombError above twice it) inside Image.open and some load paths (GIF frames, TIFF
# tiles). Our per-call max_pixels is the real limit, so for one call:
#   * the warning is turned into an exception: while Pillow's limit >= max_pixels a warning means
#     the image is over our limit too, so it maps to ImageTooLargeError instead of leaking to logs;
#   * if max_pixels is above Pillow's limit, the global is raised to max_pixels for this decode
#     and restored afterwards. Writers hold a lock and restore what they read, so the global never
#     changes permanently; decodes with such large limits run one at a time. Races are benign:
#     other threads see a looser Pillow guard for a while (our own check still runs), a concurrent
#     call may get a typed ImageTooLargeError from Pillow's restored limit, and as catch_warnings
#     is process-wide before Python 3.14 a concurrent warning may be printed instead of raised.
_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pillow_bomb_limit(max_pixels: int) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        current = Image.MAX_IMAGE_PIXELS
        if current is None or max_pixels <= current:
            yield
            return
        with _PILLOW_LIMIT_LOCK:
            saved = Image.MAX_IMAGE_PIXELS  # re-read under the lock: this is what we restore
            if saved is not None:
                Image.MAX_IMAGE_PIXELS = max(max_pixels, saved)
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def _too_large(name: str, size: str, max_pixels: int) -> str:
    return (
        f"image too large: {name} has {size}, over the limit of {max_pixels:,} pixels "
        f"(a decompression-bomb guard); pass a larger max_pixels if this input is trusted"
    )


def _sniff(data: bytes) -> str | None:
    """Format named by the file signature, for messages and truncation checks."""
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


def _is_truncated(data: bytes, kind: str, exc: BaseException) -> bool:
    """Truncated rather than damaged? Trust the format's end marker where it has one."""
    if kind == "PNG":
        return _PNG_IEND not in data[-4096:]  # tolerate a little trailing junk after IEND
    if kind == "JPEG":
        return not data.rstrip(b"\x00\r\n").endswith(b"\xff\xd9")
    if kind == "GIF":
        return not data.rstrip(b"\x00").endswith(b";")
    if kind == "WEBP":
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    return isinstance(exc, EOFError) or "truncated" in str(exc).lower()


# ---------------------------------------------------------------------------------------------
# encode

_FORMATS = {"png": "PNG", "jxl": "JXL", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
FORMAT_SUFFIXES = {"png": ".png", "jxl": ".jxl"}  # the lossless formats outputs are written in


def encode_image(
    image: DecodedImage,
    format: str = "png",
    *,
    png_compress_level: int | str = PNG_FAST,
    quality: int = 95,
) -> bytes:
    """Encode to ``png`` (8/16-bit, alpha kept; ``encode_png``), ``jxl`` (JPEG XL lossless, 8/16-bit,
    alpha kept), ``jpeg``/``jpg`` (alpha dropped) or ``webp``."""
    fmt = _FORMATS.get(format.lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"unsupported output format {format!r}; use one of: png, jxl, jpeg (jpg), webp")
    pixels, alpha = image.pixels, image.alpha
    out = io.BytesIO()
    if fmt in ("PNG", "JXL"):
        values = pixels if alpha is None else np.dstack([pixels, alpha])  # gray, GA, RGB or RGBA
        if fmt == "JXL":
            return imagecodecs.jpegxl_encode(values, lossless=True, effort=JXL_EFFORT, numthreads=1)
        return encode_png(values, png_compress_level)
    pixels, alpha = _to_8bit(pixels), None if alpha is None else _to_8bit(alpha)
    if fmt == "JPEG":
        # JPEG has no alpha channel: it is dropped, not composited. 4:4:4 keeps the chroma detail
        # that super-resolution just produced (Pillow defaults to 4:2:0).
        _to_pillow(pixels, None).save(out, "JPEG", quality=quality, subsampling=0)
    else:
        if pixels.ndim == 2:  # WebP stores only RGB(A)
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        _to_pillow(pixels, alpha).save(out, "WEBP", quality=quality)
    return out.getvalue()


def encode_png(values: np.ndarray, level: int | str = PNG_FAST) -> bytes:
    """A standard, lossless PNG of ``values`` (HxW gray, HxWx2 gray + alpha, HxWx3 RGB or HxWx4
    RGBA; uint8 or uint16). ``level``: ``PNG_FAST`` writes 8-bit RGB and RGBA with fpng (7.5-9.5x
    the speed of libpng at zlib level 1, for files 1.18-1.33x its size: benchmarks/png_writers.py)
    and the rest with libpng at ``PNG_LIBPNG_LEVEL``; 0-9 write everything with libpng at that zlib
    level (``_png_settings``): the smaller files, for the CPU."""
    if check_png_level(level) == PNG_FAST:
        fast = _fpng(values)
        if fast is not None:
            return fast
        level = PNG_LIBPNG_LEVEL
    return imagecodecs.png_encode(values, level=level, **_png_settings(level))


def check_png_level(level: Any) -> int | str:
    """``level`` when ``encode_png`` takes it (``PNG_FAST`` or a zlib level 0-9), else ValueError."""
    if level != PNG_FAST and (isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9):
        raise ValueError(f"PNG level {level!r} is neither {PNG_FAST!r} nor a zlib level 0-9")
    return level


def _fpng(values: np.ndarray) -> bytes | None:
    """fpng's PNG of 8-bit RGB or RGBA ``values``; None for any other layout, or where fpng is
    not installed (a platform without its wheel). Its binding neither checks what it is given (it
    converts a uint16 array to uint8 unasked) nor raises on failure (it returns no bytes), so both
    are checked here."""
    if values.dtype != np.uint8 or values.ndim != 3 or values.shape[2] not in (3, 4) or 0 in values.shape:
        return None
    try:
        import fpng
    except ImportError:
        return None
    data = fpng.from_ndarray(np.ascontiguousarray(values))
    return data if data.startswith(_PNG_SIGNATURE) else None


def _to_8bit(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    # Round to nearest: 65535 -> 255, and 257*k -> k exactly.
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _to_pillow(pixels: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    if alpha is None:
        return Image.fromarray(pixels)
    return Image.fromarray(np.dstack([pixels, alpha]))  # uint8 only: HxWx2 -> LA, HxWx4 -> RGBA


def _png_settings(level: int) -> dict[str, int]:
    """libpng's row filter and zlib's strategy for a zlib ``level`` (0-9).

    Every row is Paeth-filtered: trying all five filters per row, as Pillow and libpng do by
    default, costs a third of the time for files 0.2% smaller. Level 1 runs zlib's RLE strategy,
    which only matches runs; 2-9 search for repeated strings too. On PAN's x4 outputs of Set14 and
    Set5 (``benchmarks/png_levels.py``), level 1 makes files as small as level 6 does in a seventh
    of its time, and 7-9 make them 1-2.5% smaller for 10-40x the time. Level 0 stores the filtered
    rows.
    """
    strategy = imagecodecs.PNG.STRATEGY.RLE if level == 1 else imagecodecs.PNG.STRATEGY.DEFAULT
    return {"strategy": int(strategy), "filter": int(imagecodecs.PNG.FILTER.PAETH)}
