"""Train Kiln's default model from scratch on rendered, captioned shapes, on CPU.

Four stages, each with a wall-clock budget and resumable checkpoints under --run-dir:

1. vae: AutoencoderKL (32, 64, 64, 64), 4 latent channels, on random 64x64 crops of renders,
   learning rate decayed over the budget.
2. cache: renders of training-split scenes at 128x128, 256x256, 256x128 and 128x256, encoded
   once (latent mean), with their scene parameters; captions are drawn afresh each step, so
   phrasing varies although the images repeat.
3. decoder: the decoder alone, encoder frozen, at a lower learning rate: it fixes the colour tint
   the first stage leaves, without touching the latents the cache and the UNet use.
4. unet: text encoder (CLIPTextModel, hidden 128, 3 layers) and UNet (32, 64, 128, cross-attention
   at every level) trained jointly with v-prediction on a zero-terminal-SNR schedule (Lin et al.
   2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): without it the model
   takes the image's mean colour from the starting noise instead of the prompt. The loss is
   min-SNR weighted (see `timestep_weights`). Four fifths of the steps use 16x16 latents: a
   32x32 sample costs about eight 16x16 ones, and shapes are learnt from the number of samples
   seen; a tenth use 32x32 and a tenth 32x16 / 16x32, so that larger latents show one scene
   rather than the 128-px scene tiled. Latents on the shape weigh 3x in the loss.

Every 10 minutes the unet stage saves a checkpoint and exports a diffusers folder (EMA weights) to
<run-dir>/snapshot/ (and snapshots/min-NNN/), so a usable model exists if the run is cut short.
At the end the final folder is written to --out. A finished stage is skipped on a rerun; rerunning
the unet stage after its budget is spent just exports again.

    python -m export.default_model.train --out models/kiln-shapes \
        --vae-minutes 20 --cache-minutes 8 --decoder-minutes 20 --unet-minutes 70

Deterministic from --seed for fixed step counts (--vae-steps / --unet-steps with large budgets,
--threads 1); with wall-clock budgets the number of steps depends on the machine's speed, and the
thread tuner (1 or 2 threads, whichever is faster under the current load) changes float rounding.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .captions import caption, split_triples, training_example
from .render import COLOURS, Scene, render
from .tokenizer import MAX_LENGTH, load_tokenizer, save_tokenizer, token_ids

log = logging.getLogger("kiln.default_model.train")

# (latent H, latent W, batch size, share of UNet steps). Batches are sized for similar step times.
# Small batches: on 2 shared cores more (noisier) updates beat fewer large ones.
BUCKETS: tuple[tuple[int, int, int, float], ...] = (
    (16, 16, 32, 0.80),
    (32, 32, 8, 0.10),
    (16, 32, 16, 0.05),  # image 256 wide x 128 high
    (32, 16, 16, 0.05),
)
CACHE_SIZES = {(16, 16): 5000, (32, 32): 2500, (16, 32): 400, (32, 16): 400}


@dataclass(frozen=True)
class Config:
    run_dir: Path
    out: Path
    seed: int = 0
    vae_minutes: float = 20.0
    cache_minutes: float = 8.0
    unet_minutes: float = 70.0
    decoder_minutes: float = 20.0
    decoder_lr: float = 3e-4
    vae_steps: int = 100_000
    unet_steps: int = 100_000
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    snapshot_minutes: float = 10.0
    checkpoint_minutes: float = 4.0
    cache_scale: float = 1.0  # multiplies CACHE_SIZES (small for smoke tests)
    threads: int = 2
    only: str = ""  # run just this stage (vae, cache, decoder, unet); "" runs them all in order


# ----------------------------------------------------------------------------- models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=256,
    )


def make_text_encoder(vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        projection_dim=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,  # pipelines default to 32 x 8 = 256 px
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=16,
    )


SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
)


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def make_inference_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# ----------------------------------------------------------------------------- helpers


class Budget:
    """Wall-clock budget of one stage, carried across restarts through its checkpoint."""

    def __init__(self, minutes: float, spent_s: float = 0.0):
        self.limit_s, self.spent_before, self.start = minutes * 60, spent_s, time.monotonic()

    @property
    def spent_s(self) -> float:
        return self.spent_before + time.monotonic() - self.start

    def over(self) -> bool:
        return self.spent_s >= self.limit_s


class ThreadTuner:
    """Picks 1 or `max_threads` intra-op threads by measured step time.

    Other processes share these cores; under contention one thread often beats two, because two
    threads stall at every barrier while the other is descheduled. Every `every` steps the other
    setting gets a `trial`-step try, and the faster recent mean wins.
    """

    def __init__(self, max_threads: int, every: int = 100, trial: int = 10):
        self.options = sorted({1, max_threads})
        self.every, self.trial = every, trial
        self.best = max_threads
        self.current = max_threads
        self.times: dict[int, list[float]] = {k: [] for k in self.options}
        self.step = 0
        torch.set_num_threads(self.current)

    def record(self, seconds: float) -> None:
        self.times[self.current].append(seconds)
        self.step += 1
        if len(self.options) == 1:
            return
        phase = (self.step + self.every - 2 * self.trial) % self.every  # first trial soon after start
        if phase == 0:  # start a trial of the other setting
            self.current = next(k for k in self.options if k != self.best)
        elif phase == self.trial:  # trial over: keep whichever was faster lately
            mean = {k: float(np.median(v[-self.trial :])) if v else float("inf") for k, v in self.times.items()}
            if mean[self.current] < mean[self.best]:
                log.info("threads: %d now faster (%.2f s vs %.2f s per step)", self.current, mean[self.current], mean[self.best])
                self.best = self.current
            self.current = self.best
        torch.set_num_threads(self.current)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """list of (H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ----------------------------------------------------------------------------- stage 1: VAE


def vae_batch(rng: np.random.Generator, split, batch: int = 16, crop: int = 64) -> torch.Tensor:
    """(B, 3, 64, 64) crops of training scenes rendered at 128..320 px, biased to hit the shape."""
    crops = []
    for _ in range(batch):
        side = int(rng.integers(128, 321))
        scene = training_example(rng, split)
        img = render(scene, side, side)
        # Half the crops centred near the shape (edges are what the VAE must learn), half anywhere.
        if rng.random() < 0.5:
            cx, cy = scene.cx * side, scene.cy * side
            x0 = int(np.clip(cx - crop / 2 + rng.integers(-24, 25), 0, side - crop))
            y0 = int(np.clip(cy - crop / 2 + rng.integers(-24, 25), 0, side - crop))
        else:
            x0, y0 = int(rng.integers(0, side - crop + 1)), int(rng.integers(0, side - crop + 1))
        crops.append(img[y0 : y0 + crop, x0 : x0 + crop])
    return to_tensor(crops)


def train_vae(cfg: Config, split) -> None:
    path = cfg.run_dir / "vae.pt"
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    state = torch.load(path, weights_only=False) if path.exists() else None
    if state is not None:
        if state["done"]:
            log.info("VAE: already trained (%d steps)", state["step"])
            return
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["torch_rng"])
    step = state["step"] if state else 0
    rng = np.random.default_rng([cfg.seed, 1, step])
    budget = Budget(cfg.vae_minutes, state["spent_s"] if state else 0.0)
    log.info("VAE: %.2f M params, from step %d, %.1f min budget left",
             sum(p.numel() for p in vae.parameters()) / 1e6, step, (budget.limit_s - budget.spent_s) / 60)

    def checkpoint(done: bool) -> None:
        save_atomic(dict(model=vae.state_dict(), opt=opt.state_dict(), step=step, spent_s=budget.spent_s,
                         torch_rng=torch.get_rng_state(), done=done), path)

    last_ckpt = time.monotonic()
    bar = tqdm(desc="vae", initial=step, total=cfg.vae_steps, mininterval=20, smoothing=0.1)
    vae.train()
    tuner = ThreadTuner(cfg.threads)
    while step < cfg.vae_steps and not budget.over():
        t_step = time.monotonic()
        x = vae_batch(rng, split)  # (16, 3, 64, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            # Decode the mean, not a sample: with a few hundred steps the sampling noise (std 1 at
            # init) would drown the signal; the KL weight is ~0 either way, as in SD's VAE.
            recon = vae.decode(posterior.mode()).sample
        recon = recon.float()
        mse = F.mse_loss(recon, x)
        l1 = F.l1_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + 0.5 * l1 + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        # Cosine decay over the wall-clock budget (to a tenth): the budget is the schedule's length.
        frac = min(1.0, budget.spent_s / budget.limit_s)
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.step()
        tuner.record(time.monotonic() - t_step)
        step += 1
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))  # peak-to-peak 2 in [-1, 1]
        bar.update(1)
        bar.set_postfix(mse=f"{mse.item():.4f}", psnr=f"{psnr:.1f}", refresh=False)
        if step % 100 == 0:
            log.info("VAE step %d: mse %.5f, psnr %.1f dB, %.1f min", step, mse.item(), psnr, budget.spent_s / 60)
        if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint(False)
            last_ckpt = time.monotonic()
    bar.close()
    checkpoint(True)
    log.info("VAE: done at step %d after %.1f min", step, budget.spent_s / 60)


