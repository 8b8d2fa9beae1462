"""decode_image / encode_image: modes, EXIF orientation, 16-bit, and typed errors.

Inputs are built in memory: a numpy-drawn test card (always available) and, where the shared
benchmarks exist, a crop of a real photo.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import png
import pytest
from PIL import Image

from pipeline.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    InvalidImageError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from pipeline.imaging.codec import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, encode_image

H, W = 48, 64


def _card(h: int = H, w: int = W) -> np.ndarray:
    """An asymmetric RGB uint8 pattern: gradients plus a texture, so flips and swaps show."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 13) % 256], -1).astype(np.uint8)


def _card16(h: int = H, w: int = W, planes: int = 3) -> np.ndarray:
    """uint16 values that use the low byte too (an 8-bit reader would lose them)."""
    y, x = np.mgrid[0:h, 0:w]
    chans = [(x * 1021 + y * 37 + c * 4099) % 65536 for c in range(planes)]
    return np.stack(chans, -1).astype(np.uint16).squeeze()


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16(values: np.ndarray, *, alpha: bool, **kw: object) -> bytes:
    h, w = values.shape[:2]
    planes = 1 if values.ndim == 2 else values.shape[2]
    grey = planes - alpha == 1
    buf = io.BytesIO()
    png.Writer(w, h, greyscale=grey, alpha=alpha, bitdepth=16, **kw).write(
        buf, values.reshape(h, -1).tolist()
    )
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _insert_after_ihdr(png_bytes: bytes, chunk: bytes) -> bytes:
    return png_bytes[:33] + chunk + png_bytes[33:]  # signature (8) + IHDR chunk (25)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _reopen(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _stacked(img: DecodedImage) -> np.ndarray:
    return img.pixels if img.alpha is None else np.dstack([img.pixels, img.alpha])


def _ihdr_depth_and_colour_type(png_bytes: bytes) -> tuple[int, int]:
    return png_bytes[24], png_bytes[25]


# ---------------------------------------------------------------------------------------------
# modes: decode to the right arrays, then PNG round trip to the right mode and the same pixels

rgb = _card()
gray = rgb[..., 0].copy()
alpha8 = rgb[..., 2].copy()
pal = Image.fromarray(rgb).quantize(16)
cmyk = Image.fromarray(rgb).convert("CMYK")
gray16 = _card16(planes=1)

# (id, input bytes, expected pixels, expected alpha, source_mode, PIL mode of the PNG we write)
MODE_CASES = [
    ("L", _save(Image.fromarray(gray), "PNG"), gray, None, "L", "L"),
    ("1", _save(Image.fromarray(gray > 127), "PNG"), np.where(gray > 127, 255, 0), None, "1", "L"),
    ("LA", _save(Image.fromarray(np.dstack([gray, alpha8])), "PNG"), gray, alpha8, "LA", "LA"),
    ("RGB", _save(Image.fromarray(rgb), "PNG"), rgb, None, "RGB", "RGB"),
    (
        "RGBA",
        _save(Image.fromarray(np.dstack([rgb, alpha8])), "PNG"),
        rgb,
        alpha8,
        "RGBA",
        "RGBA",
    ),
    ("P", _save(pal, "PNG"), np.asarray(pal.convert("RGB")), None, "P", "RGB"),
    (
        "P+transparency",
        _save(pal, "PNG", transparency=3),
        np.asarray(pal.convert("RGB")),
        np.where(np.asarray(pal) == 3, 0, 255),
        "P",
        "RGBA",
    ),
    (
        "P+alpha-palette",
        _save(pal, "PNG", transparency=bytes(range(0, 256, 16))),
        np.asarray(pal.convert("RGB")),
        np.asarray(pal) * 16,
        "P",
        "RGBA",
    ),
    ("CMYK-TIFF", _save(cmyk, "TIFF"), np.asarray(cmyk.convert("RGB")), None, "CMYK", "RGB"),
    (
        "L+tRNS",
        _save(Image.fromarray(gray), "PNG", transparency=int(gray[0, 0])),
        gray,
        np.where(gray == gray[0, 0], 0, 255),
        "L",
        "LA",
    ),
    ("I;16-PNG", _save(Image.fromarray(gray16), "PNG"), gray16, None, "I;16", "I;16"),
    ("I;16-TIFF", _save(Image.fromarray(gray16), "TIFF"), gray16, None, "I;16", "I;16"),
    (
        "I;16B-TIFF",
        _save(Image.frombytes("I;16B", (W, H), gray16.astype(">u2").tobytes()), "TIFF"),
        gray16,
        None,
        "I;16B",
        "I;16",
    ),
    (
        "I-TIFF",
        _save(Image.fromarray(gray16.astype(np.int32)), "TIFF"),
        gray16,
        None,
        "I",
        "I;16",
    ),
]


