"""TARGET=cuda: fp16 graphs fused by onnxruntime's Stable Diffusion optimiser, for the CUDA EP.

Per component, as onnxruntime's own `optimize_pipeline.py` does for Stable Diffusion:
  1. `onnxruntime.transformers.optimizer.optimize_model` with model_type clip / unet / vae and
     `use_gpu=True`: fused Attention / MultiHeadAttention, GroupNorm and SkipGroupNorm
     (channels last), NhwcConv, BiasSplitGelu, BiasAdd, LayerNorm/SkipLayerNorm. These are
     com.microsoft operators with CUDA kernels; most have no CPU kernel, so the package only
     runs on the CUDA execution provider. opt_level=0: no onnxruntime session is made, the
     rewrite is pure graph surgery and runs on a machine without a GPU.
  2. fp16 conversion with inputs and outputs kept float32 (Casts inside the graph), so the
     engine's numpy code is the same for every target. The timestep embeddings (sin/cos of
     t x frequency, and SDXL's time_ids) stay fp32, as diffusers computes them: in fp16, t = 999
     is only resolved to 0.5 before its sine is taken.
  3. Components that overflow in fp16 keep fp32 after fusion: the SDXL VAE decoder (its
     activations exceed 65504 and the image goes black; onnxruntime's script does the same) and
     its encoder (diffusers upcasts the whole SDXL VAE, `force_upcast`, to encode as well).
     Anything else that overflows is caught at decode (NonFiniteOutputError), never returned.
  4. LoRA-adaptable weights keep their cpu-package names (`_restore_lora_weights`):
     the fusions that re-lay a weight out (q, k, v stacked for Attention; NhwcConv's channels-last
     copy) get it back from the original initializers through a Concat / Transpose, which a base
     session folds once at load; a LoRA variant's session does not fold them (engine/cuda/variants.py
     says why), so its `add_initializer` overrides reach the fused operators. weights.json records
     the cpu package's `param`/`transposed` for them.

`derive_cuda_package` makes the same package from an exported cpu package's graphs without
exporting from PyTorch again (`python -m export.cuda_fp16 build/<name>/cpu`).

numpy >= 2.4 refuses int() of a one-element array, which onnxruntime's UNet attention fusion
does when it reads the head count of a PyTorch-2 export; `_numpy2_head_detection` swaps in a
version of that one method that reads the element instead (same result on older numpy).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Package component -> the optimiser's model_type.
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
# The components LoRAs adapt (engine/lora/layouts.py COMPONENTS), by model_type.
LORA_MODEL_TYPES = ("unet", "clip")
# Fusions onnxruntime implements for CUDA only: off for a CPU-runnable graph (tests).
GPU_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)
# Graph inputs whose sinusoidal embeddings are kept fp32 (up to the first MatMul/Gemm).
TIME_INPUTS = ("timestep", "time_ids")


def fp32_components(family: str) -> set[str]:
    """Components kept fp32 in a cuda (or tensorrt) package of this family."""
    return {"vae_encoder", "vae_decoder"} if family == "sdxl" else set()


def fusion_options(model_type: str, gpu: bool = True):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    # Packing interleaves q, k, v (or k, v) per head into one weight, which no single LoRA target
    # (an initializer, maybe transposed) can describe; unpacked, self-attention's weight is q|k|v
    # side by side and cross-attention keeps its three MatMuls, so LoRAs reach them. The cost is
    # GPU speed: onnxruntime's packed MultiHeadAttention kernels are its fastest SD path (cross
    # attention runs two more GEMMs; not yet measured on a GPU).
    options.enable_packed_qkv = False
    options.enable_packed_kv = False
    if not gpu:
        for name in GPU_ONLY_FUSIONS:
            setattr(options, name, False)
    return options


def _get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
    """FusionAttentionUnet.get_num_heads of onnxruntime 1.32, reading the [1]-shaped head count
    with .reshape(-1)[0] instead of int(array), which numpy 2.4 rejects."""
    if is_torch2:
        parent = self.model.get_parent(reshape_q, 1)
        if not (parent and parent.op_type == "Concat" and len(parent.input) == 4):
            return 0
        value = self.model.get_constant_value(parent.input[2])
        heads = int(value.reshape(-1)[0]) if isinstance(value, np.ndarray) and list(value.shape) == [1] else 0
    else:
        value = self.model.get_constant_value(reshape_q.input[1])
        heads = int(value[2]) if isinstance(value, np.ndarray) and list(value.shape) == [4] else 0
    return heads if heads > 0 else 0


@contextmanager
def _numpy2_head_detection():
    import onnxruntime.transformers  # noqa: F401  (puts its folder on sys.path)

    # The optimiser imports its modules by bare name ("fusion_attention_unet"), so that module
    # object, not onnxruntime.transformers.fusion_attention_unet, is the one to patch.
    cls = importlib.import_module("fusion_attention_unet").FusionAttentionUnet
    original = cls.get_num_heads
    cls.get_num_heads = _get_num_heads
    try:
        yield
    finally:
        cls.get_num_heads = original


@contextmanager
def _quiet_optimizer_logs():
    """The optimiser logs every pass at INFO under bare module names; keep its warnings only."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("onnx_model", "fusion", "float16", "optimizer"))]
    names += ["onnx_model", "fusion_base", "float16", "optimizer", "symbolic_shape_infer", "shape_infer_helper"]
    loggers = {name: logging.getLogger(name) for name in names}
    levels = {name: lg.level for name, lg in loggers.items()}
    for lg in loggers.values():
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])


