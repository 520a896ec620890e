"""engine.image_input: what uploads are accepted, how they become arrays, how masks and pastes work."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.errors import InvalidRequestError
from engine.image_input import (
    MAX_INPUT_PIXELS,
    decode_mask,
    feathered_paste,
    fit_mask,
    fit_to_size,
    image_size,
    mask_from_image_alpha,
    open_image,
    to_rgb,
)

# A Pillow warning (DecompressionBombWarning, palette-transparency warnings) must never leak.
pytestmark = pytest.mark.filterwarnings("error")

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refusal(data: bytes, param: str = "image") -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        open_image(data, param)
    assert caught.value.param == param
    assert param in str(caught.value)
    return caught.value


# --- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_accepted(fmt):
    image = open_image(encode(Image.new("RGB", (24, 16), RED), fmt), "image")
    assert image.size == (24, 16)
    assert np.abs(to_rgb(image).astype(int) - RED).max() <= 8  # JPEG/WebP are lossy


@pytest.mark.parametrize("fmt, name", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_formats_are_refused_by_name(fmt, name):
    error = refusal(encode(Image.new("RGB", (8, 8), RED), fmt), "messages[2].content[1]")
    assert name in str(error) and "PNG, JPEG or WebP" in str(error)


def test_heic_is_refused_by_name():
    assert "HEIC" in str(refusal(b"\0\0\0\x18ftypheic" + b"\0" * 32))


def test_garbage_bytes_are_not_an_image():
    assert "not an image" in str(refusal(b"this is not an image at all", "mask"))


def test_empty_bytes_are_refused():
    assert "empty" in str(refusal(b""))


def test_truncated_png_is_refused():
    data = encode(Image.fromarray(noise(64, 64)))
    assert "truncated or corrupt PNG" in str(refusal(data[: len(data) // 2]))


def test_truncated_jpeg_is_refused():
    data = encode(Image.fromarray(noise(64, 64)), "JPEG", quality=95)
    assert "truncated or corrupt JPEG" in str(refusal(data[: len(data) // 2]))


def test_open_image_keeps_the_image_mode():
    assert open_image(encode(Image.new("P", (4, 4), 1)), "image").mode == "P"


# --- pixel limit -----------------------------------------------------------------------------


def test_a_huge_header_is_refused_before_any_pixel_is_decoded():
    # 30000 x 30000 is over Pillow's own DecompressionBombError limit too; the file holds no such
    # pixels, so a decode attempt would report "truncated", not the size.
    data = png_header_only(30000, 30000)
    error = refusal(data)
    assert "30000x30000" in str(error) and "over the limit" in str(error)
    with pytest.raises(InvalidRequestError, match="over the limit"):
        image_size(data, "image")


def test_a_real_decompression_bomb_png_is_refused():
    data = encode(Image.new("1", (5000, 5000), 0))  # 25 Mpx of one colour compresses to a few KB
    assert len(data) < 10_000 and 5000 * 5000 > MAX_INPUT_PIXELS
    assert "over the limit" in str(refusal(data))


def test_max_pixels_lowers_the_limit():
    data = encode(Image.new("RGB", (20, 20), RED))
    with pytest.raises(InvalidRequestError, match="400 pixels, over the limit of 399"):
        open_image(data, "image", max_pixels=399)
    assert open_image(data, "image", max_pixels=400).size == (20, 20)


# --- size and orientation --------------------------------------------------------------------


def rotated_png() -> bytes:
    """A 4x2 PNG with a red top-left pixel and EXIF orientation 6 (display turned 90 deg clockwise)."""
    stored = Image.new("RGB", (4, 2), BLUE)
    stored.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, exif=exif.tobytes())


def test_image_size_reads_the_header():
    assert image_size(encode(Image.new("RGB", (30, 20), RED)), "image") == (30, 20)


def test_open_image_applies_exif_orientation():
    rgb = to_rgb(open_image(rotated_png(), "image"))
    assert rgb.shape == (4, 2, 3)
    assert tuple(rgb[0, 1]) == RED  # top-left turned clockwise lands top-right


def test_image_size_agrees_with_open_image_on_rotated_images():
    assert image_size(rotated_png(), "image") == open_image(rotated_png(), "image").size == (2, 4)


# --- to_rgb ----------------------------------------------------------------------------------


def reopen(image: Image.Image, **options) -> Image.Image:
    return open_image(encode(image, **options), "image")


def test_palette_image_becomes_rgb():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([*RED, *GREEN])
    image.putpixel((1, 0), 1)
    assert to_rgb(reopen(image)).tolist() == [[list(RED), list(GREEN)]]


def test_palette_transparency_is_composited_over_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([*RED, *GREEN])
    image.putpixel((1, 0), 1)
    assert to_rgb(reopen(image, transparency=1)).tolist() == [[list(RED), list(WHITE)]]


def test_palette_alpha_per_entry_is_composited_over_white():
    # Pillow warns when such an image is converted straight to RGB; it must go through RGBA.
    rgba = Image.new("RGBA", (3, 1), (*RED, 255))
    rgba.putpixel((1, 0), (*BLUE, 0))
    rgba.putpixel((2, 0), (*GREEN, 128))
    image = reopen(rgba.quantize(colors=3, method=Image.Quantize.FASTOCTREE))
    assert image.mode == "P" and isinstance(image.info["transparency"], bytes)
    assert to_rgb(image).tolist() == [[list(RED), list(WHITE), [127, 255, 127]]]


def test_16_bit_grey_is_scaled_not_clipped():
    grey = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    image = reopen(grey)
    assert image.mode.startswith("I;16")
    assert to_rgb(image)[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb():
    image = open_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), "image")  # no cyan/black: red
    assert image.mode == "CMYK"
    assert np.abs(to_rgb(image).astype(int) - RED).max() <= 8


def test_grey_with_alpha_is_composited_over_white():
    image = Image.new("LA", (2, 1), (10, 255))
    image.putpixel((1, 0), (10, 0))
    assert to_rgb(reopen(image))[0, :, 0].tolist() == [10, 255]


def test_rgba_half_transparency_blends_with_white():
    rgb = to_rgb(reopen(Image.new("RGBA", (1, 1), (0, 0, 0, 128))))
    assert rgb.tolist() == [[[127, 127, 127]]]  # 0 * 128/255 + 255 * 127/255


def test_one_bit_image_becomes_black_and_white():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    assert to_rgb(reopen(image))[0, :, 0].tolist() == [0, 255]


def test_32_bit_integer_mode_is_read_as_16_bit():
    image = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32), mode="I")
    assert to_rgb(image)[0, :, 0].tolist() == [0, 255, 255]


def test_float_mode_is_read_on_the_0_to_255_scale():
    image = Image.fromarray(np.array([[-5.0, 127.6, 300.0]], dtype=np.float32))
    assert to_rgb(image)[0, :, 0].tolist() == [0, 128, 255]


def test_to_rgb_returns_h_w_3_uint8():
    rgb = to_rgb(reopen(Image.new("RGBA", (5, 3), (1, 2, 3, 255))))
    assert rgb.shape == (3, 5, 3) and rgb.dtype == np.uint8


# --- fit_to_size and fit_mask ----------------------------------------------------------------


def test_exact_size_is_returned_bit_for_bit():
    rgb = noise(64, 48)
    out = fit_to_size(rgb, 64, 48)
    assert out is not rgb and np.array_equal(out, rgb)


def test_wide_image_is_covered_and_centre_cropped():
    # 200x100 -> 64x64: scaled to 128x64, so the centre 100 source columns survive, all rows.
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:, :] = RED
    rgb[:, 40:160] = GREEN  # the kept centre, with margin for Lanczos
    rgb[:12, 40:160] = BLUE  # a band on top: proves no row is cropped
    out = fit_to_size(rgb, 64, 64).astype(int)
    assert out.shape == (64, 64, 3)
    assert np.abs(out[10:, :] - GREEN).max() <= 2  # no red edge column survived
    assert np.abs(out[:5, :] - BLUE).max() <= 2


def test_fit_keeps_aspect_ratio():
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[30:70, 80:120] = WHITE  # a 40x40 square at the centre
    out = fit_to_size(rgb, 64, 64)
    rows, cols = np.nonzero(out[..., 0] > 127)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1


def test_a_pure_crop_does_not_resample():
    rgb = noise(200, 64)
    assert np.array_equal(fit_to_size(rgb, 64, 64), rgb[:, 68:132])


def test_small_image_is_scaled_up_to_cover():
    assert fit_to_size(noise(32, 16), 64, 64).shape == (64, 64, 3)


def test_fit_mask_exact_size_is_unchanged():
    mask = (noise(40, 30)[..., 0] > 127).astype(np.float32)
    assert np.array_equal(fit_mask(mask, 40, 30), mask)


def test_fit_mask_uses_the_same_geometry_as_fit_to_size():
    mask = np.zeros((100, 200), np.float32)
    mask[:, 40:160] = 1.0
    out = fit_mask(mask, 64, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert out.min() >= 0.0 and np.all(out[:, 1:-1] == 1.0)


# --- decode_mask -----------------------------------------------------------------------------


def test_openai_mask_repaints_fully_transparent_pixels_only():
    mask = Image.new("RGBA", (3, 1), (0, 0, 0, 255))
    mask.putpixel((1, 0), (0, 0, 0, 0))
    mask.putpixel((2, 0), (255, 255, 255, 1))  # almost transparent, white: still kept
    assert decode_mask(encode(mask), "mask", (3, 1)).tolist() == [[0.0, 1.0, 0.0]]


def test_grey_alpha_and_palette_masks_follow_openai_rule():
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((0, 0), (0, 0))
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([*BLACK, *WHITE])
    palette.putpixel((0, 0), 1)
    assert decode_mask(encode(la), "mask", (2, 1)).tolist() == [[1.0, 0.0]]
    assert decode_mask(encode(palette, transparency=1), "mask", (2, 1)).tolist() == [[1.0, 0.0]]


def test_mask_without_alpha_repaints_white():
    mask = Image.new("L", (3, 1), 0)
    mask.putpixel((1, 0), 127)
    mask.putpixel((2, 0), 128)
    assert decode_mask(encode(mask), "mask", (3, 1)).tolist() == [[0.0, 0.0, 1.0]]


def test_rgb_mask_repaints_white():
    mask = Image.new("RGB", (2, 1), BLACK)
    mask.putpixel((0, 0), WHITE)
    out = decode_mask(encode(mask), "mask", (2, 1))
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 0.0]]


def test_one_bit_mask_works():
    mask = Image.new("1", (2, 1), 0)
    mask.putpixel((1, 0), 1)
    assert decode_mask(encode(mask), "mask", (2, 1)).tolist() == [[0.0, 1.0]]


def test_16_bit_grey_mask_works():
    mask = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert decode_mask(encode(mask), "mask", (2, 1)).tolist() == [[0.0, 1.0]]


def test_an_all_opaque_rgba_mask_repaints_nothing_and_is_refused():
    mask = Image.new("RGBA", (2, 1), (0, 0, 0, 255))
    mask.putpixel((1, 0), (255, 255, 255, 255))  # white, but opaque: OpenAI's rule keeps it
    with pytest.raises(InvalidRequestError, match="alpha channel but no fully transparent pixel") as caught:
        decode_mask(encode(mask), "mask", (2, 1))
    assert caught.value.param == "mask"


def test_mask_of_another_size_names_both_sizes():
    with pytest.raises(InvalidRequestError) as caught:
        decode_mask(encode(Image.new("L", (30, 20), 255)), "mask", (64, 48))
    assert caught.value.param == "mask"
    assert "30x20" in str(caught.value) and "64x48" in str(caught.value)


def test_mask_that_keeps_everything_is_refused_naming_the_convention():
    with pytest.raises(InvalidRequestError, match="repaints nothing: mask has no transparency") as caught:
        decode_mask(encode(Image.new("L", (8, 8), 0)), "mask", (8, 8))
    assert caught.value.param == "mask" and "OpenAI's rule" in str(caught.value)


def test_alpha_mask_without_a_fully_transparent_pixel_is_refused():
    with pytest.raises(InvalidRequestError, match="has an alpha channel but no fully transparent pixel"):
        decode_mask(encode(Image.new("RGBA", (8, 8), (255, 255, 255, 128))), "mask", (8, 8))


def test_mask_bytes_get_the_same_format_checks():
    with pytest.raises(InvalidRequestError, match="mask is a GIF image"):
        decode_mask(encode(Image.new("L", (8, 8), 255), "GIF"), "mask", (8, 8))


# --- mask_from_image_alpha -------------------------------------------------------------------


def test_transparent_pixels_of_the_image_become_its_mask():
    image = Image.new("RGBA", (2, 1), (9, 9, 9, 255))
    image.putpixel((0, 0), (9, 9, 9, 0))
    mask = mask_from_image_alpha(reopen(image))
    assert mask is not None and mask.dtype == np.float32 and mask.tolist() == [[1.0, 0.0]]


def test_image_without_alpha_has_no_mask():
    assert mask_from_image_alpha(reopen(Image.new("RGB", (2, 2), RED))) is None


def test_image_without_a_fully_transparent_pixel_has_no_mask():
    assert mask_from_image_alpha(reopen(Image.new("RGBA", (2, 2), (1, 2, 3, 1)))) is None


# --- feathered_paste -------------------------------------------------------------------------


def left_half_mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[:, : size // 2] = 1.0
    return mask


def test_paste_keeps_the_input_exactly_beyond_twice_the_feather():
    original, generated = noise(64, 64, 1), noise(64, 64, 2)
    out = feathered_paste(original, generated, left_half_mask(), feather_px=4)
    assert np.array_equal(out[:, 32 + 8 :], original[:, 32 + 8 :])  # column 40 is 9 px from column 31


def test_paste_is_exactly_generated_deep_inside_the_mask():
    original, generated = noise(64, 64, 1), noise(64, 64, 2)
    out = feathered_paste(original, generated, left_half_mask(), feather_px=4)
    assert np.array_equal(out[:, : 32 - 4], generated[:, : 32 - 4])  # includes the image border


def test_paste_seam_is_soft_and_monotone():
    original = np.zeros((64, 64, 3), np.uint8)
    generated = np.full((64, 64, 3), 255, np.uint8)
    row = feathered_paste(original, generated, left_half_mask(), feather_px=4)[32, :, 0].astype(int)
    assert np.all(np.diff(row) <= 0)  # generated (255) fades to original (0), never back
    assert np.count_nonzero((row > 0) & (row < 255)) >= 4


def test_zero_feather_is_a_hard_paste():
    original, generated = noise(64, 64, 1), noise(64, 64, 2)
    out = feathered_paste(original, generated, left_half_mask(), feather_px=0)
    assert np.array_equal(out[:, :32], generated[:, :32]) and np.array_equal(out[:, 32:], original[:, 32:])


def test_empty_mask_returns_the_input():
    original, generated = noise(16, 16, 1), noise(16, 16, 2)
    assert np.array_equal(feathered_paste(original, generated, np.zeros((16, 16), np.float32)), original)
