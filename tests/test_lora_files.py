"""LoRA files (engine/lora/): both layouts read without torch, matched to a package's initializers,
deltas equal to diffusers' fused weights, stored with the package; bad files refused by name."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest


torch = pytest.importorskip("torch")

from engine.lora import (  # noqa: E402
    LoraError,
    LoraFileError,
    LoraMismatchError,
    LoraScaleError,
    add_lora,
    list_loras,
    load_lora,
    match_lora,
    remove_lora,
)

RANK = 4
# Modules a test LoRA adapts: Linear (attention, feed-forward, text encoders), the 1x1-conv
# proj_in of SD 1.x (Linear in SDXL) and the 3x3 conv_in (a kohya LoCon-style conv LoRA).
UNET_MODULES = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ff.net.0.proj", "proj_in")
TE_MODULES = ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1")


@pytest.fixture(scope="module")
def lora_package(tiny_package):
    """The tiny package (export revision 5 records the parameter names of its MatMul weights)."""
    return tiny_package


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    from diffusers import DiffusionPipeline

    made = {}

    def get(family):
        if family not in made:
            made[family] = DiffusionPipeline.from_pretrained(str(tiny_checkpoint(family)))
        return made[family]

    return get


def _adapted(pipe) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, module name, module) of every module the test LoRAs adapt."""
    out = []
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        wanted = UNET_MODULES if component == "unet" else TE_MODULES
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (
                name.endswith(wanted) or (component == "unet" and name == "conv_in")
            ):
                out.append((component, name, module))
    return out


def _random_pairs(pipe, seed: int, alpha: float | None = None) -> list[tuple[str, str, torch.Tensor, torch.Tensor, float]]:
    """(component, module, down, up, alpha): random non-zero weights, alpha differing per module."""
    return random_pairs_for(_adapted(pipe), seed, alpha)


def random_pairs_for(modules, seed: int, alpha: float | None = None) -> list[tuple[str, str, torch.Tensor, torch.Tensor, float]]:
    """A random LoRA pair for each (component, name, module) of `modules`."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i, (component, name, module) in enumerate(modules):
        w = module.weight
        if w.ndim == 4:
            down = torch.randn(RANK, w.shape[1], w.shape[2], w.shape[3], generator=g) * 0.1
            up = torch.randn(w.shape[0], RANK, 1, 1, generator=g) * 0.1
        else:
            down = torch.randn(RANK, w.shape[1], generator=g) * 0.1
            up = torch.randn(w.shape[0], RANK, generator=g) * 0.1
        pairs.append((component, name, down, up, alpha if alpha is not None else float(1 + i % 8)))
    return pairs


KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def write_kohya(pairs, path: Path, family: str) -> Path:
    from safetensors.torch import save_file

    sd = {}
    for component, name, down, up, alpha in pairs:
        prefix = "lora_te_" if component == "text_encoder" and family != "sdxl" else KOHYA[component]
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def write_diffusers(pairs, path: Path) -> Path:
    """PEFT keys; alpha per module in diffusers' `lora_adapter_metadata` (lora_alpha + alpha_pattern)."""
    from safetensors.torch import save_file

    sd, meta = {}, {}
    for component, name, down, up, alpha in pairs:
        sd[f"{component}.{name}.lora_A.weight"], sd[f"{component}.{name}.lora_B.weight"] = down, up
        meta[f"{component}.r"] = RANK
        meta[f"{component}.rank_pattern"] = {}
        meta[f"{component}.lora_alpha"] = RANK
        meta.setdefault(f"{component}.alpha_pattern", {})[name] = alpha
        meta.setdefault(f"{component}.target_modules", []).append(name)
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def _package_weights(package: Path, component: str) -> tuple[dict, dict[str, np.ndarray]]:
    index = json.loads((package / component / "weights.json").read_text())
    blob = np.fromfile(package / component / "weights.bin", dtype=np.uint8)
    arrays = {
        n: blob[e["offset"] : e["offset"] + e["length"]].view(e["dtype"]).reshape(e["shape"]) for n, e in index.items()
    }
    return index, arrays


def _torch_fused(pipe, pairs, scale: float) -> dict[tuple[str, str], np.ndarray]:
    """PEFT's merge, written in torch as peft.tuners.lora.layer's get_delta_weight does it."""
    out = {}
    for component, name, down, up, alpha in pairs:
        w = getattr(pipe, component).get_submodule(name).weight.detach()
        if w.ndim == 4 and w.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3)
        elif w.ndim == 4:
            delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            delta = up @ down
        out[component, f"{name}.weight"] = (w + scale * alpha / RANK * delta).numpy()
    return out