def _time_embedding_nodes(graph) -> list[str]:
    """Names of the nodes from the time inputs to (not including) the first MatMul/Gemm."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = [i.name for i in graph.input if i.name in TIME_INPUTS]
    found: dict[str, None] = {}
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("MatMul", "Gemm") or node.name in found:
                continue
            found[node.name] = None
            frontier.extend(node.output)
    return list(found)


def _index(model_path: Path) -> dict:
    path = model_path.parent / "weights.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _weight_hashes(folder: Path) -> dict[tuple, str]:
    """(shape, sha256 of the float32 bytes) -> initializer name, for every weight of the graph
    in `folder` that a LoRA could adapt (2-d and 4-d float32, from its weights.bin)."""
    index = _index(folder / "model.onnx")
    if not index:
        return {}
    blob = np.memmap(folder / "weights.bin", dtype=np.uint8, mode="r")
    out = {}
    for name, entry in index.items():
        if entry["dtype"] == "float32" and len(entry["shape"]) in (2, 4):
            raw = blob[entry["offset"] : entry["offset"] + entry["length"]]
            out[tuple(entry["shape"]), hashlib.sha256(raw).hexdigest()] = name
    return out


def _find(originals: dict[tuple, str], array: np.ndarray) -> str | None:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return originals.get((tuple(array.shape), hashlib.sha256(array.tobytes()).hexdigest()))


def _restore_lora_weights(graph, originals: dict[tuple, str]) -> int:
    """Give back the cpu package's weights that a fusion re-laid out, so LoRAs can find them.

    Self-attention's Attention weight (in, 3 x out) is q | k | v side by side (packing off) and
    becomes Concat(q, k, v, axis=1); an NhwcConv weight (out, kh, kw, in) becomes
    Transpose(original (out, in, kh, kw)). Each original is found by value, so a rename by the
    optimiser does not matter. A base session folds both nodes once at load; onnxruntime's
    constant folding reads the model's own initializer, not one given with `add_initializer`, so
    LoRA variant sessions turn it off and run the Concat / Transpose each call (a copy of the
    weight: small next to the matmul or convolution it feeds).
    Returns how many fused weights were replaced.
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    restored: dict[str, np.ndarray] = {}
    replaced = 0
    for node in list(graph.node):
        if len(node.input) < 2 or node.input[1] not in initializers or node.input[1] in originals.values():
            continue
        fused_name = node.input[1]
        fused = numpy_helper.to_array(initializers[fused_name])
        if node.op_type == "Attention" and fused.ndim == 2 and fused.shape[1] % 3 == 0:
            parts = np.split(fused, 3, axis=1)
            op = helper.make_node("Concat", [], [fused_name], name=fused_name + "_from_qkv", axis=1)
        elif node.op_type == "NhwcConv" and fused.ndim == 4:
            parts = [fused.transpose(0, 3, 1, 2)]
            op = helper.make_node("Transpose", [], [fused_name], name=fused_name + "_from_nchw", perm=[0, 2, 3, 1])
        else:
            continue
        names = [_find(originals, part) for part in parts]
        if None in names:
            log.warning("%s: %s's weight matches no original weight; LoRAs cannot adapt it", node.name, node.op_type)
            continue
        for name, part in zip(names, parts):
            restored.setdefault(name, np.ascontiguousarray(part))
        op.input.extend(names)
        graph.initializer.remove(initializers.pop(fused_name))
        graph.node.insert(list(graph.node).index(node), op)
        replaced += 1
    for name, array in restored.items():
        if name not in initializers:
            graph.initializer.append(numpy_helper.from_array(array, name))
    return replaced


def _recorded_params(model_path: Path) -> dict[str, dict]:
    """initializer -> its entry in the cpu package's weights.json (with `param`/`transposed`
    where the export recorded them)."""
    return _index(model_path)


