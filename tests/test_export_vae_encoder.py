"""Package format 2: the VAE encoder in every package, inpainting UNets, latent statistics, and
the refusal (and automatic rebuild) of packages of format 1.

The encoder is checked as the engine will call it (engine.sessions.ComponentSessions with the
manifest's dimension names fixed) against diffusers' `vae.encode(x).latent_dist.parameters`, at
sizes that are multiples of 8 but not of 64.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from engine.errors import CheckpointError, IncompatiblePackageError  # noqa: E402
from engine.manifest import FORMAT_VERSION, read_manifest  # noqa: E402
from engine.sessions import ComponentSessions, RuntimeOptions  # noqa: E402
from engine.tensorrt.profiles import BatchRange, Profile, component_profiles  # noqa: E402
from export.checkpoint import inspect_checkpoint  # noqa: E402
from export.package import build_package, unet_in_channels, vae_latent_stats  # noqa: E402

ENCODER_TOLERANCE = 1e-4  # fp32 onnxruntime vs PyTorch; seen here: about 2e-6


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl", "sd1-inpaint"])
def test_every_package_has_the_vae_encoder(tiny_package, family):
    m = read_manifest(tiny_package(family))
    encoder = m.components["vae_encoder"]
    assert [(t.name, t.dtype, t.shape) for t in encoder.inputs] == [
        ("sample", "float32", ["batch_size", 3, "sample_height", "sample_width"])
    ]
    [out] = encoder.outputs
    assert (out.name, out.dtype, out.shape[:2]) == ("latent_parameters", "float32", ["batch_size", 2 * m.latent_channels])


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
@pytest.mark.parametrize("width,height", [(88, 72), (96, 64)])
def test_encoder_matches_diffusers_at_sizes_not_multiples_of_64(tiny_checkpoint, tiny_package, family, width, height):
    package = tiny_package(family)
    m = read_manifest(package)
    encoder = ComponentSessions(package, "vae_encoder", m.components["vae_encoder"], ["CPUExecutionProvider"], RuntimeOptions())
    vae = diffusers.AutoencoderKL.from_pretrained(str(tiny_checkpoint(family) / "vae"))
    image = np.random.default_rng(0).uniform(-1, 1, (2, 3, height, width)).astype(np.float32)  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(image)).latent_dist.parameters.numpy()
    (got,) = encoder.run({"sample": image}, {"batch_size": 2, "sample_height": height, "sample_width": width})
    assert got.shape == want.shape == (2, 2 * m.latent_channels, height // 8, width // 8)  # (B, 2C, H/8, W/8)
    assert np.abs(got - want).max() < ENCODER_TOLERANCE


def test_openvino_encoder_matches_diffusers(tiny_checkpoint, tiny_target_package):
    """The IR keeps fp16 weights, so the tolerance is relative: one fp16 rounding of each weight."""
    ov = pytest.importorskip("openvino")
    from engine.openvino.runtime import OpenVINOComponent

    package = tiny_target_package("sd1", "openvino")
    component = read_manifest(package).components["vae_encoder"]
    encoder = OpenVINOComponent(ov.Core(), package / component.file, "vae_encoder", ["latent_parameters"],
                                {"INFERENCE_PRECISION_HINT": "f32"})
    vae = diffusers.AutoencoderKL.from_pretrained(str(tiny_checkpoint("sd1") / "vae"))
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 72, 88)).astype(np.float32)
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(image)).latent_dist.parameters.numpy()
    (got,) = encoder.run({"sample": image})
    np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max())


def test_inpainting_checkpoint_exports_a_nine_channel_unet(tiny_checkpoint, tiny_package):
    checkpoint = tiny_checkpoint("sd1-inpaint")
    assert inspect_checkpoint(checkpoint).family == "sd1"
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(str(checkpoint))
    assert pipe.unet.config.in_channels == 9
    m = read_manifest(tiny_package("sd1-inpaint"))
    assert (m.family, m.unet_in_channels, m.latent_channels) == ("sd1", 9, 4)
    assert m.components["unet"].inputs[0].shape == ["batch_size", 9, "height", "width"]
    assert read_manifest(tiny_package("sd1")).unet_in_channels == 4


def test_inpainting_unet_matches_diffusers(tiny_checkpoint, tiny_package):
    package = tiny_package("sd1-inpaint")
    m = read_manifest(package)
    unet = ComponentSessions(package, "unet", m.components["unet"], ["CPUExecutionProvider"], RuntimeOptions())
    torch_unet = diffusers.UNet2DConditionModel.from_pretrained(str(tiny_checkpoint("sd1-inpaint") / "unet"))
    rng = np.random.default_rng(1)
    feeds = {
        "sample": rng.standard_normal((2, 9, 9, 11)).astype(np.float32),  # latents | mask | masked-image latents
        "timestep": np.array([999.0, 21.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32),
    }
    with torch.no_grad():
        want = torch_unet(*(torch.from_numpy(v) for v in feeds.values())).sample.numpy()
    (got,) = unet.run(feeds, {"batch_size": 2, "height": 9, "width": 11})
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_inpainting_unet_of_another_width_is_refused():
    assert unet_in_channels(SimpleNamespace(in_channels=9), 4) == 9
    with pytest.raises(CheckpointError, match="8 input channels"):
        unet_in_channels(SimpleNamespace(in_channels=8), 4)


def test_sdxl_vae_latent_statistics_are_recorded():
    config = SimpleNamespace(latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1, 2, 3, 4], latent_channels=4)
    assert vae_latent_stats(config, "sdxl") == ([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0])
    # diffusers' SD 1.x/2.x pipelines ignore them; and SDXL uses them only when both are present.
    assert vae_latent_stats(config, "sd1") == (None, None)
    assert vae_latent_stats(SimpleNamespace(latents_mean=[0.0] * 4, latents_std=None, latent_channels=4), "sdxl") == (None, None)
    assert vae_latent_stats(SimpleNamespace(latent_channels=4), "sdxl") == (None, None)
    with pytest.raises(CheckpointError, match="one value per latent channel"):
        vae_latent_stats(SimpleNamespace(latents_mean=[0.0] * 3, latents_std=[1.0] * 3, latent_channels=4), "sdxl")


def test_tiny_packages_have_no_latent_statistics(tiny_package):
    m = read_manifest(tiny_package("sdxl"))
    assert (m.vae_latents_mean, m.vae_latents_std) == (None, None)


def test_sdxl_inpainting_checkpoints_are_sdxl(tiny_checkpoint, tmp_path):
    ck = shutil.copytree(tiny_checkpoint("sdxl"), tmp_path / "ck")
    index = json.loads((ck / "model_index.json").read_text())
    (ck / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLInpaintPipeline"}))
    assert inspect_checkpoint(ck).family == "sdxl"


def test_encoder_tensorrt_profile_is_in_pixels_one_row_an_image(tiny_package):
    m = read_manifest(tiny_package("sd1"))
    profiles = component_profiles("vae_encoder", m.components["vae_encoder"], "88x72", BatchRange((1, 2, 4)), 77, 4, 8)
    assert profiles == {"sample": Profile((1, 3, 72, 88), (1, 3, 72, 88), (4, 3, 72, 88))}


# ---- format 1 packages ----------------------------------------------------------------------


def _as_format_1(package) -> None:
    """Rewrite `package`'s manifest as the format-1 exporter wrote it: no encoder, no new fields."""
    path = package / "manifest.json"
    raw = json.loads(path.read_text())
    for field in ("unet_in_channels", "vae_latents_mean", "vae_latents_std", "source_path"):
        raw.pop(field, None)
    raw["components"].pop("vae_encoder")
    raw["format_version"] = 1
    raw["tools"]["kiln-export"] = "3"
    path.write_text(json.dumps(raw))