def test_recorded_parameter_names_hold_the_torch_weights(lora_package, pipeline):
    """Every renamed initializer (onnx::MatMul_N) holds the torch parameter weights.json names, transposed."""
    for family in ("sd1", "sdxl"):
        package, pipe = lora_package(family), pipeline(family)
        for component in ("unet", "text_encoder", "text_encoder_2"):
            if not (package / component).is_dir():
                continue
            params = dict(getattr(pipe, component).named_parameters())
            index, arrays = _package_weights(package, component)
            recorded = [(n, e) for n, e in index.items() if "param" in e]
            assert recorded, f"{family} {component}: no recorded names"
            for name, entry in recorded:
                torch_weight = params[entry["param"]].detach().numpy()
                np.testing.assert_array_equal(arrays[name], torch_weight.T if entry["transposed"] else torch_weight)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_delta_equals_diffusers_fused_weights(lora_package, pipeline, tmp_path, family, layout, scale):
    package, pipe = lora_package(family), pipeline(family)
    pairs = _random_pairs(pipe, seed=1)
    path = tmp_path / "style.safetensors"
    write_kohya(pairs, path, family) if layout == "kohya" else write_diffusers(pairs, path)
    matched = match_lora(package, path)
    assert len(matched.pairs) == len(pairs)
    deltas = matched.deltas(scale)
    expected = _torch_fused(pipe, pairs, scale)
    compared = 0
    for component in deltas:
        index, arrays = _package_weights(package, component)
        param_of = {n: e.get("param", n) for n, e in index.items()}
        for initializer, delta in deltas[component].items():
            fused = expected[component, param_of[initializer]]
            got = arrays[initializer] + delta
            if index[initializer].get("transposed"):
                got = got.T
            np.testing.assert_allclose(got.reshape(fused.shape), fused, rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared == len(pairs)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_delta_equals_diffusers_load_lora_weights_and_fuse(lora_package, tiny_checkpoint, tmp_path, family, layout):
    """diffusers' own loader and fuse_lora (needs peft) against the package weights + the delta.

    One alpha for every module: diffusers' kohya converter files a text encoder `out_proj`'s alpha
    under another name and so fuses it with the most common alpha instead (seen with 0.39); with
    per-module alphas the file's own alpha is checked by test_delta_equals_diffusers_fused_weights."""
    pytest.importorskip("peft")
    from diffusers import DiffusionPipeline

    package = lora_package(family)
    for scale in (0.5, 1.0):
        pipe = DiffusionPipeline.from_pretrained(str(tiny_checkpoint(family)))
        pairs = _random_pairs(pipe, seed=2, alpha=2.0)
        path = tmp_path / f"{layout}.safetensors"
        write_kohya(pairs, path, family) if layout == "kohya" else write_diffusers(pairs, path)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale, components=[c for c in ("unet", "text_encoder", "text_encoder_2") if hasattr(pipe, c)])
        assert_fused_by_diffusers(pipe, package, match_lora(package, path).deltas(scale))


def assert_fused_by_diffusers(pipe, package: Path, deltas: dict) -> int:
    """The package's weights + `deltas` equal the weights diffusers fused into `pipe`; returns how
    many weights were compared."""
    compared = 0
    for component, by_init in deltas.items():
        fused = {n.replace("base_layer.", ""): p.detach().numpy() for n, p in getattr(pipe, component).named_parameters()}
        index, arrays = _package_weights(package, component)
        for initializer, delta in by_init.items():
            want = fused[index[initializer].get("param", initializer)]
            got = arrays[initializer] + delta
            got = got.T if index[initializer].get("transposed") else got
            np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6, err_msg=initializer)
            compared += 1
    return compared


def test_scale_zero_is_a_zero_delta(lora_package, pipeline, tmp_path):
    path = write_kohya(_random_pairs(pipeline("sd1"), 3), tmp_path / "a.safetensors", "sd1")
    for by_init in match_lora(lora_package("sd1"), path).deltas(0.0).values():
        assert all(not d.any() for d in by_init.values())


@pytest.mark.parametrize("scale", [2.5, -3.0, float("nan"), float("inf"), True])
def test_scale_outside_the_range_is_refused(lora_package, pipeline, tmp_path, scale):
    path = write_kohya(_random_pairs(pipeline("sd1"), 3), tmp_path / "a.safetensors", "sd1")
    with pytest.raises(LoraScaleError, match="scale"):
        match_lora(lora_package("sd1"), path).deltas(scale)


def test_lora_for_another_family_lists_every_unused_key(lora_package, pipeline, tmp_path):
    path = write_kohya(_random_pairs(pipeline("sdxl"), 4), tmp_path / "xl.safetensors", "sdxl")
    with pytest.raises(LoraMismatchError) as e:
        match_lora(lora_package("sd1"), path)
    message = str(e.value)
    assert "match no weight" in message
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in message
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in message


