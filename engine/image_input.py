"""Images users send for editing (img2img, inpainting): bytes in, checked arrays out.

Used twice: by the front end, to refuse a bad upload with a 400 before it is queued, and by the
worker, to turn the bytes into arrays. Pillow and numpy only (no torch, no HTTP). Every function
that reads request bytes takes `param`, the request field they came from ("image", "mask",
"messages[2].content[1]"), and raises `InvalidRequestError(..., param=param)` naming it.

Policies (the README cites this list):

- Formats: PNG, JPEG and WebP only, recognised by their magic bytes, never by a file name. GIF,
  BMP, TIFF, HEIC/AVIF are refused by name; anything else is "not an image". Animated PNG/WebP
  give their first frame. The image is fully decoded on open, so a truncated or corrupt file is
  refused at validation instead of failing later inside the worker.
- Pixel limit: `MAX_INPUT_PIXELS` (4096 x 4096). It is checked on the header's size, before a
  single pixel is decoded: a tiny PNG can claim 30000 x 30000 pixels of one colour and would
  otherwise cost gigabytes to decode (a decompression bomb). The plugins are called directly
  rather than through `Image.open`, so Pillow's own DecompressionBombWarning/Error (which
  depend on the process-wide `Image.MAX_IMAGE_PIXELS`) never fire; our limit is lower anyway.
- Orientation: the EXIF (or XMP) orientation tag is applied, as cameras and phones expect. It
  is read from the header only, so `image_size` (which decodes nothing) and `open_image` agree.
- Colour: `to_rgb` accepts every mode Pillow can hold. Transparency is composited over WHITE,
  as image editors and browsers show transparent photos; 16-bit grey is scaled 0..65535 ->
  0..255 (not clipped), mode F is read on L's 0..255 scale.
- Fit: "resize to cover, then centre-crop". The image is scaled (Lanczos) by the smallest factor
  that covers the requested size, keeping its aspect ratio, and the centre is cut out. An image
  of exactly the requested size is returned untouched, never resampled. Masks get the same
  geometry (bilinear), so mask and image stay aligned.
- Masks: 1.0 = repaint, 0.0 = keep, binary, same size as the image. (a) OpenAI's rule, when the
  mask has transparency (RGBA, LA, PA, or a tRNS chunk): fully transparent pixels (alpha == 0)
  are repainted, all others kept; an alpha channel opaque everywhere repaints nothing and is
  refused. (b) Without an alpha channel (L, RGB, 1-bit, 16-bit grey): white is repainted, as in
  diffusers and AUTOMATIC1111, with luminance >= 128 counting as white. With no mask, an
  image with fully transparent pixels is its own mask (OpenAI's rule, `mask_from_image_alpha`).
- Feathering: the served image keeps the input outside the mask. The mask is grown by
  feather_px // 2 and blurred so the seam is soft; pixels farther than 2 * feather_px outside
  the mask (in straight-line distance) are exactly the input, and pixels more than feather_px
  inside (chessboard distance) exactly the generated.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageFilter, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from engine.errors import InvalidRequestError

log = logging.getLogger(__name__)

# A decompression-bomb limit, checked on the header before decoding: a few KB of PNG can claim
# gigapixels. 4096 x 4096 is above any size these models render (inputs are fitted down anyway)
# and decodes to at most 67 MB as 8-bit RGBA, an amount one request may cost a worker.
MAX_INPUT_PIXELS = 4096 * 4096

_FORMATS = "PNG, JPEG or WebP"
_DECODERS = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}
# Formats people often send by mistake, named in the error so they know what to convert.
_REFUSED = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
# Phones save HEIC (iPhone) or AVIF; other ISO-media brands (MP4 video) stay "not an image".
_ISO_BRANDS = {b: "HEIC" for b in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")}
_ISO_BRANDS.update({b"avif": "AVIF", b"avis": "AVIF"})
# EXIF orientation -> the transpose that shows the image upright (EXIF 2.3, tag 0x0112). Applied
# here rather than by ImageOps.exif_transpose, which re-reads EXIF after decoding (a PNG's eXIf
# chunk may follow the pixels) and could then disagree with the header-only `image_size`.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _sniff(data: bytes, param: str) -> str:
    """The format the magic bytes name, if it is one we decode; otherwise an error naming it."""
    if not data:
        raise InvalidRequestError(f"{param} is empty; send a {_FORMATS} image", param=param)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    refused = next((name for magic, name in _REFUSED if data.startswith(magic)), None)
    if refused is None and data[4:8] == b"ftyp":  # ISO media: the brand says HEIC, AVIF or video
        refused = _ISO_BRANDS.get(data[8:12])
    if refused is not None:
        raise InvalidRequestError(f"{param} is a {refused} image; send a {_FORMATS} image", param=param)
    raise InvalidRequestError(f"{param} is not an image; send the bytes of a {_FORMATS} image", param=param)


def _open_header(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Parse the header only (no pixels decoded) and enforce the pixel limit on its size."""
    fmt = _sniff(data, param)
    try:
        image = _DECODERS[fmt](io.BytesIO(data))
    except Exception as err:  # Pillow raises SyntaxError, OSError, struct.error... on bad headers
        raise InvalidRequestError(f"{param} is a truncated or corrupt {fmt} file ({err})", param=param) from err
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequestError(
            f"{param} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
            "send a smaller image",
            param=param,
        )
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF/XMP orientation (1..8) from the header; 1 if absent or unreadable."""
    try:
        # The base-class method reads only what the header put in `info`; PNG's override would
        # decode every pixel looking for an eXIf chunk after the image data.
        value = Image.Image.getexif(image).get(_ORIENTATION_TAG, 1)
    except Exception as err:  # a broken EXIF block is a missing hint, not a broken image
        log.debug("ignoring unreadable EXIF orientation: %s", err)
        return 1
    return value if value in _UPRIGHT else 1


def open_image(data: bytes, param: str, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Decode a PNG/JPEG/WebP upload fully, upright, in its own mode."""
    image = _open_header(data, param, max_pixels)
    orientation = _orientation(image)
    try:
        image.load()
    except Exception as err:  # truncated data, bad checksums, decoder errors: all mean corrupt
        raise InvalidRequestError(
            f"{param} is a truncated or corrupt {image.format} file ({err})", param=param
        ) from err
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    return image


