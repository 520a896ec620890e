"""TARGET=cuda: fp16 graphs fused by onnxruntime's Stable Diffusion optimiser, for the CUDA EP.

Per component, as onnxruntime's own `optimize_pipeline.py` does for Stable Diffusion:
  1. `onnxruntime.transformers.optimizer.optimize_model` with model_type clip / unet / vae and
     `use_gpu=True`: fused MultiHeadAttention (packed QKV / KV), GroupNorm and SkipGroupNorm
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

`derive_cuda_package` makes the same package from an exported cpu package's graphs without
exporting from PyTorch again (`python -m export.cuda_fp16 build/<name>/cpu`).

numpy >= 2.4 refuses int() of a one-element array, which onnxruntime's UNet attention fusion
does when it reads the head count of a PyTorch-2 export; `_numpy2_head_detection` swaps in a
version of that one method that reads the element instead (same result on older numpy).
"""

from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Package component -> the optimiser's model_type.
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
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


def optimise_graph(path: Path, model_type: str, fp16: bool, gpu: bool = True) -> dict[str, int]:
    """Fuse (and convert) path's graph, writing it back to `path` with its weights beside it as
    model.onnx.data. Returns the counts of the fused operators it made."""
    from onnxruntime.transformers.optimizer import optimize_model

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
    from export.package import split_weights

    keep32 = fp32_components(family)
    details: dict = {"component_precision": {}, "fused_operators": {}}
    out = {}
    for name, component in components.items():
        model_type = MODEL_TYPES[name]
        fp16 = name not in keep32
        log.info("  %s: onnxruntime %s fusions%s", name, model_type, ", fp16" if fp16 else ", kept fp32")
        details["fused_operators"][name] = optimise_graph(folder / component.file, model_type, fp16, gpu)
        details["component_precision"][name] = "fp16" if fp16 else "fp32"
        out[name] = split_weights(folder / component.file)
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
