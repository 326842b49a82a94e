"""Training a small Stable Diffusion from scratch on `diffattn.scenes`: the recipe behind the `shapes-sd` preset.

    diffattn train-shapes --out runs/shapes --vae-steps 2000 --unet-steps 20000 --batch-size 32

Two phases, each seeded and resumable from `out/checkpoint.pt` (written every `checkpoint_every` steps and at the
end): an AutoencoderKL (64 px -> 16x16x4 latents; L1 + 1e-6 KL), then the UNet and the CLIP text encoder together on
the frozen VAE's latents (epsilon prediction, DDPM schedule, 10% empty captions for classifier-free guidance). The
scenes are drawn from a seeded stream, so a resumed run sees the same data it would have. bf16 autocast on CUDA.
The result is saved as a StableDiffusionPipeline (fp16 safetensors) in `out/pipeline`, loadable with
`from_pretrained`; `out/train_log.jsonl` holds the training curve.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .loading import default_device, dtype_keyword, parse_device
from .presets.image import clip_text_config, stable_diffusion_pipeline
from .presets.text_tokenizers import build_clip_tokenizer
from .scenes import render_scene
from .validation import check_int_range, check_number, check_str


logger = logging.getLogger(__name__)


@dataclass
class ShapesTrainingConfig:
    vae_steps: int = 2000
    unet_steps: int = 20000
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 3e-4
    seed: int = 0
    checkpoint_every: int = 500
    caption_dropout: float = 0.1
    device: str | None = None
    # Exponential moving average of the UNet and text-encoder weights (with the usual (1 + t) / (10 + t) warm-up);
    # the export uses the averaged weights. 0 turns it off.
    ema_decay: float = 0.999
    # Wall-clock budget of this run in minutes: at the budget the run stops where it is, checkpoints and exports
    # (a later run resumes). None: no budget.
    max_minutes: float | None = None
    # Processes that render scenes and tokenize captions ahead of the training step (0: in the training process).
    num_workers: int = 0
    # Steps between host syncs that write the per-step losses to the log (the GPU runs ahead in between).
    log_every: int = 50

    def __post_init__(self):
        for name in ("vae_steps", "unet_steps", "num_workers", "seed"):
            check_int_range(name, getattr(self, name), 0)
        for name in ("batch_size", "checkpoint_every", "log_every"):
            check_int_range(name, getattr(self, name), 1)
        check_number("vae_lr", self.vae_lr, 0, 1, low_open=True)
        check_number("unet_lr", self.unet_lr, 0, 1, low_open=True)
        check_number("caption_dropout", self.caption_dropout, 0, 1)
        check_number("ema_decay", self.ema_decay, 0, 0.999999)
        check_number("max_minutes", self.max_minutes, 0, 10**6, allow_none=True)
        if self.device is not None:
            check_str("device", self.device, max_length=100)
            parse_device(self.device)  # one this machine has


def build_components(seed: int = 0) -> dict[str, Any]:
    """The untrained model: the standard diffusers/transformers classes at small width."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    # ~1.7M parameters: the whole fp16 pipeline stays under the preset's 10 MB budget.
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, 64, heads=4))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def scene_batch(start: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Scenes start..start+size-1 of the seeded stream: images [B, 3, 64, 64] in [-1, 1] and their captions."""
    scenes = [render_scene(seed) for seed in range(start, start + size)]
    images = np.stack([np.asarray(s.image, dtype=np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2), [s.caption for s in scenes]


# Where each stream of the seeded scene sequence starts (plus seed * 10**7): the phases never share scenes, and the
# latent calibration reads scenes neither phase reaches.
VAE_STREAM, UNET_STREAM, CALIBRATION_STREAM = 0, 5 * 10**6, 9 * 10**6


def _stream_start(config: ShapesTrainingConfig, stream: int) -> int:
    return config.seed * 10**7 + stream


class _VaeSteps(torch.utils.data.Dataset):
    """Item `step`: the images [B, 3, 64, 64] of that autoencoder step (scenes [step * B, (step + 1) * B))."""

    def __init__(self, config: ShapesTrainingConfig):
        self.config = config

    def __len__(self) -> int:
        return self.config.vae_steps

    def __getitem__(self, step: int) -> torch.Tensor:
        batch = self.config.batch_size
        return scene_batch(_stream_start(self.config, VAE_STREAM) + step * batch, batch)[0]


class _UnetSteps(torch.utils.data.Dataset):
    """Item `step`: everything random about that UNet step, drawn from its own seed, so workers and resumed runs
    see exactly what a single uninterrupted run would: images [B, 3, 64, 64], caption ids [B, 77] (10% emptied),
    noise [B, 4, 16, 16] and timesteps [B]."""

    def __init__(self, config: ShapesTrainingConfig, tokenizer, num_train_timesteps: int, latent_shape):
        self.config, self.tokenizer = config, tokenizer
        self.num_train_timesteps, self.latent_shape = num_train_timesteps, tuple(latent_shape)

    def __len__(self) -> int:
        return self.config.unet_steps

    def __getitem__(self, step: int):
        config, batch = self.config, self.config.batch_size
        start = _stream_start(config, UNET_STREAM)
        generator = torch.Generator().manual_seed(start + step)
        images, captions = scene_batch(start + step * batch, batch)
        drop = torch.rand(batch, generator=generator) < config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        noise = torch.randn((batch, *self.latent_shape), generator=generator)
        timesteps = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)
        return images, ids, noise, timesteps


def _steps(dataset: torch.utils.data.Dataset, first: int, config: ShapesTrainingConfig, device: torch.device):
    """Items first..len-1 of `dataset`, in order, rendered ahead by `config.num_workers` processes."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # each item already is a whole step
        sampler=range(first, len(dataset)),
        num_workers=config.num_workers,
        prefetch_factor=4 if config.num_workers else None,
        pin_memory=device.type == "cuda",
    )