def test_format_1_package_is_refused_naming_the_command_that_rebuilds_it(tiny_package, tmp_path):
    old = shutil.copytree(tiny_package("sd1"), tmp_path / "build" / "sd1" / "cpu")
    _as_format_1(old)
    with pytest.raises(IncompatiblePackageError) as refused:
        read_manifest(old)
    message = str(refused.value)
    assert f"package format 1, this engine reads format {FORMAT_VERSION}" in message
    assert f"kiln export <checkpoint folder> --target cpu --out {tmp_path / 'build'} --name sd1 --force" in message


def test_refusal_names_the_recorded_checkpoint_folder(tiny_checkpoint, tiny_package, tmp_path):
    assert read_manifest(tiny_package("sd1")).source_path == str(tiny_checkpoint("sd1").resolve())
    newer = shutil.copytree(tiny_package("sd1"), tmp_path / "out" / "sd1" / "cpu")
    raw = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(IncompatiblePackageError, match="update Kiln") as refused:
        read_manifest(newer)
    assert f"kiln export {tiny_checkpoint('sd1').resolve()} --target cpu --out {tmp_path / 'out'} --force" in str(refused.value)


def test_format_1_package_is_rebuilt_not_reused(tiny_checkpoint, tiny_package, tmp_path, caplog):
    """What `make serve` relies on: its export of the bundled model replaces an old package in build/."""
    out = shutil.copytree(tiny_package("sd1"), tmp_path / "sd1" / "cpu")
    _as_format_1(out)
    assert build_package(tiny_checkpoint("sd1"), tmp_path, name="sd1") == out
    assert "up to date" not in caplog.text
    m = read_manifest(out)
    assert m.format_version == FORMAT_VERSION and "vae_encoder" in m.components and (out / "vae_encoder" / "model.onnx").is_file()