@pytest.mark.parametrize(
    ("data", "pixels", "alpha", "source_mode", "png_mode"),
    [case[1:] for case in MODE_CASES],
    ids=[case[0] for case in MODE_CASES],
)
def test_mode_decodes_and_round_trips_through_png(data, pixels, alpha, source_mode, png_mode):
    img = decode_image(data, name="card")
    pixels = np.asarray(pixels)
    assert img.source_mode == source_mode
    assert img.pixels.flags.c_contiguous
    assert img.pixels.dtype == (np.uint16 if png_mode == "I;16" else np.uint8)
    assert img.pixels.shape == pixels.shape
    np.testing.assert_array_equal(img.pixels, pixels)
    if alpha is None:
        assert img.alpha is None
    else:
        assert img.alpha is not None and img.alpha.dtype == img.pixels.dtype
        np.testing.assert_array_equal(img.alpha, alpha)
    assert (img.height, img.width) == (H, W)
    assert img.is_grayscale == (pixels.ndim == 2)

    out = encode_image(img, "png")
    back = _reopen(out)
    assert back.mode == png_mode
    np.testing.assert_array_equal(np.asarray(back), _stacked(img))
    again = decode_image(out)
    np.testing.assert_array_equal(_stacked(again), _stacked(img))


@pytest.mark.parametrize("mode", ["YCbCr", "LAB"])
def test_other_colour_spaces_become_rgb(mode):
    src = Image.fromarray(rgb).convert(mode)
    img = decode_image(_save(src, "TIFF"))
    assert img.source_mode == mode and img.pixels.shape == (H, W, 3) and img.alpha is None
    np.testing.assert_array_equal(img.pixels, np.asarray(src.convert("RGB")))


def test_cmyk_jpeg_becomes_rgb():
    img = decode_image(_save(cmyk, "JPEG", quality=95))
    assert (img.source_mode, img.format, img.pixels.shape) == ("CMYK", "JPEG", (H, W, 3))
    assert np.abs(img.pixels.astype(int) - rgb).mean() < 8


def test_gif_first_frame_and_bmp_webp():
    frames = [Image.fromarray(rgb).quantize(32), Image.fromarray(255 - rgb).quantize(32)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue())
    assert img.format == "GIF"
    np.testing.assert_array_equal(img.pixels, np.asarray(frames[0].convert("RGB")))

    bmp = decode_image(_save(Image.fromarray(rgb), "BMP"))
    np.testing.assert_array_equal(bmp.pixels, rgb)
    webp = decode_image(_save(Image.fromarray(rgb), "WEBP", lossless=True))
    np.testing.assert_array_equal(webp.pixels, rgb)


def test_float_and_wide_int_images_are_unsupported():
    with pytest.raises(UnsupportedImageError, match=r"'F'.*f\.tif"):
        decode_image(_save(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF"), name="f.tif")
    wide = np.full((4, 4), 70_000, np.int32)
    with pytest.raises(UnsupportedImageError, match=r"16 bits.*i\.tif"):
        decode_image(_save(Image.fromarray(wide), "TIFF"), name="i.tif")


# ---------------------------------------------------------------------------------------------
# 16-bit colour PNG: Pillow alone keeps only the high byte, so the codec reads these with imagecodecs.
# The files are made with pypng, a writer independent of the reader under test.


def test_pillow_alone_reads_16bit_rgb_png_as_8bit():
    """The reason imagecodecs reads these: evidence of Pillow's behaviour, not of ours."""
    values = _card16()
    im = _reopen(_png16(values, alpha=False))
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), values >> 8)


@pytest.mark.parametrize(
    ("planes", "has_alpha", "colour_type"),
    [(3, False, 2), (4, True, 6), (2, True, 4)],
    ids=["RGB16", "RGBA16", "LA16"],
)
@pytest.mark.parametrize("interlace", [False, True], ids=["straight", "interlaced"])
def test_16bit_colour_png_keeps_16_bits(planes, has_alpha, colour_type, interlace):
    values = _card16(planes=planes)
    data = _png16(values, alpha=has_alpha, interlace=interlace)
    img = decode_image(data)
    colour = values[..., : planes - has_alpha]
    assert img.bit_depth == 16 and img.pixels.dtype == np.uint16
    np.testing.assert_array_equal(img.pixels, colour.squeeze())
    if has_alpha:
        np.testing.assert_array_equal(img.alpha, values[..., -1])
    else:
        assert img.alpha is None

    out = encode_image(img, "png")
    assert _ihdr_depth_and_colour_type(out) == (16, colour_type)
    again = decode_image(out)
    assert again.bit_depth == 16
    np.testing.assert_array_equal(_stacked(again), _stacked(img))


