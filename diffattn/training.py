"""LoRA fine-tuning with radial attention active (the length extension the Radial Attention paper describes).

    diffattn train-lora --model tiny-wan --data clips/ --out lora/ --steps 200 --rank 16

`data` holds training clips: videos (`*.mp4`, ...) or cached latents (`*.safetensors` with a `latents` tensor
[C, F, H, W] in the transformer's normalised latent space), each with a caption in a `.txt` file of the same stem.
LoRA adapters (peft) go on the attention projections (to_q, to_k, to_v, to_out.0) of the video transformer; the
loss is flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, s logit-normal), as Wan is trained. Radial
attention runs on every training step, through the block-sparse kernel's backward. The adapters are saved with the
pipeline's `save_lora_weights`, so `pipe.load_lora_weights(out)` loads them.
Supported: the Wan family (T2V); other families need their own conditioning inputs and are not wired yet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .control import apply
from .generation import radial_defaults
from .loading import default_device, load_pipeline
from .methods.radial_attention import RadialAttentionConfig


logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".gif")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class TrainingExample:
    """One clip: latents [C, F, H, W] (normalised) and its prompt embeddings [L, D]."""

    name: str
    latents: torch.Tensor
    prompt_embeds: torch.Tensor


def _caption(path: Path) -> str:
    caption = path.with_suffix(".txt")
    if not caption.is_file():
        raise ValueError(f"data: {path.name} has no caption file {caption.name} beside it")
    text = caption.read_text().strip()
    if not text:
        raise ValueError(f"data: caption file {caption.name} is empty")
    return text


def _read_video(path: Path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The first `num_frames` frames of a video, resized: [1, 3, F, H, W] in [-1, 1]."""
    import imageio.v3 as iio

    frames = torch.from_numpy(iio.imread(path))  # [F, H, W, 3] uint8
    if frames.ndim != 4 or frames.shape[0] < num_frames:
        raise ValueError(f"data: {path.name} has {frames.shape[0]} frames, training needs num_frames={num_frames}")
    video = frames[:num_frames].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [F, 3, H, W]
    video = torch.nn.functional.interpolate(video, size=(height, width), mode="bilinear", align_corners=False)
    return video.permute(1, 0, 2, 3).unsqueeze(0)


def latent_normalisation(vae: Any, device: Any = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """A Wan VAE's per-channel latents_mean and latents_std as [1, C, 1, 1, 1] tensors (on the VAE's device and in
    its dtype unless given). WanPipeline's latents are (mode - mean) / std. Made once per loop, not per step: a tensor
    built from a list on a GPU is a blocking copy."""
    device, dtype = device or vae.device, dtype or vae.dtype
    return tuple(torch.tensor(getattr(vae.config, name), device=device, dtype=dtype).view(1, -1, 1, 1, 1)
                 for name in ("latents_mean", "latents_std"))  # fmt: skip


def encode_video(pipe: Any, video: torch.Tensor) -> torch.Tensor:
    """Wan VAE encoding with its latent normalisation: [1, 3, F, H, W] -> [C, F', H', W']."""
    vae = pipe.vae
    latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
    mean, std = latent_normalisation(vae, latents.device, latents.dtype)
    return ((latents - mean) / std)[0]


def load_examples(
    pipe: Any, data: Path, *, num_frames: int, height: int, width: int, max_sequence_length: int
) -> list[TrainingExample]:
    """Encode every clip in `data` once (videos through the VAE; cached latents as they are) with its caption."""
    from safetensors.torch import load_file

    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"data={str(data)!r} is not a folder")
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES + (".safetensors",))
    if not files:
        raise ValueError(f"data={str(data)!r} holds no videos ({', '.join(VIDEO_SUFFIXES)}) or .safetensors latents")
    examples = []
    with torch.no_grad():
        for path in files:
            prompt = _caption(path)
            if path.suffix == ".safetensors":
                tensors = load_file(str(path))
                if "latents" not in tensors or tensors["latents"].ndim != 4:
                    raise ValueError(f"data: {path.name} needs a 'latents' tensor [C, F, H, W]")
                latents = tensors["latents"]
            else:
                latents = encode_video(pipe, _read_video(path, num_frames, height, width))
            embeds, _ = pipe.encode_prompt(
                prompt, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
            )
            examples.append(TrainingExample(path.stem, latents.float().cpu(), embeds[0].float().cpu()))
    shapes = {tuple(e.latents.shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"data: clips must share one latent shape to batch them, got {sorted(shapes)}")
    return examples


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """peft LoRA on the attention projections; returns the trainable parameters (everything else frozen)."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGETS, init_lora_weights=True, lora_dropout=0.0
    )
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("peft added no trainable LoRA parameters to the transformer")
    return params


def flow_matching_noise(
    latent_shape: tuple[int, ...], generator: torch.Generator, shift: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A flow-matching step's draws, on the generator's device: noise [B, ...] (`latent_shape`) and noise levels
    sigma [B].

    Noise levels are logit-normal (as SD3 trains), mapped by `shift` as FlowMatchEulerDiscreteScheduler maps its
    sampling sigmas (shift * s / (1 + (shift - 1) * s)): shift > 1 trains more at high noise, where a sampler with
    the same shift spends its first steps (SD3 scales it with the square root of the token count).
    """
    noise = torch.randn(latent_shape, generator=generator, device=generator.device)
    sigma = torch.sigmoid(torch.randn(latent_shape[0], generator=generator, device=generator.device))
    return noise, shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_matching_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow loss on a batch (x_t = (1 - sigma) x0 + sigma e, target e - x0). latents, noise:
    [B, C, F, H, W]; prompt_embeds: [B, L, D]; sigma: [B] (`flow_matching_noise`); weight: None (the mean squared
    error) or [B, 1, F, H, W], each latent position's weight in a weighted mean of the squared error."""
    if noise.shape != latents.shape or sigma.shape != latents.shape[:1]:
        raise ValueError(f"noise {tuple(noise.shape)} and sigma {tuple(sigma.shape)} do not fit latents "
                         f"{tuple(latents.shape)}: expected noise of the latents' shape "
                         "and one sigma per clip")  # fmt: skip
    noise, sigma = noise.to(latents), sigma.to(latents)
    sigma_b = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1.0 - sigma_b) * latents + sigma_b * noise
    prediction = transformer(noisy, sigma * 1000.0, prompt_embeds, return_dict=False)[0]
    if weight is None:
        return torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())
    if weight.shape != (latents.shape[0], 1, *latents.shape[2:]):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit latents {tuple(latents.shape)}: expected "
                         "[B, 1, F, H, W]")  # fmt: skip
    weight = weight.float().expand_as(prediction)
    return (weight * (prediction.float() - (noise - latents).float()).square()).sum() / weight.sum()