def load_vae(cfg: Config, finetuned_decoder: bool = True):
    """The trained VAE, frozen; with the fine-tuned decoder once that stage has finished."""
    vae = make_vae()
    vae.load_state_dict(torch.load(cfg.run_dir / "vae.pt", weights_only=False)["model"])
    dec = cfg.run_dir / "decoder.pt"
    if finetuned_decoder and dec.exists():
        state = torch.load(dec, weights_only=False)
        if state["done"]:
            vae.load_state_dict(state["model"], strict=False)
    return vae.eval().requires_grad_(False)


def finetune_decoder(cfg: Config, split) -> None:
    """Stage 2b: train the decoder alone, encoder frozen, at a lower learning rate.

    After the joint stage the VAE keeps shapes but tints colours (purple towards blue, orange
    towards yellow). The encoder, and so the latent cache and the UNet, stay as they are.
    """
    path = cfg.run_dir / "decoder.pt"
    state = torch.load(path, weights_only=False) if path.exists() else None
    if state is not None and state["done"]:
        log.info("decoder: already fine-tuned (%d steps)", state["step"])
        return
    vae = load_vae(cfg, finetuned_decoder=False)
    if state is not None:
        vae.load_state_dict(state["model"], strict=False)
    trained = {"decoder", "post_quant_conv"}
    params = [p for n, p in vae.named_parameters() if n.split(".")[0] in trained]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    if state is not None:
        opt.load_state_dict(state["opt"])
    step = state["step"] if state else 0
    budget = Budget(cfg.decoder_minutes, state["spent_s"] if state else 0.0)
    log.info("decoder: from step %d, %.1f min budget left", step, (budget.limit_s - budget.spent_s) / 60)

    def checkpoint(done: bool) -> None:
        sd = {k: v for k, v in vae.state_dict().items() if k.split(".")[0] in trained}
        save_atomic(dict(model=sd, opt=opt.state_dict(), step=step, spent_s=budget.spent_s, done=done), path)

    last_ckpt = time.monotonic()
    tuner = ThreadTuner(cfg.threads)
    bar = tqdm(desc="decoder", initial=step, mininterval=20)
    vae.decoder.train()
    while not budget.over():
        t_step = time.monotonic()
        rng = np.random.default_rng([cfg.seed, 4, step])
        x = vae_batch(rng, split)  # (16, 3, 64, 64)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recon = vae.decode(z).sample.float()
        mse = F.mse_loss(recon, x)
        loss = mse + 0.5 * F.l1_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        frac = min(1.0, budget.spent_s / budget.limit_s)
        for g in opt.param_groups:
            g["lr"] = cfg.decoder_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.step()
        tuner.record(time.monotonic() - t_step)
        step += 1
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
        bar.update(1)
        bar.set_postfix(mse=f"{mse.item():.4f}", psnr=f"{psnr:.1f}", refresh=False)
        if step % 50 == 0:
            log.info("decoder step %d: mse %.5f, psnr %.1f dB, %.1f min", step, mse.item(), psnr, budget.spent_s / 60)
        if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint(False)
            last_ckpt = time.monotonic()
    bar.close()
    checkpoint(True)
    log.info("decoder: done at step %d after %.1f min", step, budget.spent_s / 60)