class _LossLog:
    """Per-step losses kept on the device and written to the jsonl log every `every` steps: one host sync per
    flush instead of one per step. Each line: phase, step, loss and `seconds` (since this log was opened, at the
    flush that wrote it); each flush logs the steps a second since the last one (the last lines on a GPU are its
    throughput: a flush waits for the steps before it to finish)."""

    def __init__(self, file, every: int):
        self.file, self.every, self.pending = file, max(1, every), []
        self.opened = self.flushed = time.monotonic()

    def add(self, phase: str, step: int, loss: torch.Tensor) -> None:
        self.pending.append((phase, step, loss.detach()))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> float | None:
        if not self.pending:
            return None
        values = torch.stack([loss.float() for _, _, loss in self.pending]).tolist()
        now = time.monotonic()
        seconds = round(now - self.opened, 3)
        for (phase, step, _), value in zip(self.pending, values):
            self.file.write(json.dumps({"phase": phase, "step": step, "loss": value, "seconds": seconds}) + "\n")
        self.file.flush()
        phase, step, _ = self.pending[-1]
        logger.info("%s step %d: loss %.4f (mean of %d), %.2f steps a second", phase, step,
                    sum(values) / len(values), len(values), len(values) / max(now - self.flushed, 1e-9))  # fmt: skip
        self.pending, self.flushed = [], now
        return values[-1]


@torch.no_grad()
def latent_scale(vae, config: ShapesTrainingConfig, device: torch.device, batches: int = 8) -> float:
    """1 / std of the autoencoder's latents (posterior modes) over scenes the training stream never reaches.

    Stable Diffusion's 0.18215 is this number for its own VAE; a fresh VAE needs its own, or the scaled latents are
    far from unit variance and the noise schedule's signal-to-noise ratios are off (measured here: latent std 0.96,
    so 0.18215 left the UNet training on signals ~5x weaker than the schedule assumes).
    """
    first = _stream_start(config, CALIBRATION_STREAM)
    latents = [
        vae.encode(scene_batch(first + i * config.batch_size, config.batch_size)[0].to(device)).latent_dist.mode()
        for i in range(batches)
    ]
    return float(1.0 / torch.cat(latents).float().std())


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float, step: int) -> None:
    weight = 1.0 - min(decay, (1 + step) / (10 + step))
    # One fused launch for all tensors (a Python loop is ~200 small kernels per step on a GPU).
    torch._foreach_lerp_(ema, [p.detach() for p in params], weight)