def test_16bit_rgb_png_colour_key_becomes_alpha():
    values = _card16()
    key = tuple(int(v) for v in values[5, 7])
    img = decode_image(_png16(values, alpha=False, transparent=key))
    assert img.alpha is not None and img.alpha.dtype == np.uint16
    assert img.alpha[5, 7] == 0 and (img.alpha == 0).sum() == 1 and img.alpha.max() == 65535


def test_16bit_gray_png_with_alpha_is_written_as_such():
    img = DecodedImage(gray16, gray16[::-1].copy(), "LA", None)
    out = encode_image(img, "png")
    assert _ihdr_depth_and_colour_type(out) == (16, 4)
    np.testing.assert_array_equal(_stacked(decode_image(out)), _stacked(img))


# ---------------------------------------------------------------------------------------------
# EXIF orientation

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _quadrants(h: int = 40, w: int = 60) -> np.ndarray:
    a = np.empty((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = RED, GREEN
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = BLUE, WHITE
    return a


@pytest.mark.parametrize(
    ("orientation", "corners"),
    [
        (6, {"top_left": BLUE, "top_right": RED, "bottom_left": WHITE}),  # stored 90° CCW
        (8, {"top_left": GREEN, "bottom_left": RED, "top_right": WHITE}),  # stored 90° CW
    ],
)
def test_exif_rotated_jpeg_comes_out_upright(orientation, corners):
    data = _save(Image.fromarray(_quadrants()), "JPEG", quality=95, exif=_exif(orientation))
    img = decode_image(data, name="phone.jpg")
    assert img.pixels.shape == (60, 40, 3)  # stored 40x60 landscape -> upright portrait
    regions = {
        "top_left": img.pixels[2:12, 2:12],
        "top_right": img.pixels[2:12, -12:-2],
        "bottom_left": img.pixels[-12:-2, 2:12],
    }
    for corner, colour in corners.items():
        mean = regions[corner].reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - colour).max() < 12, (corner, mean)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_exact_transpose(orientation):
    """Same JPEG scan data, only the EXIF tag differs, so the result must be an exact transpose."""
    plain = decode_image(_save(Image.fromarray(rgb), "JPEG", quality=90)).pixels
    tagged = _save(Image.fromarray(rgb), "JPEG", quality=90, exif=_exif(orientation))
    expected = {
        1: plain,
        2: plain[:, ::-1],
        3: plain[::-1, ::-1],
        4: plain[::-1],
        5: plain.swapaxes(0, 1),
        6: np.rot90(plain, -1),
        7: np.rot90(plain, -1)[::-1],
        8: np.rot90(plain, 1),
    }[orientation]
    np.testing.assert_array_equal(decode_image(tagged).pixels, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_16bit_png_matches_pillow_on_8bit(orientation):
    values = _card16(planes=4)
    exif = _png_chunk(b"eXIf", _exif(orientation).tobytes())
    img16 = decode_image(_insert_after_ihdr(_png16(values, alpha=True), exif))
    ref8 = Image.fromarray((values >> 8).astype(np.uint8))
    img8 = decode_image(_save(ref8, "PNG", exif=_exif(orientation)))
    np.testing.assert_array_equal(img16.pixels >> 8, img8.pixels)
    np.testing.assert_array_equal(img16.alpha >> 8, img8.alpha)


# ---------------------------------------------------------------------------------------------
# encoding


@pytest.mark.parametrize(
    "img",
    [
        DecodedImage(rgb, None, "RGB", None),
        DecodedImage(gray, None, "L", None),
        DecodedImage(rgb, alpha8, "RGBA", None),
        DecodedImage(gray, alpha8, "LA", None),
        DecodedImage(_card16(), None, "RGB", None),
        DecodedImage(gray16, gray16.copy(), "LA", None),
    ],
    ids=["RGB", "L", "RGBA", "LA", "RGB16", "LA16"],
)
@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "JPEG", "webp", ".webp"])
def test_lossy_encodes_decode_back_to_the_same_size(img, fmt):
    out = encode_image(img, fmt, quality=90)
    back = decode_image(out)
    assert (back.height, back.width, back.bit_depth) == (H, W, 8)
    if "jp" in fmt.lower():
        assert back.format == "JPEG" and back.alpha is None  # JPEG has no alpha: dropped
        assert back.is_grayscale == img.is_grayscale
    else:
        assert back.format == "WEBP" and not back.is_grayscale  # WebP has no gray mode
        assert (back.alpha is None) == (img.alpha is None)


