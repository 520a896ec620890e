"""Export a diffusers pipeline's text encoder(s), UNet and VAE decoder to ONNX with optimum.

optimum's stock UNet config exports `timestep` as a scalar, one timestep for the whole batch.
Kiln's scheduler batches samples that sit at different steps, so the UNet here takes one timestep
per sample: (B,) float32. Everything else is optimum's own export path.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Components Kiln runs; the VAE encoder is not needed for text-to-image.
EXPORTED = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
# Trace on an odd latent size. diffusers' UNet passes explicit upsample sizes only when the latent
# is not divisible by 2**(levels-1); tracing on a divisible size would bake in plain 2x upsampling
# and the graph would then fail on, say, 200x200 pixels (25x25 latents). Traced odd, every
# upsample targets its skip connection's shape, which equals 2x whenever the size divides.
TRACE_LATENT_SIDE = 27


def _batched_timestep_unet_config(base_config):
    """An instance of optimum's UNet ONNX config whose timestep input is (batch,), traced odd-sized."""
    from optimum.utils.input_generators import DummyTimestepInputGenerator, DummyVisionInputGenerator

    class OddSizeVisionGenerator(DummyVisionInputGenerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.height = self.width = TRACE_LATENT_SIDE

    class PerSampleTimestepGenerator(DummyTimestepInputGenerator):
        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            if input_name == "timestep":
                return self.random_float_tensor([self.batch_size], max_value=999, framework=framework, dtype=float_dtype)
            return super().generate(input_name, framework, int_dtype, float_dtype)

    base_cls = type(base_config)

    class PerSampleTimestepUNetConfig(base_cls):
        DUMMY_INPUT_GENERATOR_CLASSES = tuple(
            {DummyTimestepInputGenerator: PerSampleTimestepGenerator, DummyVisionInputGenerator: OddSizeVisionGenerator}.get(g, g)
            for g in base_cls.DUMMY_INPUT_GENERATOR_CLASSES
        )

        @property
        def inputs(self):
            inputs = dict(super().inputs)
            inputs["timestep"] = {0: "batch_size"}
            return inputs

    return PerSampleTimestepUNetConfig(base_config._config, task=base_config.task)


def export_components(pipeline, out_dir: Path, opset: int) -> dict[str, Path]:
    """Write <component>/model.onnx for each exported component; returns their paths."""
    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.utils import get_diffusion_models_for_export

    models = get_diffusion_models_for_export(pipeline, exporter="onnx")
    models = {name: pair for name, pair in models.items() if name in EXPORTED}
    unet, unet_config = models["unet"]
    models["unet"] = (unet, _batched_timestep_unet_config(unet_config))
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
