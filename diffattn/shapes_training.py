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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .presets.text_tokenizers import build_clip_tokenizer
from .scenes import render_scene


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


def build_components(seed: int = 0) -> dict[str, Any]:
    """The untrained model: the standard diffusers/transformers classes at small width."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

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
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def scene_batch(start: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Scenes start..start+size-1 of the seeded stream: images [B, 3, 64, 64] in [-1, 1] and their captions."""
    scenes = [render_scene(seed) for seed in range(start, start + size)]
    images = np.stack([np.asarray(s.image, dtype=np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2), [s.caption for s in scenes]


def _save_checkpoint(path: Path, components, optimizers, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "state": state,
            "models": {k: components[k].state_dict() for k in ("vae", "unet", "text_encoder")},
            "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
        },
        tmp,
    )
    tmp.replace(path)  # a crash never leaves a half-written checkpoint


def _load_exported(components: dict[str, Any], folder: Path, device: torch.device) -> dict[str, int]:
    """Weights of an exported pipeline folder into `components` (fp16 -> fp32); returns its step counters.

    This is how training continues across sessions from weights kept in the repository (no optimizer state:
    AdamW restarts its moments).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    loaders = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
    for name, cls in loaders.items():
        weights = cls.from_pretrained(folder, subfolder=name, torch_dtype=torch.float32).state_dict()
        components[name].load_state_dict(weights)
        components[name].to(device)
    state = json.loads((folder / "training_state.json").read_text())
    return {"vae_step": state["vae_step"], "unet_step": state["unet_step"]}


def train_shapes(
    out: Path, config: ShapesTrainingConfig | None = None, *, resume: bool = True, init_from: Path | None = None
) -> dict[str, Any]:
    """Run (or resume) both phases and export the pipeline. Returns the final state (steps and last losses).

    `init_from`: an exported pipeline folder (with training_state.json) to continue from when `out` has no
    checkpoint yet.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    config = config or ShapesTrainingConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    components = build_components(config.seed)
    for name in ("vae", "unet", "text_encoder"):
        components[name].to(device)
    optimizers = {
        "vae": torch.optim.AdamW(components["vae"].parameters(), lr=config.vae_lr),
        "unet": torch.optim.AdamW(
            list(components["unet"].parameters()) + list(components["text_encoder"].parameters()), lr=config.unet_lr
        ),
    }
    state = {"vae_step": 0, "unet_step": 0, "config": asdict(config)}
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        for name, weights in saved["models"].items():
            components[name].load_state_dict(weights)
        for name, opt_state in saved["optimizers"].items():
            optimizers[name].load_state_dict(opt_state)
        state.update({k: saved["state"][k] for k in ("vae_step", "unet_step")})
        logger.info("resumed from %s at vae step %d, unet step %d", checkpoint, state["vae_step"], state["unet_step"])
    elif init_from is not None:
        state.update(_load_exported(components, Path(init_from), device))
        logger.info(
            "continuing from %s at vae step %d, unet step %d", init_from, state["vae_step"], state["unet_step"]
        )
    log = open(out / "train_log.jsonl", "a")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    vae, unet, text_encoder, tokenizer = (components[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    scheduler = components["scheduler"]
    batch = config.batch_size
    try:
        # Phase 1: the autoencoder. Data for step i is scenes [i * batch, (i + 1) * batch) of the stream.
        for step in tqdm(range(state["vae_step"], config.vae_steps), desc="vae", initial=state["vae_step"],
                         total=config.vae_steps):  # fmt: skip
            images, _ = scene_batch(config.seed * 10**7 + step * batch, batch)
            images = images.to(device)
            with autocast:
                posterior = vae.encode(images).latent_dist
                recon = vae.decode(posterior.sample(generator=None)).sample
                loss = F.l1_loss(recon.float(), images) + 1e-6 * posterior.kl().mean()
            optimizers["vae"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["vae"].step()
            state["vae_step"] = step + 1
            state["vae_loss"] = float(loss.detach())
            log.write(json.dumps({"phase": "vae", "step": step, "loss": state["vae_loss"]}) + "\n")
            if state["vae_step"] % config.checkpoint_every == 0:
                _save_checkpoint(checkpoint, components, optimizers, state)
        # Phase 2: UNet and text encoder on the frozen VAE's latents.
        vae.requires_grad_(False)
        scaling = vae.config.scaling_factor
        generator = torch.Generator(device="cpu")
        for step in tqdm(range(state["unet_step"], config.unet_steps), desc="unet", initial=state["unet_step"],
                         total=config.unet_steps):  # fmt: skip
            generator.manual_seed(config.seed * 10**7 + 5 * 10**6 + step)
            images, captions = scene_batch(config.seed * 10**7 + 5 * 10**6 + step * batch, batch)
            drop = torch.rand(batch, generator=generator) < config.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)  # fmt: skip
            with torch.no_grad():
                latents = vae.encode(images.to(device)).latent_dist.mode() * scaling
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(
                device
            )
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with autocast:
                prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
                loss = F.mse_loss(prediction.float(), noise)
            optimizers["unet"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
            optimizers["unet"].step()
            state["unet_step"] = step + 1
            state["unet_loss"] = float(loss.detach())
            log.write(json.dumps({"phase": "unet", "step": step, "loss": state["unet_loss"]}) + "\n")
            if state["unet_step"] % config.checkpoint_every == 0:
                _save_checkpoint(checkpoint, components, optimizers, state)
    finally:
        log.close()
    _save_checkpoint(checkpoint, components, optimizers, state)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out / "pipeline", safe_serialization=True)
    pipe.to(torch.float32)
    (out / "pipeline" / "training_state.json").write_text(
        json.dumps({k: state.get(k) for k in ("vae_step", "unet_step", "vae_loss", "unet_loss", "config")}, indent=2)
    )
    return state
