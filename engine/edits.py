"""Edits: what an img2img or inpainting sample carries beyond a text-to-image one.

An edit is a sample that starts at a later step of its sampler's schedule and may carry a mask;
everything else (batching, guidance, samplers, decoding) is text-to-image's. This module turns a
request's input image and mask into arrays at the drawn size, and holds the per-sample state the
denoising loop needs. The numbers follow diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline, which the parity tests compare against:

  pixels:  the input, fitted to the requested size (engine/image_input.py: cover, centre-crop),
           resized (Lanczos) to the drawn size if the model draws smaller (render_max_side),
           as (3, H, W) float32 = 2 * (rgb / 255) - 1.
  mask:    binarised (>= 0.5 repaints) at the drawn size; the UNet's mask is its nearest-
           neighbour sample at latent size (mask[::8, ::8]); the masked image is pixels * (mask < 0.5).
  latents: the VAE encoder gives the latent distribution's (mean, log-variance); the sample is
           mean + exp(logvar / 2) * eps with logvar clamped to [-30, 20], then
           (sample - latents_mean) * scaling_factor / latents_std where the VAE config has them,
           else sample * scaling_factor.

Random draws of image k (rng = PCG64(seed + k), float32 standard normals of one latent's shape),
in diffusers' order, so that diffusers reproduces an edit when its `randn_tensor` is fed from the
same generator:
  1. eps of the input image's latent sample (not drawn by a 9-channel inpainting UNet at
     strength 1, which never encodes the unmasked input: diffusers skips it too);
  2. the starting noise;
  3. inpainting only: eps of the masked image's latent sample (drawn for a 4-channel UNet too,
     though only a 9-channel one uses it, because diffusers draws it);
  then the sampler's own draws (euler_a, lcm), step by step.
Start: img2img starts at add_noise(image latents, noise, first step); inpainting at strength 1
starts from noise * init_noise_sigma (as text-to-image), below 1 as img2img does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.image_input import decode_mask, fit_mask, fit_to_size, mask_from_image_alpha, open_image, to_rgb
from engine.request import ImageRequest


@dataclass
class EditInput:
    """One edit request's input, decoded once for all of its n images."""

    original: np.ndarray  # (H, W, 3) uint8 at the requested size: what the paste-back keeps
    pixels: np.ndarray  # (3, h, w) float32 in [-1, 1] at the drawn size: what the VAE encodes
    mask_full: np.ndarray | None  # (H, W) float32 at the requested size, 1 = repaint
    mask_drawn: np.ndarray | None  # (h, w) float32 binary at the drawn size

    @property
    def masked_pixels(self) -> np.ndarray:
        """The input with the repainted region zeroed (grey in [-1, 1]): a 9-channel UNet's context."""
        return self.pixels * (self.mask_drawn < 0.5)[None].astype(np.float32)  # (3, h, w)


@dataclass
class EditState:
    """Per-sample arrays the denoising loop reads (all at latent size h x w = drawn size / 8)."""

    image_latents: np.ndarray | None  # (C, h, w) the input's latents; None: not encoded
    noise: np.ndarray  # (C, h, w) the starting noise (inpainting re-noises the kept region with it)
    mask: np.ndarray | None  # (1, h, w) 1 = repaint
    unet_extra: np.ndarray | None  # (1 + C, h, w): mask and masked-image latents, 9-channel UNets
    source: EditInput


def read_edit_input(req: ImageRequest, draw_size: tuple[int, int]) -> EditInput:
    """Decode and fit a resolved edit request's image (and mask) to its sizes."""
    image = open_image(req.image, "image")
    rgb = to_rgb(image)  # (h0, w0, 3) uint8
    if req.mask is not None:
        mask = decode_mask(req.mask, "mask", (image.width, image.height))
    else:
        mask = mask_from_image_alpha(image)  # OpenAI's rule: the image's own transparent pixels
    width, height = req.width, req.height
    original = fit_to_size(rgb, width, height)  # (H, W, 3)
    mask_full = fit_mask(mask, width, height) if mask is not None else None
    draw_w, draw_h = draw_size
    drawn = original
    mask_drawn = mask_full
    if (draw_w, draw_h) != (width, height):
        drawn = np.asarray(Image.fromarray(original).resize((draw_w, draw_h), Image.LANCZOS))
        if mask_full is not None:
            mask_drawn = np.asarray(
                Image.fromarray((mask_full * 255).astype(np.uint8)).resize((draw_w, draw_h), Image.BILINEAR)
            ).astype(np.float32) / 255.0
    pixels = (drawn.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)  # (3, h, w)
    if mask_drawn is not None:
        mask_drawn = (mask_drawn >= 0.5).astype(np.float32)  # diffusers binarises at 0.5
    return EditInput(original=original, pixels=np.ascontiguousarray(pixels), mask_full=mask_full, mask_drawn=mask_drawn)


def latent_sample(parameters: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(2C, h, w) encoder output -> (C, h, w) sample mean + std * eps (diffusers' DiagonalGaussian)."""
    mean, logvar = np.split(parameters.astype(np.float32), 2, axis=0)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    return (mean + std * eps).astype(np.float32)


def latent_mask(mask_drawn: np.ndarray, scale: int) -> np.ndarray:
    """(h*scale, w*scale) binary mask -> (1, h, w): torch's nearest interpolation, which diffusers uses."""
    return np.ascontiguousarray(mask_drawn[::scale, ::scale][None]).astype(np.float32)