# ----------------------------------------------------------------------------- stage 2: latent cache


def build_cache(cfg: Config, split) -> None:
    """Encode training scenes of every bucket size; buckets advance in proportion, so a budget cut
    keeps every size."""
    path = cfg.run_dir / "cache.pt"
    state = torch.load(path, weights_only=False) if path.exists() else None
    if state is not None and state["done"]:
        log.info("cache: already built (%d latents)", sum(len(v["scenes"]) for v in state["buckets"].values()))
        return
    vae = load_vae(cfg)
    sizes = {k: max(1, round(v * cfg.cache_scale)) for k, v in CACHE_SIZES.items()}
    # Scenes are drawn for every bucket up front, so resuming redraws nothing.
    scenes = {}
    for key, n in sizes.items():
        rng = np.random.default_rng([cfg.seed, 2, key[0], key[1]])
        scenes[key] = [training_example(rng, split, aspect=key[1] / key[0]) for _ in range(n)]
    buckets = state["buckets"] if state else {k: dict(latents=[], scenes=[]) for k in sizes}
    budget = Budget(cfg.cache_minutes, state["spent_s"] if state else 0.0)
    total, done = sum(sizes.values()), sum(len(b["scenes"]) for b in buckets.values())
    log.info("cache: %d of %d latents done, %.1f min budget left", done, total, (budget.limit_s - budget.spent_s) / 60)

    def checkpoint(finished: bool) -> None:
        save_atomic(dict(buckets=buckets, spent_s=budget.spent_s, done=finished), path)

    bar = tqdm(desc="cache", initial=done, total=total, mininterval=20)
    last_ckpt = time.monotonic()
    while done < total and not budget.over():
        key = min(sizes, key=lambda k: len(buckets[k]["scenes"]) / sizes[k])  # furthest behind
        lh, lw = key
        start = len(buckets[key]["scenes"])
        chunk = scenes[key][start : start + 32]
        images = [render(sc, lw * 8, lh * 8) for sc in chunk]
        with torch.no_grad():
            lat = vae.encode(to_tensor(images)).latent_dist.mean  # (B, 4, lh, lw)
        buckets[key]["latents"].append(lat.half())
        buckets[key]["scenes"] += [asdict(sc) for sc in chunk]
        done += len(chunk)
        bar.update(len(chunk))
        if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint(False)
            last_ckpt = time.monotonic()
    bar.close()
    checkpoint(True)
    log.info("cache: %s latents after %.1f min",
             {k: len(v["scenes"]) for k, v in buckets.items()}, budget.spent_s / 60)


