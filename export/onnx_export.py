"""Export a diffusers pipeline's text encoder(s), UNet and VAE (encoder and decoder) to ONNX with optimum.

optimum's stock UNet config exports `timestep` as a scalar, one timestep for the whole batch.
Kiln's scheduler batches samples that sit at different steps, so the UNet here takes one timestep
per sample: (B,) float32. Everything else is optimum's own export path.

The VAE encoder (img2img and inpainting) is optimum's: input `sample` (B, 3, H, W) in [-1, 1],
dynamic axes batch_size, sample_height, sample_width; output `latent_parameters`
(B, 2 * latent_channels, H/8, W/8), the latent distribution's mean and log-variance concatenated
on the channel axis (diffusers' `vae.encode(x).latent_dist.parameters`, before its logvar clamp).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Components Kiln runs: the encoder turns an init image (img2img) or a masked image (inpainting)
# into latents; text-to-image does not load it.
EXPORTED = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
# Trace on an odd latent size. diffusers' UNet passes explicit upsample sizes only when the latent
# is not divisible by 2**(levels-1); tracing on a divisible size would bake in plain 2x upsampling
# and the graph would then fail on, say, 200x200 pixels (25x25 latents). Traced odd, every
# upsample targets its skip connection's shape, which equals 2x whenever the size divides.
# The VAE encoder is traced at TRACE_LATENT_SIDE x 8 pixels rather than at its sample_size: it
# has no size-dependent branch (tests run it at 72x88 and 64x96), and the small trace keeps the
# export of SDXL's VAE (sample_size 1024) quick.
TRACE_LATENT_SIDE = 27


def _vision_generator_at(side: int):
    """optimum's vision dummy-input generator, drawing `side` x `side` inputs."""
    from optimum.utils.input_generators import DummyVisionInputGenerator

    class FixedSideVisionGenerator(DummyVisionInputGenerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.height = self.width = side

    return FixedSideVisionGenerator


def _batched_timestep_unet_config(base_config):
    """An instance of optimum's UNet ONNX config whose timestep input is (batch,), traced odd-sized."""
    from optimum.utils.input_generators import DummyTimestepInputGenerator, DummyVisionInputGenerator

    class PerSampleTimestepGenerator(DummyTimestepInputGenerator):
        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            if input_name == "timestep":
                return self.random_float_tensor([self.batch_size], max_value=999, framework=framework, dtype=float_dtype)
            return super().generate(input_name, framework, int_dtype, float_dtype)

    replace = {
        DummyTimestepInputGenerator: PerSampleTimestepGenerator,
        DummyVisionInputGenerator: _vision_generator_at(TRACE_LATENT_SIDE),
    }
    base_cls = type(base_config)

    class PerSampleTimestepUNetConfig(base_cls):
        DUMMY_INPUT_GENERATOR_CLASSES = tuple(replace.get(g, g) for g in base_cls.DUMMY_INPUT_GENERATOR_CLASSES)

        @property
        def inputs(self):
            inputs = dict(super().inputs)
            inputs["timestep"] = {0: "batch_size"}
            return inputs

    return PerSampleTimestepUNetConfig(base_config._config, task=base_config.task)


def _small_trace_vae_encoder_config(base_config, vae_scale_factor: int):
    """optimum's VAE encoder config, traced at TRACE_LATENT_SIDE latents instead of sample_size pixels."""
    from optimum.utils.input_generators import DummyVisionInputGenerator

    small = _vision_generator_at(TRACE_LATENT_SIDE * vae_scale_factor)
    base_cls = type(base_config)

    class SmallTraceVaeEncoderConfig(base_cls):
        DUMMY_INPUT_GENERATOR_CLASSES = tuple(
            small if g is DummyVisionInputGenerator else g for g in base_cls.DUMMY_INPUT_GENERATOR_CLASSES
        )

    return SmallTraceVaeEncoderConfig(base_config._config, task=base_config.task)


def export_components(pipeline, out_dir: Path, opset: int) -> dict[str, Path]:
    """Write <component>/model.onnx for each exported component; returns their paths."""
    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.utils import get_diffusion_models_for_export

    models = get_diffusion_models_for_export(pipeline, exporter="onnx")
    models = {name: pair for name, pair in models.items() if name in EXPORTED}
    unet, unet_config = models["unet"]
    models["unet"] = (unet, _batched_timestep_unet_config(unet_config))
    encoder, encoder_config = models["vae_encoder"]
    scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    models["vae_encoder"] = (encoder, _small_trace_vae_encoder_config(encoder_config, scale))
    names = list(models)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_models(
        models_and_onnx_configs=models,
        output_dir=out_dir,
        opset=opset,
        output_names=[f"{name}/model.onnx" for name in names],
        do_constant_folding=True,
    )
    return {name: out_dir / name / "model.onnx" for name in names}