def _trained(components: dict) -> dict:
    return {k: components[k] for k in ("vae", "unet", "text_encoder")}


def save_checkpoint(path: Path, models: dict, optimizers: dict, state: dict, ema: list[torch.Tensor] | None) -> None:
    """Models' and optimizers' states, the run's state and the EMA weights, written whole or not at all."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "state": state,
            "models": {k: model.state_dict() for k, model in models.items()},
            "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
            "ema": ema,
        },
        tmp,
    )
    tmp.replace(path)  # a crash never leaves a half-written checkpoint


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Resume `optimizer` from its saved state but keep the learning rate it was built with: torch's load_state_dict
    would restore the saved rate and silently ignore the one this run was given."""
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A training checkpoint, loaded with `weights_only=True`: tensors, numbers, strings and containers only, so a
    planted checkpoint cannot run code (torch refuses any other pickled object)."""
    import pickle

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} is not allowed: it holds objects other than tensors and plain values, which are never unpickled "
            f"({' '.join(str(exc).split())[:200]})"
        ) from None


def _load_exported(components: dict[str, Any], folder: Path, device: torch.device) -> dict[str, Any]:
    """Weights of an exported pipeline folder into `components` (fp16 -> fp32); returns its step counters.

    This is how training continues across sessions from weights kept in the repository (no optimizer state:
    AdamW restarts its moments; the averaged weights that were exported become both the weights and the average).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    loaders = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
    for name, cls in loaders.items():
        weights = cls.from_pretrained(
            folder, subfolder=name, use_safetensors=True, **{dtype_keyword(): torch.float32}
        ).state_dict()
        components[name].load_state_dict(weights)
        components[name].to(device)
    state = json.loads((folder / "training_state.json").read_text())
    # Exports from before the latent calibration have no latent_scale: it is measured when the UNet phase resumes.
    return {k: state[k] for k in ("vae_step", "unet_step", "latent_scale") if state.get(k) is not None}


