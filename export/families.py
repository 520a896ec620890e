"""Tell a single-file checkpoint's model family from its tensor names and shapes alone.

Kiln exports SD 1.x, SD 2.x and SDXL base checkpoints and the 9-channel inpainting variant of
each. What the file holds says which:

    cond_stage_model.transformer.*        SD 1.x (OpenAI CLIP ViT-L)
    cond_stage_model.model.*              SD 2.x (OpenCLIP ViT-H)
    conditioner.embedders.1.model.*       SDXL base (CLIP ViT-L + OpenCLIP ViT-bigG)
    model.diffusion_model.input_blocks.0.0.weight   (C_out, C_in, 3, 3): C_in 9 = inpainting

Anything else is refused naming what was found: an SDXL refiner (OpenCLIP alone in embedder 0),
SD3 / Flux / DiT-style transformers, a VAE or a LoRA passed as a checkpoint, a UNet of another
input width (depth, upscaler, instruct-pix2pix). Epsilon against v-prediction is not in the
weights; export/single_file.py asks for it where the family leaves it open.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import CheckpointError
from export.ldm_layout import UNET_PREFIX, VAE_PREFIX
from export.safetensors_header import TensorInfo

LATENT_CHANNELS = 4
NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base"}
# (marker substring, what it is): transformer denoisers Kiln does not run.
TRANSFORMER_MARKERS = (
    ("joint_blocks.", "an SD3 / SD3.5 MMDiT transformer"),
    ("double_blocks.", "a Flux transformer"),
    ("single_transformer_blocks.", "a Flux transformer (diffusers layout)"),
    ("x_embedder.", "a DiT-style transformer (PixArt, SD3, Flux or similar)"),
    ("transformer_blocks.0.attn.to_q", "a transformer denoiser (diffusers layout)"),
)
LORA_MARKERS = ("lora_down.", "lora_up.", "lora_A.", "lora_B.", "lora_unet_", "lora_te_", "hada_w1_", "lokr_w1")


@dataclass(frozen=True)
class Detected:
    family: str  # "sd1" | "sd2" | "sdxl"
    inpaint: bool  # a 9-channel inpainting UNet
    has_vae: bool  # first_stage_model.* is in the file

    @property
    def description(self) -> str:
        return NAMES[self.family] + (" inpainting" if self.inpaint else "")


def _examples(keys, n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n])


def detect_family(tensors: dict[str, TensorInfo], name: str) -> Detected:
    """The family of the checkpoint whose header is `tensors` (`name` names it in errors)."""
    keys = tensors.keys()
    for marker, what in TRANSFORMER_MARKERS:
        if any(marker in k for k in keys):
            raise CheckpointError(
                f"{name} holds {what} (keys like {_examples(k for k in keys if marker in k)}); Kiln exports UNet "
                f"checkpoints of SD 1.x, SD 2.x and SDXL base only"
            )
    if any(m in k for k in keys for m in LORA_MARKERS):
        raise CheckpointError(
            f"{name} is a LoRA (keys like {_examples(k for k in keys if any(m in k for m in LORA_MARKERS))}), "
            f"not a checkpoint: export the base checkpoint it was trained on"
        )
    unet = [k for k in keys if k.startswith(UNET_PREFIX)]
    if not unet:
        if all(k.split(".", 1)[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv", "first_stage_model", "vae")
               for k in keys):
            raise CheckpointError(
                f"{name} is a VAE on its own (keys like {_examples(keys)}), not a checkpoint: pass it as "
                f"--vae beside the checkpoint it goes with"
            )
        if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in keys):
            raise CheckpointError(
                f"{name} is one diffusers component (keys like {_examples(keys)}), not a single-file checkpoint: "
                f"export the diffusers folder it belongs to"
            )
        raise CheckpointError(
            f"{name} has no Stable Diffusion UNet (no {UNET_PREFIX}* keys; keys like {_examples(keys)})"
        )

    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        family = "sdxl"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise CheckpointError(
            f"{name} is an SDXL refiner (its only text encoder, conditioner.embedders.0, is OpenCLIP ViT-bigG); "
            f"Kiln exports SDXL base checkpoints, which refine nothing and need no refiner"
        )
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        family = "sd1"
    else:
        raise CheckpointError(
            f"{name} has a UNet but no text encoder Kiln knows (no cond_stage_model.transformer.* (SD 1.x), "
            f"cond_stage_model.model.* (SD 2.x) or conditioner.embedders.* (SDXL) keys): a UNet-only file?"
        )

    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in.shape) != 4:
        raise CheckpointError(f"{name} has no UNet input convolution ({UNET_PREFIX}input_blocks.0.0.weight)")
    in_channels = conv_in.shape[1]
    if in_channels not in (LATENT_CHANNELS, 2 * LATENT_CHANNELS + 1):
        raise CheckpointError(
            f"{name}'s UNet takes {in_channels} input channels; Kiln runs text-to-image UNets ({LATENT_CHANNELS}) "
            f"and inpainting UNets ({2 * LATENT_CHANNELS + 1}), not depth, upscaler or instruct-pix2pix ones"
        )
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    return Detected(family, in_channels == 2 * LATENT_CHANNELS + 1, has_vae)