def lora_radial_defaults(model: str) -> RadialAttentionConfig:
    """The radial settings a LoRA trains with when none are given: the model's (`radial_defaults`: a preset's own,
    else the library's), sparse on every step and layer, since a training step has no denoising schedule."""
    return dataclasses.replace(radial_defaults(model), dense_layers=0, dense_timesteps=0, dense_last_timesteps=0)


def train_radial_lora(
    model: str,
    data: Path,
    out: Path,
    *,
    steps: int = 100,
    rank: int = 16,
    learning_rate: float = 1e-4,
    batch_size: int = 1,
    num_frames: int = 33,
    height: int = 128,
    width: int = 128,
    max_sequence_length: int = 64,
    radial: RadialAttentionConfig | None = None,
    dense: bool = False,
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
    gradient_checkpointing: bool = False,
    pipe: Any | None = None,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters with radial attention active; save them to `out`. Returns a summary with the losses.

    `radial` defaults to `lora_radial_defaults(model)` (the model's radial settings, sparse on every training step
    and layer); `dense=True` trains with the model's own dense attention instead (the baseline radial is measured
    against). Refuses to replace existing adapters in `out` unless `overwrite`. `device` None: `default_device()`.
    `gradient_checkpointing`: the transformer's blocks recompute their activations in the backward pass
    (diffusers' `enable_gradient_checkpointing`) instead of holding them: the same gradients, for the memory of
    long videos (a block's activations at 64k tokens take gigabytes), at about one more forward pass a step.
    """
    if dense and radial is not None:
        raise ValueError("dense=True trains with dense attention: pass no radial config with it")
    out = Path(out)
    if steps < 1 or rank < 1 or batch_size < 1:
        raise ValueError(f"steps={steps}, rank={rank}, batch_size={batch_size}: each must be an int >= 1")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} is not allowed: expected a number > 0")
    if (out / WEIGHTS_NAME).exists() and not overwrite:
        raise ValueError(f"out={str(out)!r} already holds {WEIGHTS_NAME}; pass overwrite=True (--overwrite)")
    pipe = pipe if pipe is not None else load_pipeline(model, device=device or default_device())
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if type(denoiser).__name__ != "WanTransformer3DModel":
        raise ValueError(f"train-lora supports the Wan family; {model!r} has {type(denoiser).__name__}")
    examples = load_examples(
        pipe, data, num_frames=num_frames, height=height, width=width, max_sequence_length=max_sequence_length
    )
    transformer = pipe.transformer
    # peft draws the adapters' first weights from torch's global generator: seeded here, so `seed` fixes the whole run,
    # and forked, so the caller's generator is left as it was
    cuda = [transformer.device] if transformer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        params = add_lora(transformer, rank)
    radial = None if dense else radial or lora_radial_defaults(model)
    handle = apply(transformer, radial) if radial is not None else None
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.Generator().manual_seed(seed + 1)
    dev = transformer.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else _NullContext()
    losses: list[float] = []
    step_seconds: list[float] = []  # wall time of each step: a median resists a busy host better than a total
    transformer.train()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    try:
        for step in tqdm(range(steps), desc="train-lora"):
            started = time.perf_counter()
            picks = torch.randint(len(examples), (batch_size,), generator=order).tolist()
            latents = torch.stack([examples[i].latents for i in picks]).to(dev, transformer.dtype)
            embeds = torch.stack([examples[i].prompt_embeds for i in picks]).to(dev, transformer.dtype)
            with autocast:
                loss = flow_matching_loss(transformer, latents, embeds, *flow_matching_noise(latents.shape, generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step_seconds.append(time.perf_counter() - started)
            logger.info("step %d loss %.5f", step, losses[-1])
    finally:
        transformer.eval()
        if gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
        if handle is not None:
            handle.remove()
    _save(pipe, out, losses, radial, rank)
    return {"out": str(out), "steps": steps, "losses": losses, "step_seconds": step_seconds,
            "examples": [e.name for e in examples]}  # fmt: skip


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _save(pipe: Any, out: Path, losses: list[float], radial: RadialAttentionConfig | None, rank: int) -> None:
    from peft.utils import get_peft_model_state_dict

    out.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(pipe.transformer)
    type(pipe).save_lora_weights(out, transformer_lora_layers=layers, safe_serialization=True)
    with open(out / "train_log.json", "w") as f:
        json.dump(
            {
                "losses": losses,
                "radial": repr(radial) if radial is not None else "dense",
                "rank": rank,
                "final_loss": losses[-1] if losses else math.nan,
            },
            f,
            indent=2,
        )