@pytest.mark.parametrize(("value16", "value8"), [(0, 0), (51400, 200), (51528, 200), (51529, 201)])
def test_16bit_to_jpeg_rounds_to_nearest(value16, value8):
    img = DecodedImage(np.full((16, 16), value16, np.uint16), None, "I;16", None)
    back = decode_image(encode_image(img, "jpeg", quality=100))
    assert set(np.unique(back.pixels)) == {value8}


def test_png_compress_level_changes_size_not_pixels():
    img = DecodedImage(rgb, None, "RGB", None)
    fast, small = encode_image(img, png_compress_level=0), encode_image(img, png_compress_level=9)
    assert len(small) < len(fast)
    np.testing.assert_array_equal(decode_image(fast).pixels, decode_image(small).pixels)


def test_unknown_format_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'gif'.*png, jxl, jpeg \(jpg\), webp"):
        encode_image(DecodedImage(rgb, None, "RGB", None), "gif")


def test_decoded_image_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        DecodedImage(rgb.astype(np.float32), None, "RGB", None)
    with pytest.raises(ValueError, match="HxW or HxWx3"):
        DecodedImage(np.zeros((4, 4, 4), np.uint8), None, "RGBA", None)
    with pytest.raises(ValueError, match="alpha"):
        DecodedImage(rgb, alpha8.astype(np.uint16), "RGBA", None)
    view = DecodedImage(rgb[:, ::-1], None, "RGB", None)
    assert view.pixels.flags.c_contiguous


# ---------------------------------------------------------------------------------------------
# errors


def _truncated_png() -> bytes:
    data = _save(Image.fromarray(rgb), "PNG")
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    """A complete PNG (IHDR, IDAT, IEND, valid CRCs) whose IDAT is not a zlib stream."""
    data = _save(Image.fromarray(rgb), "PNG")
    length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    garbage = bytes((i * 37 + 11) % 256 for i in range(length))
    return data[:33] + _png_chunk(b"IDAT", garbage) + data[33 + 12 + length :]


def _png16_with_bad_idat_crc() -> bytes:
    """Pillow skips IDAT CRCs, libpng checks them: damage found on the 16-bit path is still typed."""
    data = bytearray(_png16(_card16(), alpha=False))
    at = data.index(b"IDAT")
    data[at + 4 + struct.unpack(">I", data[at - 4 : at])[0]] ^= 0xFF
    return bytes(data)