def test_derived_package_of_format_1_is_rebuilt(tiny_package, tmp_path):
    from export.openvino_ir import derive_openvino_package

    pytest.importorskip("openvino")
    cpu = shutil.copytree(tiny_package("sd1"), tmp_path / "sd1" / "cpu")
    stale = shutil.copytree(cpu, tmp_path / "sd1" / "openvino")
    _as_format_1(stale)
    m = read_manifest(derive_openvino_package(cpu))
    assert (m.target, m.format_version) == ("openvino", FORMAT_VERSION)
    assert m.components["vae_encoder"].file == "vae_encoder/model.xml"


# ---- the diffusers references of the editing modes ----------------------------------------


@pytest.mark.parametrize(
    "family,kind,expect",
    [
        ("sd1", "img2img", "StableDiffusionImg2ImgPipeline"),
        ("sd2v", "img2img", "StableDiffusionImg2ImgPipeline"),
        ("sdxl", "img2img", "StableDiffusionXLImg2ImgPipeline"),
        ("sd1", "inpaint", "StableDiffusionInpaintPipeline"),
        ("sd1-inpaint", "inpaint", "StableDiffusionInpaintPipeline"),
        ("sdxl", "inpaint", "StableDiffusionXLInpaintPipeline"),
    ],
)
def test_reference_edit_pipeline_is_the_familys_class_with_the_samplers_scheduler(tiny_checkpoint, family, kind, expect):
    from export.diffusers_reference import reference_edit_pipeline

    pipe = reference_edit_pipeline(tiny_checkpoint(family), "dpmpp_2m_karras", kind)
    assert type(pipe).__name__ == expect
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.use_karras_sigmas


def test_reference_edit_pipeline_refuses_an_unknown_kind(tiny_checkpoint):
    from export.diffusers_reference import reference_edit_pipeline

    with pytest.raises(ValueError, match="img2img, inpaint"):
        reference_edit_pipeline(tiny_checkpoint("sd1"), "euler", "outpaint")


def test_reference_inpainting_runs_the_nine_channel_unet(tiny_checkpoint):
    from PIL import Image

    from export.diffusers_reference import reference_edit_pipeline

    pipe = reference_edit_pipeline(tiny_checkpoint("sd1-inpaint"), "euler", "inpaint")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    with torch.no_grad():
        out = pipe(prompt="a red circle", image=image, mask_image=Image.new("L", (96, 64), 255), height=64, width=96,
                   num_inference_steps=2, output_type="np").images[0]
    assert out.shape == (64, 96, 3)
