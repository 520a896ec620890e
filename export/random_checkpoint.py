"""Build a diffusers checkpoint with random weights from an architecture folder.

No weights can be downloaded here, so timing, memory and export checks run on the real Stable
Diffusion architectures (`export/architectures/{sd15,sd21,sdxl}`, the published configs) or on
tiny ones (`tests/assets/tiny/*`) filled with seeded random weights. Timing does not depend on
weight values; the default initialisation is far from zero, so nothing is timed on zeros. A UNet
config with 2 x latent_channels + 1 input channels makes an inpainting checkpoint (the Inpaint
pipeline class in model_index.json, as published inpainting checkpoints have).

    python -m export.random_checkpoint export/architectures/sd15 build/checkpoints/sd15-random
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CLIP_BPE = Path(__file__).parent / "assets" / "clip_bpe"


def clip_tokenizer_files(dest: Path) -> None:
    """Write CLIP's BPE vocabulary (from the open-clip-torch wheel) as vocab.json + merges.txt."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(CLIP_BPE / f"{name}.gz", "rb") as src, open(dest / name, "wb") as out:
            shutil.copyfileobj(src, out)


def _clip_tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer(
            vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt", pad_token=pad_token, model_max_length=77
        )


def build_random_checkpoint(architecture: Path, out: Path, seed: int = 0) -> Path:
    """architecture/{unet,vae,text_encoder[,text_encoder_2],scheduler}/config.json -> diffusers folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(part: str) -> dict:
        return json.loads((architecture / part / "config.json").read_text())

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config("unet"))
    vae = AutoencoderKL.from_config(config("vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
    scheduler_config = config("scheduler")
    scheduler_cls = EulerDiscreteScheduler if "Euler" in scheduler_config.get("_class_name", "") else DDIMScheduler
    scheduler = scheduler_cls.from_config(scheduler_config)
    is_xl = (architecture / "text_encoder_2").is_dir()
    inpaint = unet.config.in_channels == 2 * vae.config.latent_channels + 1
    if is_xl:
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2")))
        pipe = (StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline)(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=_clip_tokenizer("<|endoftext|>"),
            tokenizer_2=_clip_tokenizer("!"),
            unet=unet,
            scheduler=scheduler,
        )
    else:
        # SD 2.x pads with "!" (id 0), SD 1.x with the end-of-text token; hidden_act tells them apart.
        pad = "!" if config("text_encoder").get("hidden_act") == "gelu" else "<|endoftext|>"
        pipe = (StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline)(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=_clip_tokenizer(pad),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    log.info("wrote a random-weight %s%s checkpoint to %s", "SDXL" if is_xl else "SD", " inpainting" if inpaint else "", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", type=Path, help="folder of component config.json files")
    parser.add_argument("out", type=Path, help="where to write the diffusers checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.out / "model_index.json").exists():
        log.info("%s already exists; leaving it", args.out)
        return 0
    build_random_checkpoint(args.architecture, args.out, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