def _header_bomb(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


ERROR_CASES = [
    ("empty", b"", EmptyImageError, {}),
    ("text", b"name,score\nbaby,31.2\n" * 20, NotAnImageError, {}),
    ("truncated-png", _truncated_png(), TruncatedImageError, {}),
    (
        "truncated-jpeg",
        _save(Image.fromarray(rgb), "JPEG")[:600],
        TruncatedImageError,
        {},
    ),
    ("corrupt-png", _corrupt_png(), CorruptImageError, {}),
    ("corrupt-png16", _png16_with_bad_idat_crc(), CorruptImageError, {}),
    ("header-bomb-pillow", _header_bomb(100_000, 100_000), ImageTooLargeError, {}),
    ("header-bomb-ours", _header_bomb(9_000, 9_000), ImageTooLargeError, {}),
    (
        "zero-bomb",
        _save(Image.new("L", (2000, 1500)), "PNG", optimize=True),
        ImageTooLargeError,
        {"max_pixels": 1_000_000},
    ),
]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    ("data", "error", "kwargs"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_bad_input_gives_typed_error_naming_the_input(data, error, kwargs):
    name = "uploads/x/input-file"
    with pytest.raises(error) as info:
        decode_image(data, name=name, **kwargs)
    assert isinstance(info.value, InvalidImageError)
    assert name in str(info.value)


def test_error_messages_say_what_is_wrong():
    with pytest.raises(TruncatedImageError, match=r"^truncated PNG: photos/a\.png$"):
        decode_image(_truncated_png(), name="photos/a.png")
    with pytest.raises(EmptyImageError, match="0 bytes"):
        decode_image(b"", name="a")
    with pytest.raises(ImageTooLargeError, match=r"9000x9000 = 81,000,000 pixels.*40,000,000"):
        decode_image(_header_bomb(9_000, 9_000), name="a")
    with pytest.raises(ImageTooLargeError, match=r"10,000,000,000 pixels.*max_pixels"):
        decode_image(_header_bomb(100_000, 100_000), name="a")
    assert len(_save(Image.new("L", (2000, 1500)), "PNG")) < 10_000  # really is a bomb


@pytest.mark.filterwarnings("error")
def test_per_call_limit_above_pillows_limit_works_and_leaves_it_unchanged(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # a 64x48 card is > 2x this
    data = _save(Image.fromarray(rgb), "PNG")
    img = decode_image(data, max_pixels=10_000)
    np.testing.assert_array_equal(img.pixels, rgb)
    assert Image.MAX_IMAGE_PIXELS == 1_000
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=3_000)
    assert Image.MAX_IMAGE_PIXELS == 1_000


def test_pillow_bomb_warning_becomes_typed_error(monkeypatch):
    # 3072 px: above Pillow's limit (warning zone, below 2x) and above ours.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError, match=r"w\.png has 3,072 pixels") as info:
            decode_image(_save(Image.fromarray(rgb), "PNG"), name="w.png", max_pixels=1_000)
    assert isinstance(info.value.__cause__, Image.DecompressionBombWarning)


def test_default_limit_is_forty_megapixels():
    assert DEFAULT_MAX_PIXELS == 40_000_000
    with pytest.raises(ValueError):
        decode_image(b"x", max_pixels=0)


# ---------------------------------------------------------------------------------------------
# a real photo (needs ../shared)


def test_real_photo_crop(benchmarks_dir):
    with Image.open(benchmarks_dir / "Set5" / "HR" / "baby.png") as src:
        crop = src.convert("RGB").crop((100, 150, 260, 270))
    photo = np.asarray(crop)
    img = decode_image(_save(crop, "PNG"), name="baby.png")
    np.testing.assert_array_equal(img.pixels, photo)
    np.testing.assert_array_equal(decode_image(encode_image(img)).pixels, photo)

    rotated = decode_image(_save(crop, "JPEG", quality=95, exif=_exif(6)))
    assert rotated.pixels.shape == (160, 120, 3)
    assert np.abs(rotated.pixels.astype(int) - np.rot90(photo, -1)).mean() < 4

    webp = decode_image(encode_image(img, "webp"))
    assert (webp.height, webp.width) == (120, 160)


def _png_rows(png_bytes: bytes) -> list[bytes]:
    """The filtered rows of a non-interlaced PNG: its IDAT chunks joined and inflated, cut per row."""
    width, height, depth, colour_type = struct.unpack(">IIBB", png_bytes[16:26])
    at, idat = 8, b""
    while at < len(png_bytes):
        length, tag = struct.unpack(">I4s", png_bytes[at : at + 8])
        if tag == b"IDAT":
            idat += png_bytes[at + 8 : at + 8 + length]
        at += 12 + length
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    stride = 1 + width * samples * depth // 8
    raw = zlib.decompress(idat)
    assert len(raw) == stride * height
    return [raw[y * stride : (y + 1) * stride] for y in range(height)]


@pytest.mark.parametrize("level", [0, 1, 6])
@pytest.mark.parametrize(
    "image",
    [
        DecodedImage(rgb, None, "RGB", None),
        DecodedImage(_card16(), None, "RGB", None),
        DecodedImage(gray, gray[::-1].copy(), "LA", None),
    ],
    ids=["RGB8", "RGB16", "LA8"],
)
def test_png_rows_are_all_paeth_filtered(image, level):
    """One filter for every row (type 4, Paeth): trying all five per row cost a third of the time."""
    out = encode_image(image, "png", png_compress_level=level)
    assert {row[0] for row in _png_rows(out)} == {4}
    np.testing.assert_array_equal(_stacked(decode_image(out)), _stacked(image))


def test_level_1_png_of_an_upscaled_photo_is_smaller_than_pillows(benchmarks_dir):
    """Level 1 runs zlib's RLE strategy: on smooth photos it beats string matching at levels 1-5.
    Measured on PAN's x4 outputs of Set14 and Set5: 0.90 of Pillow's level-1 size on average."""
    with Image.open(benchmarks_dir / "Set5" / "HR" / "baby.png") as src:
        photo = src.convert("RGB")  # a camera photo, as smooth as an upscaled one
    ours = encode_image(DecodedImage(np.asarray(photo), None, "RGB", None), "png", png_compress_level=1)
    assert len(ours) < 0.95 * len(_save(photo, "PNG", compress_level=1))


def _chunks(png: bytes) -> list[bytes]:
    chunks, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at : at + 4], "big")
        chunks.append(png[at + 4 : at + 8])
        at += 12 + length
    return chunks