def image_size(data: bytes, param: str, max_pixels: int = MAX_INPUT_PIXELS) -> tuple[int, int]:
    """(width, height) as `open_image` would return it, read from the header alone."""
    image = _open_header(data, param, max_pixels)
    width, height = image.size
    # Orientations 5..8 turn the image a quarter, swapping its sides.
    return (height, width) if _orientation(image) >= 5 else (width, height)


def _has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _grey16_to_8(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 with rounding (65535 -> 255, 32768 -> 128). (H, W) -> (H, W) uint8."""
    v = np.clip(values, 0, 65535).astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _colour_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) uint8 colour and (H, W) uint8 alpha, or None if the image has no transparency."""
    if image.mode.startswith("I"):
        # I;16* is how Pillow decodes 16-bit grey PNGs; plain I is how older Pillow did, so it
        # is read on the same 0..65535 scale.
        values = np.asarray(image)
        grey = _grey16_to_8(values)
        alpha = None
        if "transparency" in image.info:  # a 16-bit grey tRNS chunk names one transparent value
            alpha = np.where(values == image.info["transparency"], 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), alpha
    if image.mode == "F":
        # Pillow's float images share L's 0..255 scale (L -> F keeps the numbers).
        grey = np.rint(np.clip(np.nan_to_num(np.asarray(image)), 0, 255)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), None
    if _has_transparency(image):
        # convert("RGBA") resolves palettes, tRNS colours and premultiplied modes into one alpha.
        rgba = np.asarray(image.convert("RGBA"))
        return rgba[..., :3], rgba[..., 3]
    return np.asarray(image.convert("RGB")), None


def _alpha(image: Image.Image) -> np.ndarray | None:
    """(H, W) uint8 alpha of an image with transparency, else None."""
    return _colour_and_alpha(image)[1] if _has_transparency(image) else None


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8 RGB, transparency composited over white."""
    rgb, alpha = _colour_and_alpha(image)
    if alpha is None:
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    a = alpha.astype(np.uint32)[..., None]
    # out = c * a + white * (1 - a), in integers with rounding.
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _cover(size: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """(scaled_w, scaled_h, left, top): the smallest aspect-keeping scale covering width x height."""
    w, h = size
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    scale = max(width / w, height / h)
    scaled_w, scaled_h = max(width, round(w * scale)), max(height, round(h * scale))
    return scaled_w, scaled_h, (scaled_w - width) // 2, (scaled_h - height) // 2


def fit_to_size(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8: resize to cover (Lanczos), crop the centre."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if rgb.shape[:2] == (height, width):
        return rgb.copy()  # exact size: never resample
    scaled_w, scaled_h, left, top = _cover((rgb.shape[1], rgb.shape[0]), width, height)
    if (scaled_w, scaled_h) != (rgb.shape[1], rgb.shape[0]):  # a pure crop needs no resampling
        rgb = np.asarray(Image.fromarray(rgb).resize((scaled_w, scaled_h), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(rgb[top : top + height, left : left + width])


def fit_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) float in [0, 1] -> (height, width) float32, same geometry as `fit_to_size`.

    Bilinear rather than nearest: it puts the 0.5 level of a binary edge where the edge really
    lands after scaling, instead of snapping it to whole source pixels. Consumers that need a
    binary mask threshold at 0.5 (as `feathered_paste` does).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    mask = mask.astype(np.float32)
    if mask.shape == (height, width):
        return mask.copy()
    scaled_w, scaled_h, left, top = _cover((mask.shape[1], mask.shape[0]), width, height)
    if (scaled_w, scaled_h) != (mask.shape[1], mask.shape[0]):
        mask = np.asarray(Image.fromarray(mask).resize((scaled_w, scaled_h), Image.Resampling.BILINEAR))
    return np.clip(mask[top : top + height, left : left + width], 0.0, 1.0).astype(np.float32)


_RULE = "(OpenAI's rule: fully transparent pixels are repainted; without alpha: white)"


def decode_mask(data: bytes, param: str, size: tuple[int, int]) -> np.ndarray:
    """Mask bytes -> (H, W) float32, 1.0 = repaint, 0.0 = keep; `size` is the image's (w, h)."""
    image = open_image(data, param)
    if image.size != tuple(size):
        raise InvalidRequestError(
            f"{param} is {image.size[0]}x{image.size[1]} but the image it goes with is {size[0]}x{size[1]}; "
            "send a mask of the same size as the image",
            param=param,
        )
    alpha = _alpha(image)
    if alpha is not None:
        # OpenAI's rule for any mask with an alpha channel, an all-opaque one included: it repaints
        # nothing, which is refused below rather than guessed from its colours.
        repaint = alpha == 0
        if not repaint.any():
            raise InvalidRequestError(
                f"the mask repaints nothing: {param} has an alpha channel but no fully transparent pixel {_RULE}",
                param=param,
            )
    else:
        rgb = to_rgb(image).astype(np.uint32)
        luma = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000  # ITU-R BT.601
        repaint = luma >= 128
        if not repaint.any():
            raise InvalidRequestError(
                f"the mask repaints nothing: {param} has no transparency and no white pixel {_RULE}",
                param=param,
            )
    return repaint.astype(np.float32)


def mask_from_image_alpha(image: Image.Image) -> np.ndarray | None:
    """OpenAI's rule with no mask sent: (H, W) float32, 1.0 where the image is fully transparent.

    None if the image has no transparency or no fully transparent pixel.
    """
    alpha = _alpha(image)
    if alpha is None or not (alpha == 0).any():
        return None
    return (alpha == 0).astype(np.float32)


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Grow a (H, W) bool mask by k pixels in the chessboard metric (a (2k+1)^2 square).

    Separable max over shifted slices: O(k) numpy passes, where Pillow's MaxFilter sorts a
    (2k+1)^2 window per pixel. Outside the image counts as False.
    """
    out = mask
    for axis in (0, 1):
        n = out.shape[axis]
        padded = np.pad(out, [(k, k) if a == axis else (0, 0) for a in (0, 1)])
        grown = np.zeros_like(out)
        for shift in range(2 * k + 1):
            grown |= padded[shift : shift + n] if axis == 0 else padded[:, shift : shift + n]
        out = grown
    return out


def feathered_paste(
    original: np.ndarray, generated: np.ndarray, mask: np.ndarray, feather_px: int = 4
) -> np.ndarray:
    """Keep `original` outside the mask, `generated` inside, with a soft seam of ~feather_px.

    original, generated: (H, W, 3) uint8; mask: (H, W) float, >= 0.5 = repainted. -> (H, W, 3)
    uint8 = original * (1 - w) + generated * w, where w is the mask grown by feather_px // 2 and
    Gaussian-blurred with sigma feather_px / 2 (so the blur's 2-sigma radius is feather_px).
    Pixels farther than 2 * feather_px from the mask (straight-line distance) are forced to
    exactly the input, and pixels more than feather_px inside to exactly the generated image;
    the blur has (nearly) decayed there, so the forcing adds no visible step.
    """
    if original.shape != generated.shape or original.shape != (*mask.shape, 3):
        raise ValueError(
            f"original {original.shape}, generated {generated.shape} and mask {mask.shape} must be "
            "(H, W, 3), (H, W, 3) and (H, W)"
        )
    repaint = mask >= 0.5
    if feather_px <= 0:
        return np.where(repaint[..., None], generated, original).astype(np.uint8)
    grown = _dilate(repaint, feather_px // 2)
    blurred = Image.fromarray(grown.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(feather_px / 2))
    w = np.asarray(blurred, dtype=np.float32) / 255.0
    # Far outside: exactly the input. The square dilation reaches 2 * feather_px / sqrt(2) a side,
    # so every pixel farther than 2 * feather_px from the mask in any direction is outside it.
    w[~_dilate(repaint, int(2 * feather_px / 2**0.5))] = 0.0
    w[~_dilate(~repaint, feather_px)] = 1.0  # deep inside (image borders count as inside): exactly generated
    o = original.astype(np.float32)
    out = o + (generated.astype(np.float32) - o) * w[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