def _record_params(model_path: Path, params: dict[str, dict]) -> None:
    """Copy the cpu package's parameter names onto the same weights of the rewritten graph
    (split_weights finds them from MatMul node names, which the fusions replaced).

    A cpu-package weight that fp16 made small enough for split_weights to keep inside model.onnx
    (under 1 KiB: tiny test models) is moved to weights.bin, since LoRAs and the engine's
    shared buffers only see the weights weights.json lists."""
    import onnx
    from onnx.external_data_helper import set_external_data

    from export.package import ONNX_DTYPES

    index = _index(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    moved = False
    with open(model_path.parent / "weights.bin", "ab") as blob:
        for init in model.graph.initializer:
            if init.name not in params or init.name in index or not init.HasField("raw_data"):
                continue
            offset = blob.seek(0, 2)
            blob.write(init.raw_data)
            index[init.name] = {"dtype": ONNX_DTYPES[init.data_type], "shape": list(init.dims),
                                "offset": offset, "length": len(init.raw_data)}
            set_external_data(init, "weights.bin", offset, len(init.raw_data))
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            moved = True
    if moved:
        onnx.save_model(model, str(model_path))
    for name, entry in index.items():
        known = params.get(name)
        if known and "param" in known and "param" not in entry and known["shape"] == entry["shape"]:
            entry.update(param=known["param"], transposed=known["transposed"])
    (model_path.parent / "weights.json").write_text(json.dumps(index))


def optimise_graph(path: Path, model_type: str, fp16: bool, gpu: bool = True) -> dict[str, int]:
    """Fuse (and convert) path's graph, writing it back to `path` with its weights beside it as
    model.onnx.data. Returns the counts of the fused operators it made."""
    from onnxruntime.transformers.optimizer import optimize_model

    originals = _weight_hashes(path.parent) if model_type in LORA_MODEL_TYPES else {}  # before the rewrite below deletes weights.bin
    with _numpy2_head_detection(), _quiet_optimizer_logs():
        model = optimize_model(
            str(path),
            model_type=model_type,
            num_heads=0,  # read from each attention block's reshape: SD 2 and SDXL vary it per block
            hidden_size=0,
            opt_level=0,
            optimization_options=fusion_options(model_type, gpu),
            use_gpu=gpu,
        )
    with _quiet_optimizer_logs():
        counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
        if model_type in LORA_MODEL_TYPES:
            _restore_lora_weights(model.model.graph, originals)
        if fp16:
            keep = _time_embedding_nodes(model.model.graph)
            model.convert_float_to_float16(keep_io_types=True, node_block_list=keep)
        for stale in path.parent.glob("*"):
            if stale.name != path.name:
                stale.unlink()
        model.save_model_to_file(str(path), use_external_data_format=True)
    return counts


def optimise_package(folder: Path, components: dict, family: str, gpu: bool = True) -> tuple[dict, dict]:
    """Optimise every component of the package being assembled in `folder`, in place.

    Returns (components, details) where details say what each component became; the caller
    re-splits the weights so the engine can map them.
    """
    import msgspec

    from export.checkpoint import sha256_file
    from export.package import split_weights

    keep32 = fp32_components(family)
    details: dict = {"component_precision": {}, "fused_operators": {}}
    out = {}
    for name, component in components.items():
        model_type = MODEL_TYPES[name]
        fp16 = name not in keep32
        log.info("  %s: onnxruntime %s fusions%s", name, model_type, ", fp16" if fp16 else ", kept fp32")
        params = _recorded_params(folder / component.file)
        details["fused_operators"][name] = optimise_graph(folder / component.file, model_type, fp16, gpu)
        details["component_precision"][name] = "fp16" if fp16 else "fp32"
        split = split_weights(folder / component.file)
        if model_type in LORA_MODEL_TYPES:
            _record_params(folder / component.file, params)
            split = msgspec.structs.replace(split, sha256=sha256_file(folder / component.file))
        out[name] = split
    return out, details


def derive_cuda_package(cpu_package: Path, out: Path | None = None, force: bool = False) -> Path:
    """A cuda package from a cpu package: the graphs `kiln export --target cuda` would make (the
    same `optimise_package` step over the same optimum export), minus the PyTorch export."""
    import onnxruntime as ort

    from engine.manifest import read_manifest
    from export.derive import derive_package

    family = read_manifest(Path(cpu_package)).family

    def optimise(folder: Path, components: dict) -> tuple[dict, dict]:
        components, details = optimise_package(folder, components, family)
        details.update(optimizer=f"onnxruntime.transformers {ort.__version__}", io_dtype="float32")
        return components, details

    return derive_package(cpu_package, "cuda", "fp16", optimise, out, force, tools={"onnxruntime": ort.__version__})


def main(argv: list[str] | None = None) -> int:
    from export.derive import derive_main

    return derive_main(argv, "cuda", "fp16, fused", derive_cuda_package)


if __name__ == "__main__":
    raise SystemExit(main())