def load_cache(cfg: Config) -> tuple[dict, float]:
    """Buckets {(lh, lw): (latents (N, 4, lh, lw) scaled fp32, scenes)} and the VAE scaling factor."""
    state = torch.load(cfg.run_dir / "cache.pt", weights_only=False)
    out = {}
    for key, b in state["buckets"].items():
        if b["scenes"]:
            out[key] = (torch.cat(b["latents"]).float(), [Scene(**s) for s in b["scenes"]])
    # Scale latents to unit variance, as SD's scaling_factor does (0.18215 for SD 1.x).
    scaling = 1.0 / float(out[(16, 16)][0].std())
    return {k: (lat * scaling, scenes) for k, (lat, scenes) in out.items()}, scaling


# ----------------------------------------------------------------------------- stage 3: text + UNet


def sample_timesteps(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Uniform over [0, 1000): which noise levels matter is set by `timestep_weights`, not here."""
    return torch.from_numpy(rng.integers(0, 1000, n)).long()


MIN_SNR_GAMMA = 5.0  # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"
HIGH_NOISE_FLOOR = 0.1


def timestep_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) loss weights for v-prediction: min(SNR, gamma) / (SNR + 1), at least the floor.

    The plain v loss weighs the clean-image error by SNR + 1, so at high noise (half of this
    schedule's timesteps have SNR < 0.3) it is dominated by what cannot be known there, the
    shape's exact position, and the mid-noise steps where a shape's outline forms get little of
    the gradient: with it, run 1 of the bundled model still drew blobs after 2,987 steps.
    Min-SNR weighting (about 3x faster convergence in the paper) moves the weight to those
    mid-noise steps; the floor keeps enough at the highest noise for the image's mean colours,
    which only those steps decide under a zero-terminal-SNR schedule (it also lifts the few
    lowest-noise steps, SNR > 49, to 0.1).
    """
    a = alphas_cumprod[t].float()
    snr = a / (1 - a)
    w = torch.clamp(snr, max=MIN_SNR_GAMMA) / (snr + 1)
    return torch.clamp(w, min=HIGH_NOISE_FLOOR)[:, None, None, None]


SHAPE_WEIGHT = 3.0  # loss weight of latents on and around the shape, against 1 for background


def shape_masks(scenes: list[Scene], lh: int, lw: int) -> torch.Tensor:
    """(N, 1, lh, lw) float: 1 on latents the shape touches (dilated by one latent), else 0.

    The shape covers a tenth to a half of the image; without extra weight the loss is mostly
    flat background, which the model learns first and shapes last.
    """
    masks = []
    for sc in scenes:
        img = render(sc, lw * 2, lh * 2).astype(np.int16)  # 2 px per latent is enough for a mask
        bg = np.array(COLOURS[sc.background], np.int16)
        m = (np.abs(img - bg).sum(-1) > 30).reshape(lh, 2, lw, 2).any(axis=(1, 3))
        masks.append(torch.from_numpy(m))
    m = torch.stack(masks).float()[:, None]  # (N, 1, lh, lw)
    return F.max_pool2d(m, 3, stride=1, padding=1)


def export_pipeline(folder: Path, vae, text_encoder, unet, tokenizer_dir: Path, scaling: float,
                    fp16: bool = True) -> None:
    """Write a diffusers StableDiffusionPipeline folder (weights fp16 when `fp16`)."""
    import copy

    from diffusers import StableDiffusionPipeline

    vae = copy.deepcopy(vae)
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=copy.deepcopy(text_encoder),
        tokenizer=load_tokenizer(tokenizer_dir),
        unet=copy.deepcopy(unet),
        scheduler=make_inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if fp16:
        pipe.to(torch.float16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


class Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, model, decay: float = 0.998):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    self.shadow[k].copy_(v)


def train_unet(cfg: Config) -> None:
    path = cfg.run_dir / "unet.pt"
    tok_dir = cfg.run_dir / "tokenizer"
    save_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    buckets, scaling = load_cache(cfg)
    keys = [b for b in BUCKETS if (b[0], b[1]) in buckets]
    probs = np.array([b[3] for b in keys])
    probs /= probs.sum()

    text_encoder = make_text_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                     tokenizer.eos_token_id)
    unet = make_unet()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_unet, ema_text = Ema(unet), Ema(text_encoder)
    noise_sched = make_train_scheduler()
    state = torch.load(path, weights_only=False) if path.exists() else None
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema_unet.shadow, ema_text.shadow = state["ema_unet"], state["ema_text"]
        torch.set_rng_state(state["torch_rng"])
        if state["done"]:
            log.info("UNet: finished before at step %d; continuing while budget is left", state["step"])
    step = state["step"] if state else 0
    budget = Budget(cfg.unet_minutes, state["spent_s"] if state else 0.0)
    next_snapshot = state["next_snapshot"] if state else cfg.snapshot_minutes
    log.info("UNet %.2f M + text %.2f M params, buckets %s, from step %d, %.1f min budget left",
             sum(p.numel() for p in unet.parameters()) / 1e6,
             sum(p.numel() for p in text_encoder.parameters()) / 1e6,
             {k: len(v[1]) for k, v in buckets.items()}, step, (budget.limit_s - budget.spent_s) / 60)

    masks = {k: shape_masks(scenes, k[0], k[1]) for k, (_, scenes) in buckets.items()}
    vae = load_vae(cfg)

    def ema_models():
        import copy

        u, t = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        u.load_state_dict(ema_unet.shadow)
        t.load_state_dict(ema_text.shadow)
        return u.eval(), t.eval()

    def checkpoint(done: bool) -> None:
        save_atomic(dict(unet=unet.state_dict(), text=text_encoder.state_dict(), opt=opt.state_dict(),
                         ema_unet=ema_unet.shadow, ema_text=ema_text.shadow, step=step,
                         spent_s=budget.spent_s, next_snapshot=next_snapshot,
                         torch_rng=torch.get_rng_state(), done=done), path)

    def snapshot(tag: str) -> None:
        u, t = ema_models()
        export_pipeline(cfg.run_dir / "snapshot", vae, t, u, tok_dir, scaling)
        keep = cfg.run_dir / "snapshots" / tag
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(cfg.run_dir / "snapshot", keep)
        log.info("snapshot %s written at step %d (%.1f min)", tag, step, budget.spent_s / 60)

    last_ckpt = time.monotonic()
    losses: list[float] = []
    bar = tqdm(desc="unet", initial=step, total=cfg.unet_steps, mininterval=20, smoothing=0.05)
    tuner = ThreadTuner(cfg.threads)
    while step < cfg.unet_steps and not budget.over():
        t_step = time.monotonic()
        # Every step's randomness comes from (seed, step), so a resumed run draws the same batches.
        rng = np.random.default_rng([cfg.seed, 3, step])
        lh, lw, batch, _ = keys[rng.choice(len(keys), p=probs)]
        latents, scenes = buckets[(lh, lw)]
        idx = rng.integers(0, len(scenes), batch)
        x0 = latents[torch.from_numpy(idx)]  # (B, 4, lh, lw)
        weight = 1 + (SHAPE_WEIGHT - 1) * masks[(lh, lw)][torch.from_numpy(idx)]  # (B, 1, lh, lw)
        # 10 % empty prompts teach the unconditional prediction that classifier-free guidance uses.
        prompts = ["" if rng.random() < 0.1 else caption(scenes[i], rng) for i in idx]
        ids = token_ids(tokenizer, prompts)  # (B, 20)
        t = sample_timesteps(rng, batch)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)  # v = sqrt(a) eps - sqrt(1 - a) x0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lh * lw > 256):
            cond = text_encoder(ids).last_hidden_state  # (B, 20, 128)
            pred = unet(xt, t, cond).sample
        weight = weight * timestep_weights(noise_sched.alphas_cumprod, t)
        loss = ((pred.float() - target) ** 2 * weight).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        # Linear warm-up, constant for the first half of the budget, then cosine decay to a tenth.
        frac = min(1.0, budget.spent_s / budget.limit_s)
        decay = 1.0 if frac < 0.5 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (frac - 0.5) / 0.5))
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * min(1.0, (step + 1) / 200) * decay
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        tuner.record(time.monotonic() - t_step)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", size=f"{lh}x{lw}", refresh=False)
        if step % 50 == 0:
            log.info("UNet step %d: loss %.4f (last 50), %.1f min, %d threads", step, np.mean(losses[-50:]),
                     budget.spent_s / 60, tuner.current)
        if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint(False)
            last_ckpt = time.monotonic()
        if budget.spent_s / 60 >= next_snapshot:
            tag = f"min-{int(next_snapshot):03d}"
            next_snapshot += cfg.snapshot_minutes
            checkpoint(False)
            snapshot(tag)
    bar.close()
    checkpoint(True)
    log.info("UNet: done at step %d after %.1f min", step, budget.spent_s / 60)
    u, t = ema_models()
    export_pipeline(cfg.out, vae, t, u, tok_dir, scaling)
    info = dict(config={k: str(v) for k, v in asdict(cfg).items()}, unet_steps=step,
                unet_minutes=round(budget.spent_s / 60, 1), final_loss=float(np.mean(losses[-200:])) if losses else None,
                scaling_factor=scaling)
    (cfg.run_dir / "final.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("wrote %s", cfg.out)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/default-model"))
    p.add_argument("--out", type=Path, default=Path("runs/default-model/final"))
    for f in Config.__dataclass_fields__.values():
        if f.name in ("run_dir", "out"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    cfg = Config(**vars(a))
    for name in ("vae_minutes", "cache_minutes", "decoder_minutes", "unet_minutes"):
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive minutes, got {getattr(cfg, name)}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    log.info("config %s", cfg)
    split = split_triples()
    stages = {"vae": train_vae, "cache": build_cache, "decoder": finetune_decoder,
              "unet": lambda c, _: train_unet(c)}
    for name, stage in stages.items():
        if cfg.only in ("", name):
            stage(cfg, split)


if __name__ == "__main__":
    main()
