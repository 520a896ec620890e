"""TensorRT optimisation profiles: the min / opt / max shape of every engine input.

One engine per component and size (text encoders: one for every size), each with one profile
whose batch axis spans the configured batch range and whose other axes are fixed by the size.
Batch counts images; the UNet sees rows: two per image under classifier-free guidance (negative
and prompt), one for an unguided image, so its row range is 1 .. 2 x the largest batch. The
text encoders always see two rows an image (negatives and prompts are encoded together); a
larger batch than the profile's is split by the runtime.

The VAE encoder (img2img, inpainting) encodes one image a row, as the decoder decodes one, and
its input is in pixels: (B, 3, H, W). The latent side of a size comes from
engine.shapes.latent_shape; the dimension names are those the export writes into the manifest
(optimum's dynamic axes: sample_height/sample_width are the encoder's pixels, height/width the
UNet's latents, latent_height/latent_width the decoder's).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.manifest import Component
from engine.shapes import latent_shape, parse_size

# Components whose engines are built per size; the others take any size.
PER_SIZE = ("unet", "vae_encoder", "vae_decoder")
ROWS_PER_IMAGE = 2  # classifier-free guidance: the negative prompt's row and the prompt's


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes (images) an engine must take; opt is the smallest, for per-image latency."""

    images: tuple[int, ...] = (1,)

    def __post_init__(self):
        if not self.images or any(not isinstance(b, int) or b < 1 for b in self.images):
            raise ValueError(f"BATCH must be whole numbers of images >= 1, got {list(self.images)}")

    @property
    def min_images(self) -> int:
        return min(self.images)

    @property
    def max_images(self) -> int:
        return max(self.images)

    def rows(self, component: str) -> tuple[int, int, int]:
        """(min, opt, max) of the component's batch axis."""
        if component in ("vae_encoder", "vae_decoder"):  # one row an image
            return self.min_images, self.min_images, self.max_images
        lo, hi = ROWS_PER_IMAGE * self.min_images, ROWS_PER_IMAGE * self.max_images
        if component == "unet":  # an unguided image is one row
            return 1, lo, hi
        return lo, lo, hi  # text encoders: a request's negative and prompt, always both


@dataclass(frozen=True)
class Profile:
    """One input's shapes for TensorRT's IOptimizationProfile.set_shape(name, min, opt, max)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def component_profiles(
    name: str,
    component: Component,
    size: str | None,
    batch: BatchRange,
    sequence_length: int,
    latent_channels: int,
    vae_scale_factor: int,
) -> dict[str, Profile]:
    """Profiles of every input of `component` for `size` ("WxH"; None for the text encoders)."""
    if (size is None) == (name in PER_SIZE):
        raise ValueError(f"{name}: engines are built {'per size' if name in PER_SIZE else 'for all sizes'}, got size={size!r}")
    sides: dict[str, int] = {}  # axis name -> its fixed length at this size
    if size is not None:
        width, height = parse_size(size, param="SIZES")
        _c, h, w = latent_shape(width, height, latent_channels, vae_scale_factor)
        sides = {"height": h, "width": w, "latent_height": h, "latent_width": w, "sample_height": height, "sample_width": width}
    lo, opt, hi = batch.rows(name)
    profiles = {}
    for spec in component.inputs:
        shapes = []
        for rows in (lo, opt, hi):
            shape = []
            for dim in spec.shape:
                if isinstance(dim, int):
                    shape.append(dim)
                elif dim == "batch_size":
                    shape.append(rows)
                elif dim == "sequence_length":
                    shape.append(sequence_length)
                elif dim in sides:
                    shape.append(sides[dim])
                else:
                    raise ValueError(f"{name} input {spec.name} has an axis {dim!r} no TensorRT profile knows how to fix")
            shapes.append(tuple(shape))
        profiles[spec.name] = Profile(*shapes)
    return profiles


def engine_sizes(name: str, sizes: list[str]) -> list[str | None]:
    """The sizes a component gets engines for: each size, or one engine for all (None)."""
    return list(sizes) if name in PER_SIZE else [None]
