"""`kiln <command>`: export, generate, info, lora, worker, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine.errors import KilnError
from kiln.default_model import home

log = logging.getLogger("kiln")

# The optional installs (pyproject.toml's extras) that bring a module a command may need.
EXTRAS = {
    **dict.fromkeys(("torch", "diffusers", "transformers", "optimum", "onnx", "safetensors"), "export"),
    "onnxruntime": "cpu",
    "openvino": "openvino",
}


def _export(args) -> int:
    # Everything an export reads is local; huggingface_hub must not reach for the network (it reads this at import).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from export.package import build_package
    from export.single_file import SingleFileOptions

    out = build_package(
        Path(args.model),
        Path(args.out),
        target=args.target,
        name=args.name,
        force=args.force,
        sizes=tuple(filter(None, args.sizes.split(","))),
        batches=tuple(int(b) for b in args.batch.split(",") if b),
        vae=Path(args.vae) if args.vae else None,
        single_file=SingleFileOptions(
            config=Path(args.config) if args.config else None,
            prediction_type=args.prediction_type,
            default_size=args.default_size,
        ),
    )
    print(out)
    return 0


def _generate(args) -> int:
    from tqdm import tqdm

    from engine.pipeline import ImageRequest, Pipeline
    from engine.shapes import parse_size
    from kiln.default_model import ensure_package

    package = Path(args.package) if args.package else ensure_package()
    pipe = Pipeline(package)
    width, height = parse_size(args.size) if args.size else parse_size(pipe.manifest.sizes.default)
    req = ImageRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=width,
        height=height,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        sampler=args.sampler,
    )
    bar = tqdm(total=None, unit="step", desc="denoising", file=sys.stderr)

    def on_step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    image = pipe.generate([req], on_step=on_step)[0]
    bar.close()
    from PIL import Image

    Image.fromarray(image).save(args.output)
    print(args.output)
    return 0


def _info(args) -> int:
    from engine.info import describe_package

    print(describe_package(Path(args.package)))
    return 0


def _lora(args) -> int:
    from engine.lora import add_lora, list_loras, remove_lora

    package = Path(args.package)
    if args.lora_command == "add":
        entry = add_lora(package, Path(args.file), args.name)
        print(f"{entry.name}: {entry.layout} LoRA, {entry.weights} weights of {', '.join(entry.components)} -> {package / entry.file}")
    elif args.lora_command == "list":
        for entry in list_loras(package).values():
            print(f"{entry.name}\t{entry.layout}\t{entry.weights} weights\t{','.join(entry.components)}\t{entry.source}")
    else:
        entry = remove_lora(package, args.name)
        print(f"removed {entry.name}")
    return 0


def _worker(args) -> int:
    from engine.worker.main import main as worker_main

    return worker_main(args.rest)


def _serve(args) -> int:
    from server.main import main as serve_main

    return serve_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Offline image generation with Stable Diffusion packages.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a local diffusers checkpoint or single .safetensors file to a model package")
    p.add_argument("model", help="local diffusers checkpoint folder, or a single-file checkpoint (model.safetensors)")
    p.add_argument("--target", default="cpu", help="cpu (default), openvino (fast CPU), cuda or tensorrt")
    p.add_argument("--name", default=None, help="package name (default: the folder's name, or the file's without .safetensors)")
    p.add_argument("--vae", default=None, help="replace the checkpoint's VAE: a .safetensors file or a diffusers folder")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="single file: what the model predicts (required for SD 2.x: v_prediction for 768-v, epsilon for base)")
    p.add_argument("--default-size", type=int, default=None, metavar="SIDE",
                   help="single file: the native side in pixels (required for SD 2.x: 768 for 768-v, 512 for base)")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="single file: a diffusers folder whose configs and tokenizers describe it (default: the "
                        "detected family's, from the repo)")
    p.add_argument("--out", default=str(home()), help=f"where packages go (default: {home()})")
    p.add_argument("--force", action="store_true", help="rebuild even if the checkpoint is unchanged")
    p.add_argument("--sizes", default="", help="tensorrt: WxH[,WxH...] to build engines for")
    p.add_argument("--batch", default="", help="tensorrt: batch sizes of the profiles, e.g. 1,2,4")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", help="generate one image to a PNG file")
    p.add_argument("prompt")
    p.add_argument("--package", default=None, help="model package folder (default: the bundled model)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the package's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--sampler", default=None, help="euler, euler_a, ddim, dpmpp_2m_karras or lcm")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("-o", "--output", default="out.png")
    p.set_defaults(func=_generate)

    p = sub.add_parser("info", help="print a package's manifest as a table")
    p.add_argument("package")
    p.set_defaults(func=_info)

    p = sub.add_parser("lora", help="store LoRAs with a package (served by name: <lora:NAME:0.8> in a prompt)")
    lora = p.add_subparsers(dest="lora_command", required=True)
    q = lora.add_parser("add", help="check a LoRA .safetensors file against the package and store it")
    q.add_argument("package")
    q.add_argument("file", help="LoRA file: kohya/A1111 (lora_unet_..., lora_te_...) or diffusers/PEFT (unet....lora_A)")
    q.add_argument("--name", required=True, help="what a request calls it: <lora:NAME:0.8>")
    q = lora.add_parser("list", help="the LoRAs stored with the package")
    q.add_argument("package")
    q = lora.add_parser("remove", help="remove a stored LoRA")
    q.add_argument("package")
    q.add_argument("name")
    p.set_defaults(func=_lora)

    for name, func, text in (("worker", _worker, "run a gRPC engine worker"), ("serve", _serve, "run the HTTP front end")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `worker` and `serve` pass their options on: argparse's REMAINDER does not take leading --options.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = extra + args.rest
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KilnError as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        log.error("`kiln %s` needs %s, which is not installed: pip install 'kiln[%s]'", args.command, e.name, extra)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