def test_unknown_keys_are_all_listed(lora_package, pipeline, tmp_path):
    from safetensors.torch import save_file

    pairs = _random_pairs(pipeline("sd1"), 5)[:2]
    sd = {}
    for component, name, down, up, _ in pairs:
        sd[f"{component}.{name}.lora_A.weight"], sd[f"{component}.{name}.lora_B.weight"] = down, up
    sd["unet.no_such_block.to_q.lora_A.weight"] = torch.ones(RANK, 16)
    sd["unet.no_such_block.to_q.lora_B.weight"] = torch.ones(16, RANK)
    sd["something_else"] = torch.ones(2)
    save_file(sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraMismatchError, match="3 of its 7 keys") as e:
        match_lora(lora_package("sd1"), tmp_path / "x.safetensors")
    for key in ("unet.no_such_block.to_q.lora_A.weight", "unet.no_such_block.to_q.lora_B.weight", "something_else"):
        assert key in str(e.value)


def test_rank_mismatch_names_the_tensor(lora_package, pipeline, tmp_path):
    pairs = _random_pairs(pipeline("sd1"), 6)
    component, name, down, up, alpha = pairs[0]
    pairs[0] = (component, name, down, torch.randn(up.shape[0], RANK + 1, *up.shape[2:]), alpha)
    path = write_kohya(pairs, tmp_path / "r.safetensors", "sd1")
    key = KOHYA["unet"] + name.replace(".", "_") if component == "unet" else "lora_te_" + name.replace(".", "_")
    with pytest.raises(LoraMismatchError, match=f"{key}.lora_up.weight has shape"):
        match_lora(lora_package("sd1"), path)


def test_wrong_width_names_the_tensor(lora_package, pipeline, tmp_path):
    pairs = _random_pairs(pipeline("sd1"), 6)
    component, name, down, up, alpha = pairs[1]
    pairs[1] = (component, name, torch.randn(RANK, down.shape[1] * 2), up, alpha)
    path = write_diffusers(pairs, tmp_path / "w.safetensors")
    with pytest.raises(LoraMismatchError, match=rf"{component}\.{name}\.lora_A\.weight has shape"):
        match_lora(lora_package("sd1"), path)


def _good_file(pipeline, tmp_path) -> Path:
    return write_kohya(_random_pairs(pipeline("sd1"), 7), tmp_path / "good.safetensors", "sd1")


def test_truncated_file_is_refused(lora_package, pipeline, tmp_path):
    data = _good_file(pipeline, tmp_path).read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFileError, match="truncated"):
        match_lora(lora_package("sd1"), tmp_path / "t.safetensors")


def test_non_safetensors_file_is_refused(lora_package, tmp_path):
    (tmp_path / "n.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(LoraFileError, match="not a .safetensors file"):
        match_lora(lora_package("sd1"), tmp_path / "n.safetensors")


def test_header_that_lies_about_sizes_is_refused(lora_package, pipeline, tmp_path):
    data = _good_file(pipeline, tmp_path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__" and header[k]["shape"])
    header[key]["shape"] = [d * 2 for d in header[key]["shape"]]
    raw = json.dumps(header).encode()
    (tmp_path / "l.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(LoraFileError, match=f"lies about tensor {key}"):
        match_lora(lora_package("sd1"), tmp_path / "l.safetensors")


@pytest.fixture
def package_copy(lora_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(lora_package("sd1"), copy)
    return copy


def test_add_list_load_remove(package_copy, pipeline, tmp_path):
    path = _good_file(pipeline, tmp_path)
    entry = add_lora(package_copy, path, "style")
    assert (package_copy / "loras" / "style.safetensors").read_bytes() == path.read_bytes()
    assert list(list_loras(package_copy)) == ["style"]
    assert entry.layout == "kohya" and entry.components == ["text_encoder", "unet"]
    assert load_lora(package_copy, "style").deltas(1.0)
    remove_lora(package_copy, "style")
    assert list_loras(package_copy) == {}
    assert not (package_copy / "loras" / "style.safetensors").exists()


def test_a_refused_lora_leaves_the_package_as_it_was(package_copy, tmp_path):
    before = sorted(p.relative_to(package_copy) for p in package_copy.rglob("*"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(LoraFileError):
        add_lora(package_copy, tmp_path / "bad.safetensors", "bad")
    assert sorted(p.relative_to(package_copy) for p in package_copy.rglob("*")) == before


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "style.safetensors"])
def test_bad_names_are_refused(package_copy, pipeline, tmp_path, name):
    with pytest.raises(LoraError, match="a LoRA name"):
        add_lora(package_copy, _good_file(pipeline, tmp_path), name)


def test_cli_lora_add_list_remove(package_copy, pipeline, tmp_path, capsys):
    from kiln.cli import main

    path = _good_file(pipeline, tmp_path)
    assert main(["lora", "add", str(package_copy), str(path), "--name", "style"]) == 0
    assert main(["lora", "add", str(package_copy), str(path), "--name", "style"]) == 2  # taken
    assert main(["lora", "list", str(package_copy)]) == 0
    assert "style" in capsys.readouterr().out
    assert main(["info", str(package_copy)]) == 0
    info = capsys.readouterr().out
    assert re.search(r"^loras +1 ", info, re.M) and "style: kohya," in info
    assert main(["lora", "remove", str(package_copy), "style"]) == 0
    assert main(["lora", "remove", str(package_copy), "style"]) == 2
