"""Pixels -> files the worker sends: PNG images (in the encoder pool) and small JPEG previews."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Latent channels -> RGB, a linear fit of SD 1.x's VAE decoder (the approximation UIs use for
# live previews; close enough for SD 2 and SDXL previews too). (4, 3)
LATENT_RGB = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    dtype=np.float32,
)


def encode_png(pixels: np.ndarray, compress_level: int = 4) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes. zlib releases the GIL, so a thread pool encodes in parallel."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def latent_preview_jpeg(latents: np.ndarray, scale: float = 1.0, quality: int = 70) -> bytes:
    """(4, h, w) latents -> a JPEG of (h, w) pixels: a cheap look at an image in progress, no VAE.

    `scale` divides the latents first (pass the sampler's current noise level to see through it).
    """
    x = latents[: LATENT_RGB.shape[0]] / np.float32(scale)  # (4, h, w)
    rgb = np.einsum("chw,cr->hwr", x, LATENT_RGB)  # (h, w, 3) roughly in [-1, 1]
    pixels = (np.clip(rgb / 2 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