@pytest.mark.parametrize(
    ("image", "writer"),
    [
        (DecodedImage(rgb, None, "RGB", None), "fpng"),
        (DecodedImage(rgb, gray, "RGBA", None), "fpng"),
        (DecodedImage(_card16(), None, "RGB", None), "libpng"),  # fpng would wrap 16-bit values unasked
        (DecodedImage(_card16(), _card16()[..., 0].copy(), "RGBA", None), "libpng"),
        (DecodedImage(gray, None, "L", None), "libpng"),
        (DecodedImage(gray, gray[::-1].copy(), "LA", None), "libpng"),  # fpng returns no bytes for 2 channels
        (DecodedImage(rgb[:, :1].copy(), None, "RGB", None), "fpng"),
    ],
    ids=["RGB8", "RGBA8", "RGB16", "RGBA16", "L8", "LA8", "one column"],
)
def test_the_fast_png_writer_takes_8bit_colour_and_every_png_round_trips_exactly(image, writer):
    """The default writes 8-bit RGB(A) with fpng (one IDAT, its private fdEC chunk) and the rest
    with libpng; each file decodes to the very values written, through Pillow too."""
    out = encode_image(image, "png")
    assert ("fdEC" in {c.decode() for c in _chunks(out)}) == (writer == "fpng")
    np.testing.assert_array_equal(_stacked(decode_image(out)), _stacked(image))
    if image.bit_depth == 8:
        with Image.open(io.BytesIO(out)) as back:
            np.testing.assert_array_equal(np.asarray(back).reshape(_stacked(image).shape), _stacked(image))


def test_without_fpng_every_png_goes_through_libpng(monkeypatch):
    """A platform without fpng's wheel: the same pixels, the libpng way."""
    import sys

    monkeypatch.setitem(sys.modules, "fpng", None)  # import fpng raises ImportError
    image = DecodedImage(rgb, None, "RGB", None)
    out = encode_image(image, "png")
    assert "fdEC" not in {c.decode() for c in _chunks(out)}
    np.testing.assert_array_equal(decode_image(out).pixels, rgb)


def test_png_levels_are_fast_or_zlib_levels():
    with pytest.raises(ValueError, match="neither 'fast' nor a zlib level 0-9"):
        encode_image(DecodedImage(rgb, None, "RGB", None), "png", png_compress_level=10)


@pytest.mark.parametrize(
    "image",
    [
        DecodedImage(rgb, None, "RGB", None),
        DecodedImage(rgb, gray, "RGBA", None),
        DecodedImage(_card16(), None, "RGB", None),
        DecodedImage(gray, gray[::-1].copy(), "LA", None),
    ],
    ids=["RGB8", "RGBA8", "RGB16", "LA8"],
)
def test_jpeg_xl_is_lossless_in_every_layout(image):
    import imagecodecs

    out = encode_image(image, "jxl")
    assert out[:2] == b"\xff\x0a" or out[4:8] == b"JXL "  # a codestream or its container
    np.testing.assert_array_equal(
        imagecodecs.jpegxl_decode(out).reshape(_stacked(image).shape), _stacked(image)
    )


def test_an_images_repr_names_it_without_printing_its_pixels():
    """Ray Data formats ``str`` of whole columns of images at every stage boundary: printing the
    pixel arrays cost 0.24 ms per image there."""
    rgba = DecodedImage(np.zeros((270, 480, 3), np.uint8), np.zeros((270, 480), np.uint8), "RGBA", "PNG")
    gray16 = DecodedImage(np.zeros((5, 7), np.uint16), None, "I;16", None)
    assert repr(rgba) == "DecodedImage(480x270 RGB + alpha, 8-bit, source_mode='RGBA', format='PNG')"
    assert repr(gray16) == "DecodedImage(7x5 gray, 16-bit, source_mode='I;16', format=None)"
    assert "array" not in str(np.array([rgba, gray16], dtype=object))