def train_shapes(
    out: Path, config: ShapesTrainingConfig | None = None, *, resume: bool = True, init_from: Path | None = None
) -> dict[str, Any]:
    """Run (or resume) both phases and export the pipeline. Returns the final state (steps and last losses).

    `init_from`: an exported pipeline folder (with training_state.json) to continue from when `out` has no
    checkpoint yet.
    """
    from diffusers import DPMSolverMultistepScheduler

    config = config or ShapesTrainingConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if config.max_minutes is None else time.monotonic() + 60 * config.max_minutes
    device = torch.device(config.device or default_device())
    components = build_components(config.seed)
    for name in ("vae", "unet", "text_encoder"):
        components[name].to(device)
    vae, unet, text_encoder, tokenizer = (components[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    denoiser_params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizers = {
        "vae": torch.optim.AdamW(vae.parameters(), lr=config.vae_lr),
        "unet": torch.optim.AdamW(denoiser_params, lr=config.unet_lr),
    }
    state = {"vae_step": 0, "unet_step": 0, "config": asdict(config)}
    checkpoint = out / "checkpoint.pt"
    saved_ema = None
    if resume and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, device)
        for name, weights in saved["models"].items():
            components[name].load_state_dict(weights)
        for name, opt_state in saved["optimizers"].items():
            load_optimizer(optimizers[name], opt_state)
        kept = ("vae_step", "unet_step", "vae_loss", "unet_loss", "latent_scale")
        state.update({k: saved["state"][k] for k in kept if k in saved["state"]})
        saved_ema = saved.get("ema")
        logger.info("resumed from %s at vae step %d, unet step %d", checkpoint, state["vae_step"], state["unet_step"])
    elif init_from is not None:
        state.update(_load_exported(components, Path(init_from), device))
        logger.info(
            "continuing from %s at vae step %d, unet step %d", init_from, state["vae_step"], state["unet_step"]
        )
    ema = None
    if config.ema_decay > 0:
        ema = saved_ema if saved_ema is not None else [p.detach().clone() for p in denoiser_params]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    scheduler = components["scheduler"]
    log = _LossLog(open(out / "train_log.jsonl", "a" if resume else "w"), config.log_every)  # --fresh: a new log

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def finish_step(phase: str, step: int, loss: torch.Tensor) -> None:
        state[f"{phase}_step"] = step + 1
        log.add(phase, step, loss)
        if state[f"{phase}_step"] % config.checkpoint_every == 0:
            state[f"{phase}_loss"] = log.flush() or state.get(f"{phase}_loss")
            save_checkpoint(checkpoint, _trained(components), optimizers, state, ema)

    try:
        # Phase 1: the autoencoder. Data for step i is scenes [i * batch, (i + 1) * batch) of the stream.
        batches = _steps(_VaeSteps(config), state["vae_step"], config, device)
        progress = tqdm(batches, desc="vae", initial=state["vae_step"], total=config.vae_steps)
        for step, images in enumerate(progress, start=state["vae_step"]):
            if out_of_time():
                break
            images = images.to(device, non_blocking=True)
            with autocast:
                posterior = vae.encode(images).latent_dist
                recon = vae.decode(posterior.sample(generator=None)).sample
                loss = F.l1_loss(recon.float(), images) + 1e-6 * posterior.kl().mean()
            optimizers["vae"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["vae"].step()
            finish_step("vae", step, loss)
        state["vae_loss"] = log.flush() or state.get("vae_loss")
        # Phase 2: UNet and text encoder on the frozen VAE's latents (once the autoencoder is done).
        vae.requires_grad_(False)
        vae_done = state["vae_step"] >= config.vae_steps
        first_unet_step = state["unet_step"] if vae_done else config.unet_steps
        if state.get("latent_scale") is None and vae_done:
            state["latent_scale"] = latent_scale(vae, config, device)
            logger.info("latent scale: %.4f (1 / std of the autoencoder's latents)", state["latent_scale"])
        scaling = state.get("latent_scale")
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latent_shape = (vae.config.latent_channels, 64 // factor, 64 // factor)
        data = _UnetSteps(config, tokenizer, scheduler.config.num_train_timesteps, latent_shape)
        progress = tqdm(_steps(data, first_unet_step, config, device), desc="unet", initial=state["unet_step"],
                        total=config.unet_steps)  # fmt: skip
        for step, (images, ids, noise, timesteps) in enumerate(progress, start=first_unet_step):
            if out_of_time():
                break
            images, ids, noise, timesteps = (t.to(device, non_blocking=True) for t in (images, ids, noise, timesteps))
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.mode() * scaling
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with autocast:
                prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
                loss = F.mse_loss(prediction.float(), noise)
            optimizers["unet"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser_params, 1.0)
            optimizers["unet"].step()
            if ema is not None:
                _ema_update(ema, denoiser_params, config.ema_decay, step)
            finish_step("unet", step, loss)
        state["unet_loss"] = log.flush() or state.get("unet_loss")
    finally:
        log.flush()
        log.file.close()
    save_checkpoint(checkpoint, _trained(components), optimizers, state, ema)
    if state.get("latent_scale") is not None:
        vae.register_to_config(scaling_factor=state["latent_scale"])  # what the pipeline divides latents by
    sampler = DPMSolverMultistepScheduler.from_config(scheduler.config, steps_offset=1)
    pipe = stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, sampler)
    kept = ("vae_step", "unet_step", "vae_loss", "unet_loss", "latent_scale", "config")
    export_pipeline(pipe, out / "pipeline", {k: state.get(k) for k in kept}, ema, denoiser_params)
    return state


def export_pipeline(pipe, folder: Path, state: dict, ema: list[torch.Tensor] | None, params: list) -> None:
    """The end of a training run: the averaged weights (when an EMA is kept) copied into `params`, the pipeline saved
    as fp16 safetensors to `folder` (written beside it and swapped in, so a crash keeps the previous export), and
    `state` as its training_state.json. The checkpoint written before keeps the raw weights for resuming."""
    import shutil

    with torch.no_grad():
        for param, average in zip(params, ema or []):
            param.copy_(average)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
