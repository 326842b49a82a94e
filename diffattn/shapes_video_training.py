"""Training `shapes-wan` from scratch on rendered moving-shape clips (`diffattn train-shapes-video`).

    diffattn train-shapes-video --out runs/shapes-wan --max-minutes 60          # resumes runs/shapes-wan

Phases, each seeded and resumable from `out/checkpoint.pt` (loaded with `weights_only=True`):

1. the autoencoder (AutoencoderKLWan: 4x space, 4x time) on short clips (`vae_frames`, at least 9: the first frame,
   a 4-frame chunk after it, and a chunk after a chunk, the path every later chunk takes), seeded windows of the
   frames (`vae_crop`), reconstruction before diffusers' output clamp (`decode_unclamped`) + a small KL term;
2. calibration: each latent channel's mean and std over clips no phase trains on, stored as the VAE's
   `latents_mean`/`latents_std` (WanPipeline normalises with them), so the denoiser sees unit-variance latents;
   then, optionally (`decoder_steps`), the decoder alone on clips of the generated length (`decoder_frames`): the
   decoder carries a cache from chunk to chunk, and one trained on 9 frames has taken the chunk-after-chunk path
   once; repeated over a 33-frame clip its errors compound (colours drift after frame 9). The encoder stays frozen,
   so the latents the denoiser learns, and their calibration, do not change;
3. the transformer and the UMT5 text encoder together, flow matching on `num_frames` clips (optionally shorter
   `warmup_frames` clips for the first `warmup_steps`: the same shapes and motion at a fraction of the cost; Wan's
   rotary embeddings are relative, so what is learnt there carries over) (x_t = (1 - s) x0 + s e,
   target e - x0, s logit-normal, as Wan trains), captions dropped 10% of the time for classifier-free guidance,
   encoded exactly as WanPipeline encodes prompts (zeros past each caption's tokens), an EMA of the weights.

`out/pipeline` is the exported WanPipeline (fp16 safetensors, the EMA weights), loadable with `from_pretrained`;
`out/train_log.jsonl` the losses. The model is small enough for a CPU to run it, but a CPU trains it slowly (on 2
cores one transformer step at batch 4 takes seconds and the autoencoder's tens of seconds); train on a GPU
(`benchmarks/gpu_run.sh trainvideo:MINUTES`). bf16 autocast on CUDA.
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

from .loading import default_device, dtype_keyword, parse_device
from .presets.shapes_video import (
    ATTENTION_HEADS,
    DEFAULT_ATTENTION_HEADS,
    FFN_DIM,
    INNER_DIM,
    MAX_PRESET_MB,
    MAX_SEQUENCE_LENGTH,
    NUM_FRAMES,
    NUM_LAYERS,
    build_shapes_wan,
    check_transformer_size,
)
from .scenes import SPEEDS, check_clip_motion, render_clip
from .shapes_training import (
    _ema_update,
    _LossLog,
    _steps,
    export_pipeline,
    load_checkpoint,
    load_optimizer,
    save_checkpoint,
)
from .training import flow_matching_loss, flow_matching_noise, latent_normalisation
from .validation import check_bool, check_choice, check_int_range, check_number, check_str, refuse


logger = logging.getLogger(__name__)

# Where each stream of the seeded clip sequence starts (plus seed * 10**7); evaluation clips start at
# scenes.HELD_OUT_CLIP_SEED, far above every stream.
VAE_STREAM, DENOISER_STREAM, DECODER_STREAM, CALIBRATION_STREAM = 0, 5 * 10**6, 7 * 10**6, 9 * 10**6
IMAGE_STREAM = 8 * 10**6  # the single frames of `image_every` steps


@dataclass
class ShapesVideoTrainingConfig:
    vae_steps: int = 3000
    vae_frames: int = 9
    vae_crop: int = 64
    vae_batch_size: int = 8
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 0  # after calibration: the decoder alone on `decoder_frames` clips, the encoder frozen
    decoder_frames: int = NUM_FRAMES
    decoder_lr: float = 3e-4
    denoiser_steps: int = 20000
    attention_heads: int = DEFAULT_ATTENTION_HEADS  # the attention in heads of width / attention_heads dims
    width: int = INNER_DIM  # the transformer's size (the shipped weights': 96, 4 layers, 256)
    num_layers: int = NUM_LAYERS
    ffn_dim: int = FFN_DIM
    timestep_shift: float = 1.0  # noise levels of the flow-matching loss, mapped as the sampler maps its sigmas
    object_weight: float = 0.0  # the loss at latent positions an object covers counts 1 + object_weight times
    num_frames: int = NUM_FRAMES
    clip_speeds: tuple[int, ...] = SPEEDS  # the transformer's clips: px a frame their shapes may move
    clip_bounce: bool = True  # False: only tracks that fit the frame, each shape moving its captioned way throughout
    clip_steady: bool = True  # False: each frame's move drawn from 0..2 * speed px (render_clip's `steady`)
    warmup_frames: int | None = None  # the first `warmup_steps` denoiser steps train on clips this long
    warmup_steps: int = 0
    # every image_every-th transformer step trains on image_batch_size single frames instead of clips (0: never):
    # images and videos trained together, the frames far cheaper per caption than clips
    image_every: int = 0
    image_batch_size: int = 32
    batch_size: int = 16
    lr: float = 3e-4
    caption_dropout: float = 0.1
    # caption tokens a step pads to, drawn per step: WanPipeline pads a prompt's states with zeros to its
    # max_sequence_length (512 unless a call names it), and a model trained at one length reads another badly
    caption_lengths: tuple[int, ...] = (MAX_SEQUENCE_LENGTH,)
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    max_minutes: float | None = None
    device: str | None = None
    num_workers: int = 0  # processes rendering the denoiser's clips ahead of the step

    def __post_init__(self):
        for name in ("vae_steps", "decoder_steps", "denoiser_steps", "image_every", "seed", "num_workers"):
            check_int_range(name, getattr(self, name), 0)
        for name in ("vae_batch_size", "batch_size", "image_batch_size", "checkpoint_every", "log_every"):
            check_int_range(name, getattr(self, name), 1)
        crop = check_int_range("vae_crop", self.vae_crop, 8, 64)
        if crop % 4:
            raise ValueError(f"vae_crop={crop} is not allowed: expected a multiple of 4 in [8, 64] (the VAE's 4x)")
        check_int_range("warmup_steps", self.warmup_steps, 0)
        check_choice("attention_heads", self.attention_heads, ATTENTION_HEADS)
        check_transformer_size(self.width, self.num_layers, self.ffn_dim)
        for name in ("vae_frames", "decoder_frames", "num_frames", "warmup_frames"):
            if name == "warmup_frames" and self.warmup_frames is None:
                continue
            frames = check_int_range(name, getattr(self, name), 1)
            if (frames - 1) % 4:
                raise ValueError(f"{name}={frames} is not allowed: expected 4k + 1 frames (the VAE's 4x in time)")
        check_bool("clip_bounce", self.clip_bounce)
        check_bool("clip_steady", self.clip_steady)
        for frames in {self.num_frames, self.warmup_frames or self.num_frames}:  # refused now, not at step 1
            self.clip_speeds = check_clip_motion(self.clip_speeds, self.clip_bounce, frames)
        check_number("vae_lr", self.vae_lr, 0, 1, low_open=True)
        check_number("decoder_lr", self.decoder_lr, 0, 1, low_open=True)
        check_number("lr", self.lr, 0, 1, low_open=True)
        check_number("timestep_shift", self.timestep_shift, 1, 100)
        check_number("object_weight", self.object_weight, 0, 1000)
        check_number("kl_weight", self.kl_weight, 0, 1)
        check_number("caption_dropout", self.caption_dropout, 0, 1)
        self.caption_lengths = check_caption_lengths(self.caption_lengths)
        check_number("ema_decay", self.ema_decay, 0, 0.999999)
        check_number("max_minutes", self.max_minutes, 0, 10**6, allow_none=True)
        if self.device is not None:
            check_str("device", self.device, max_length=100)
            parse_device(self.device)  # one this machine has


def check_caption_lengths(lengths) -> tuple[int, ...]:
    """`caption_lengths` as a tuple: one or more token counts in [MAX_SEQUENCE_LENGTH, 1024] (shorter would cut
    two-object captions; WanPipeline's default is 512)."""
    if not isinstance(lengths, (tuple, list)) or not lengths:
        raise refuse("caption_lengths", lengths, "one or more token counts")
    return tuple(check_int_range("caption_lengths", length, MAX_SEQUENCE_LENGTH, 1024) for length in lengths)


def clip_pixels(
    start: int, size: int, num_frames: int, speeds: tuple[int, ...] = SPEEDS, bounce: bool = True, steady: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """Clips start..start+size-1 of the seeded stream (`render_clip`'s `speeds`, `bounce` and `steady`): pixels
    uint8 [B, F, 64, 64, 3] and their captions."""
    clips = [render_clip(seed, num_frames, speeds=speeds, bounce=bounce, steady=steady)
             for seed in range(start, start + size)]  # fmt: skip
    pixels = np.stack([np.stack([np.asarray(f, dtype=np.uint8) for f in c.frames]) for c in clips])
    return torch.from_numpy(pixels), [c.caption for c in clips]


def pixels_to_video(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> video [B, 3, F, H, W] in [-1, 1] (float32), on the pixels' device."""
    return (pixels.float() / 127.5 - 1.0).permute(0, 4, 1, 2, 3)


def clip_batch(start: int, size: int, num_frames: int) -> tuple[torch.Tensor, list[str]]:
    """Clips start..start+size-1 of the seeded stream: video [B, 3, F, 64, 64] in [-1, 1] and their captions."""
    pixels, captions = clip_pixels(start, size, num_frames)
    return pixels_to_video(pixels), captions


class _DenoiserClips(torch.utils.data.Dataset):
    """Item `step`: everything random in denoiser step `step`, drawn from its own seeded generator, the same in a
    worker and in a resumed run: the clips' pixels (`clip_pixels`: uint8, a quarter of float32's bytes between
    processes), their captions' tokens (`tokenize_captions`; each caption dropped to "" with probability
    `caption_dropout`) and the flow-matching noise and noise levels (`flow_matching_noise`). Made here rather than
    in the step, the training process neither spends its time on them nor waits on the GPU to copy them (pinned,
    they go over asynchronously)."""

    def __init__(self, config: ShapesVideoTrainingConfig, tokenizer, latent_channels: int, space_factor: int,
                 time_factor: int):  # fmt: skip
        self.config, self.tokenizer, self.latent_channels = config, tokenizer, latent_channels
        self.space_factor, self.time_factor = space_factor, time_factor

    def __len__(self) -> int:
        return self.config.denoiser_steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        """(pixels uint8 [B, F, 64, 64, 3], token ids [B, L], attention mask [B, L], noise [B, C, F', h, w],
        sigma [B])."""
        config = self.config
        frames = config.warmup_frames if config.warmup_frames and step < config.warmup_steps else config.num_frames
        stream, count = DENOISER_STREAM, config.batch_size
        if is_image_step(config, step):  # single frames from a stream of their own; the clip steps are unchanged
            frames, stream, count = 1, IMAGE_STREAM, config.image_batch_size
        start = config.seed * 10**7 + stream + step * count
        pixels, captions = clip_pixels(start, count, frames, config.clip_speeds, config.clip_bounce,
                                       config.clip_steady)  # fmt: skip
        generator = torch.Generator().manual_seed(config.seed * 10**7 + DENOISER_STREAM + step)
        drop = (torch.rand(len(captions), generator=generator) < config.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        size = pixels.shape[2] // self.space_factor
        shape = (len(captions), self.latent_channels, (frames - 1) // self.time_factor + 1, size, size)
        noise, sigma = flow_matching_noise(shape, generator, config.timestep_shift)
        lengths = config.caption_lengths
        # drawn last, and only when there is a choice: the draws above stay those of runs without the option
        length = lengths[0]
        if len(lengths) > 1:
            length = lengths[int(torch.randint(len(lengths), (1,), generator=generator))]
        return pixels, *tokenize_captions(self.tokenizer, captions, length), noise, sigma


def is_image_step(config: ShapesVideoTrainingConfig, step: int) -> bool:
    """Whether transformer step `step` trains on single frames (the last step of every `image_every`)."""
    return config.image_every > 0 and step % config.image_every == config.image_every - 1


def tokenize_captions(tokenizer, captions: list[str], length: int = MAX_SEQUENCE_LENGTH) -> tuple[torch.Tensor, ...]:
    """As WanPipeline tokenizes prompts at max_sequence_length=`length`: token ids and attention mask, both
    [B, length]."""
    tokens = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
    return tokens.input_ids, tokens.attention_mask


def encode_tokens(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """As WanPipeline encodes prompts: UMT5 states of the caption's tokens, zeros past them. ids, mask: [B, L] on the
    text encoder's device -> [B, L, D]."""
    states = text_encoder(ids, mask).last_hidden_state
    return states * mask.unsqueeze(-1).to(states.dtype)


def encode_captions(tokenizer, text_encoder, captions: list[str], device: torch.device,
                    length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:  # fmt: skip
    """`tokenize_captions` then `encode_tokens`: [B, length, D]."""
    ids, mask = tokenize_captions(tokenizer, captions, length)
    return encode_tokens(text_encoder, ids.to(device), mask.to(device))


@torch.no_grad()
def latent_statistics(vae, config: ShapesVideoTrainingConfig, device: torch.device, batches: int = 4):
    """Per-channel mean and std of the autoencoder's latents (posterior modes) over clips no phase trains on."""
    first = config.seed * 10**7 + CALIBRATION_STREAM
    latents = [
        vae.encode(clip_batch(first + i * 4, 4, config.vae_frames)[0].to(device)).latent_dist.mode().float()
        for i in range(batches)
    ]
    flat = torch.cat(latents).transpose(0, 1).flatten(1)  # [C, everything]
    return flat.mean(1).tolist(), flat.std(1).clamp_min(1e-6).tolist()


def decode_unclamped(vae, latents: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan's decoding before its final clamp to [-1, 1]: [B, C, F', h, w] -> [B, 3, F, H, W].

    The clamp zeroes the gradient of every pixel decoded past the range; an autoencoder whose early steps overshoot
    white (most of a clip) then never learns the shapes. The decoder runs once per latent frame; a forward hook (public
    torch API) collects its outputs, which diffusers concatenates and clamps.
    """
    if vae.config.patch_size is not None:
        raise ValueError("decode_unclamped expects an AutoencoderKLWan without patch_size (Wan 2.1's layout)")
    chunks: list[torch.Tensor] = []
    hook = vae.decoder.register_forward_hook(lambda module, inputs, output: chunks.append(output))
    try:
        vae.decode(latents)
    finally:
        hook.remove()
    return torch.cat(chunks, dim=2)


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    """What the decoder phase trains: everything after the latents (post_quant_conv and the decoder)."""
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())


def _random_crop(video: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """One seeded size x size window of every clip of `video` [B, C, F, H, W] (the autoencoder is convolutional:
    windows teach it what whole frames do, at a fraction of the cost)."""
    height, width = video.shape[-2:]
    if size >= min(height, width):
        return video
    generator = torch.Generator().manual_seed(seed)
    top, left = (int(torch.randint(0, limit - size + 1, (1,), generator=generator)) for limit in (height, width))
    return video[..., top : top + size, left : left + size]


def object_weights(pixels: torch.Tensor, extra: float, time_factor: int, space_factor: int) -> torch.Tensor:
    """Per latent position, 1 + `extra` where an object (any pixel not near white) is in its frames and pixels or
    next to them, else 1: pixels uint8 [B, F, H, W, 3] (F = 1 + time_factor k) -> float32 [B, 1, F', h, w], the
    layout of a causal Wan VAE's latents (the first frame alone, then `time_factor` frames a latent frame)."""
    covered = (pixels < 240).any(-1).float()  # [B, F, H, W]
    batch, frames, height, width = covered.shape
    rest = covered[:, 1:].reshape(batch, (frames - 1) // time_factor, time_factor, height, width).amax(2)
    covered = torch.nn.functional.max_pool2d(torch.cat([covered[:, :1], rest], 1), space_factor)
    covered = torch.nn.functional.max_pool2d(covered, 3, stride=1, padding=1)  # and the positions beside it
    return (1.0 + extra * covered).unsqueeze(1)


def _normalised_latents(vae, video: torch.Tensor, normalisation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mean, std = normalisation
    return (vae.encode(video).latent_dist.mode() - mean) / std


def rotary_pairs(head_dim: int, theta: float = 10000.0) -> list[tuple[str, float]]:
    """(axis, frequency in rad a token) of each channel pair of a Wan attention head, in channel order.

    As diffusers' WanRotaryPosEmbed lays a head out: time, height, width, each axis's pairs from the fastest
    frequency down (theta ** (-2 i / axis_dim)), height and width 2 * (head_dim // 6) channels each.
    """
    spatial = 2 * (head_dim // 6)
    return [(axis, theta ** (-2 * i / dim))
            for axis, dim in (("t", head_dim - 2 * spatial), ("h", spatial), ("w", spatial))
            for i in range(dim // 2)]  # fmt: skip


def rotary_matched_channels(inner_dim: int, old_heads: int, new_heads: int) -> torch.Tensor:
    """Channel order for re-splitting Wan's query/key projections from `old_heads` to `new_heads` heads.

    new_channels = old_channels[order]: every channel pair keeps its rotary axis and, within the heads that merge
    (or split), the pairs are matched by frequency rank (fastest to fastest), so what a pair learnt about position
    lands on the nearest frequency of the new layout rather than on another axis. Pairs never leave the group of
    channels the merged (or split) heads share, so the value channels stay with their heads.
    """
    old_dim, new_dim = inner_dim // old_heads, inner_dim // new_heads
    group = max(old_dim, new_dim)
    order: list[int] = []
    for start in range(0, inner_dim, group):
        olds, news = (
            [(axis, freq, start + head * dim + 2 * j)
             for head in range(group // dim) for j, (axis, freq) in enumerate(rotary_pairs(dim))]
            for dim in (old_dim, new_dim)
        )  # fmt: skip
        source = {}
        for axis in ("t", "h", "w"):
            by_rank = [
                sorted((p for p in pairs if p[0] == axis), key=lambda p: (-p[1], p[2])) for pairs in (olds, news)
            ]
            source.update({new[2]: old[2] for old, new in zip(*by_rank, strict=True)})
        for channel in range(start, start + group, 2):
            order += [source[channel], source[channel] + 1]
    return torch.tensor(order)


def resplit_attention_heads(state: dict[str, torch.Tensor], inner_dim: int, old_heads: int, new_heads: int):
    """A Wan transformer's state dict re-split from `old_heads` to `new_heads` heads (the same weight shapes).

    Self-attention's query/key channels are reordered so that each keeps its rotary axis and nearest frequency
    (`rotary_matched_channels`), and every query/key norm weight is scaled by (new_dim / old_dim) ** 0.25, which is
    (old_heads / new_heads) ** 0.25, so that q.k / sqrt(head_dim) keeps its scale per channel. Heads that merge share
    one softmax, so this is a start close to the old model, not the same model.
    """
    order = rotary_matched_channels(inner_dim, old_heads, new_heads)
    scale = (old_heads / new_heads) ** 0.25
    out = {}
    for key, value in state.items():
        module = key.split(".")[-2] if "." in key else ""
        if ".attn1." in key and module in ("to_q", "to_k", "norm_q", "norm_k"):
            value = value[order]
        if ".attn" in key and module in ("norm_q", "norm_k"):
            value = value * scale
        out[key] = value
    return out


# The fields a run cannot change once it has a checkpoint: its command-line flag, and the value a checkpoint saved
# before the field existed was trained with.
ARCHITECTURE_FIELDS = {
    "attention_heads": ("--attention-heads", DEFAULT_ATTENTION_HEADS),
    "width": ("--width", INNER_DIM),
    "num_layers": ("--layers", NUM_LAYERS),
    "ffn_dim": ("--ffn-dim", FFN_DIM),
}


def transformer_size(config) -> dict[str, int]:
    """A WanTransformer3DModel config's size as the trainer's fields name it: width, num_layers, ffn_dim."""
    return {"width": config.num_attention_heads * config.attention_head_dim, "num_layers": config.num_layers,
            "ffn_dim": config.ffn_dim}  # fmt: skip


def fp16_megabytes(pipe) -> float:
    """What the exported pipeline's weights weigh in fp16 (MiB): the transformer, text encoder and autoencoder."""
    models = (pipe.transformer, pipe.text_encoder, pipe.vae)
    return sum(p.numel() for m in models for p in m.parameters()) * 2 / 2**20


def _load_exported(pipe, folder: Path, vae_only: bool = False) -> dict[str, Any]:
    """Weights of an exported pipeline folder (safetensors only) into `pipe`; returns its step counters.

    vae_only: the trained, calibrated autoencoder alone; the transformer and text encoder keep their fresh weights
    and the denoiser's step counter starts at 0 (a new denoiser on a finished autoencoder).
    """
    from diffusers import DiffusionPipeline

    exported = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, **{dtype_keyword(): torch.float32})
    pipe.vae.load_state_dict(exported.vae.state_dict())
    calibration = {"latents_mean": list(exported.vae.config.latents_mean),
                   "latents_std": list(exported.vae.config.latents_std)}  # fmt: skip
    pipe.vae.register_to_config(**calibration)
    state = json.loads((folder / "training_state.json").read_text())
    if vae_only:
        if not state.get("calibrated"):
            raise ValueError(f"init_from={str(folder)!r} is not allowed with vae_only: its autoencoder is not "
                             "calibrated (train it to the end first)")  # fmt: skip
        return {"vae_step": state["vae_step"], "decoder_step": state.get("decoder_step", 0), "denoiser_step": 0,
                "calibrated": True, **calibration}  # fmt: skip
    theirs, ours = transformer_size(exported.transformer.config), transformer_size(pipe.transformer.config)
    for name in ours:
        if theirs[name] != ours[name]:
            raise ValueError(f"{name}={ours[name]} is not allowed with init_from={str(folder)!r}: its transformer has "
                             f"{name}={theirs[name]} (pass that, or init_vae_only to train a new transformer on its "
                             "autoencoder)")  # fmt: skip
    pipe.text_encoder.load_state_dict(exported.text_encoder.state_dict())
    transformer = exported.transformer.state_dict()
    heads = (exported.transformer.config.num_attention_heads, pipe.transformer.config.num_attention_heads)
    if heads[0] != heads[1]:
        # Same weight shapes (the attention is only split differently), but merged or split heads attend
        # differently, so the transformer starts from related weights rather than a trained model.
        logger.warning("%s has %d attention heads, this run %d: its weights are re-split into %d heads",
                       folder, heads[0], heads[1], heads[1])  # fmt: skip
        transformer = resplit_attention_heads(transformer, ours["width"], *heads)
    pipe.transformer.load_state_dict(transformer)
    counters = {k: state[k] for k in ("vae_step", "decoder_step", "denoiser_step", "calibrated") if k in state}
    # The calibration travels with the state: the run's checkpoints and its own export need it to resume.
    return {**counters, **calibration} if counters.get("calibrated") else counters


def _load_decoder(pipe, folder: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The decoder side of an exported pipeline folder's autoencoder (post_quant_conv and the decoder) into `pipe`;
    returns its decoder step counter.

    Only a decoder trained on the same latents is taken: the folder's encoder, quant_conv and latent calibration must
    equal those `pipe` (and `state`) hold, since the transformer learnt those latents.
    """
    from diffusers import AutoencoderKLWan

    exported = AutoencoderKLWan.from_pretrained(
        folder / "vae", use_safetensors=True, **{dtype_keyword(): torch.float32}
    )
    source = exported.state_dict()
    for name, value in pipe.vae.state_dict().items():
        if name.split(".")[0] in ("encoder", "quant_conv") and not torch.equal(source[name].to(value), value):
            raise ValueError(f"init_decoder_from={str(folder)!r} is not allowed: its encoder differs from this run's "
                             f"({name}); a decoder is taken only from an autoencoder with the same "
                             "encoder")  # fmt: skip
    for key in ("latents_mean", "latents_std"):
        if not state.get("calibrated") or list(exported.config[key]) != list(state[key]):
            raise ValueError(f"init_decoder_from={str(folder)!r} is not allowed: its {key} differs from this run's "
                             "(or this run is not calibrated yet); a decoder is taken only for the same "
                             "latents")  # fmt: skip
    pipe.vae.post_quant_conv.load_state_dict(exported.post_quant_conv.state_dict())
    pipe.vae.decoder.load_state_dict(exported.decoder.state_dict())
    saved = json.loads((folder / "training_state.json").read_text())
    return {"decoder_step": saved.get("decoder_step", 0)}


def train_shapes_video(
    out: Path,
    config: ShapesVideoTrainingConfig | None = None,
    *,
    resume: bool = True,
    init_from: Path | None = None,
    init_vae_only: bool = False,
    init_decoder_from: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the phases and export the pipeline. Returns the final state (steps and last losses).

    init_from: an exported pipeline folder to continue from when `out` has no checkpoint (all of it, or with
    init_vae_only its autoencoder alone: a fresh transformer and text encoder trained on it).
    init_decoder_from: with init_from, another exported folder whose decoder (and decoder step) replaces
    init_from's; its encoder and calibration must be init_from's (e.g. a decoder trained on longer clips, joined
    to a transformer trained elsewhere on the same latents).
    """
    config = config or ShapesVideoTrainingConfig()
    if init_vae_only and init_from is None:
        raise ValueError("init_vae_only=True is not allowed without init_from (the folder whose autoencoder to take)")
    if init_decoder_from is not None and init_from is None:
        raise ValueError("init_decoder_from is not allowed without init_from (the folder whose encoder its decoder "
                         "must match)")  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if config.max_minutes is None else time.monotonic() + 60 * config.max_minutes
    device = torch.device(config.device or default_device())
    pipe = build_shapes_wan(config.seed, config.attention_heads, config.width, config.num_layers, config.ffn_dim)
    megabytes = fp16_megabytes(pipe)
    if megabytes > MAX_PRESET_MB:
        raise ValueError(f"width={config.width}, num_layers={config.num_layers}, ffn_dim={config.ffn_dim} is not "
                         f"allowed: the exported pipeline would hold {megabytes:.1f} MB of fp16 weights, over the "
                         f"{MAX_PRESET_MB} MB a shapes-wan preset may weigh")  # fmt: skip
    pipe = pipe.to(device)
    vae, transformer, text_encoder, tokenizer = pipe.vae, pipe.transformer, pipe.text_encoder, pipe.tokenizer
    denoiser_params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizers = {
        "vae": torch.optim.AdamW(vae.parameters(), lr=config.vae_lr),
        "decoder": torch.optim.AdamW(decoder_parameters(vae), lr=config.decoder_lr),
        "denoiser": torch.optim.AdamW(denoiser_params, lr=config.lr),
    }
    state: dict[str, Any] = {"vae_step": 0, "decoder_step": 0, "denoiser_step": 0, "calibrated": False,
                             "config": asdict(config)}  # fmt: skip
    checkpoint = out / "checkpoint.pt"
    ema = None
    if resume and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, device)
        saved_config = saved["state"].get("config", {})
        for name, (flag, before) in ARCHITECTURE_FIELDS.items():
            trained = saved_config.get(name, before)
            if trained != getattr(config, name):
                raise ValueError(f"{name}={getattr(config, name)} is not allowed for {checkpoint}: its run trains "
                                 f"{trained} (pass {flag} {trained}, or --fresh)")  # fmt: skip
        for name in ("vae", "transformer", "text_encoder"):
            getattr(pipe, name).load_state_dict(saved["models"][name])
        for name, opt_state in saved["optimizers"].items():
            load_optimizer(optimizers[name], opt_state)
        state.update({k: v for k, v in saved["state"].items() if k != "config"})
        if state.get("calibrated"):
            vae.register_to_config(
                latents_mean=saved["state"]["latents_mean"], latents_std=saved["state"]["latents_std"]
            )
        ema = saved.get("ema")
        logger.info("resumed from %s at vae step %d, denoiser step %d", checkpoint, state["vae_step"],
                    state["denoiser_step"])  # fmt: skip
    elif init_from is not None:
        state.update(_load_exported(pipe, Path(init_from), init_vae_only))
        if init_decoder_from is not None:
            state.update(_load_decoder(pipe, Path(init_decoder_from), state))
    if config.ema_decay > 0 and ema is None:
        ema = [p.detach().clone() for p in denoiser_params]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    log = _LossLog(open(out / "train_log.jsonl", "a" if resume else "w"), config.log_every)  # --fresh: a new log

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def save() -> None:
        log.flush()
        models = {n: getattr(pipe, n) for n in ("vae", "transformer", "text_encoder")}
        save_checkpoint(checkpoint, models, optimizers, state, ema)

    def autoencoder_step(phase: str, step: int, loss: torch.Tensor) -> None:
        """The optimizer step of phase "vae" or "decoder", its counter, its log line and its checkpoint."""
        optimizers[phase].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[phase].step()
        state[f"{phase}_step"] = step + 1
        log.add(phase, step, loss)
        if state[f"{phase}_step"] % config.checkpoint_every == 0:
            save()

    base = config.seed * 10**7
    vae.train()
    while state["vae_step"] < config.vae_steps and not out_of_time():
        step = state["vae_step"]
        video, _ = clip_batch(base + VAE_STREAM + step * config.vae_batch_size, config.vae_batch_size,
                              config.vae_frames)  # fmt: skip
        video = _random_crop(video, config.vae_crop, base + VAE_STREAM + step).to(device)
        with autocast:
            posterior = vae.encode(video).latent_dist
            reconstruction = decode_unclamped(vae, posterior.sample(generator=None))
        loss = torch.nn.functional.mse_loss(reconstruction.float(), video) + config.kl_weight * posterior.kl().mean()
        autoencoder_step("vae", step, loss)
    vae.eval()
    vae.requires_grad_(False)
    if state["vae_step"] >= config.vae_steps and not state["calibrated"]:
        mean, std = latent_statistics(vae, config, device)
        vae.register_to_config(latents_mean=mean, latents_std=std)
        state.update(calibrated=True, latents_mean=mean, latents_std=std)
    if state["calibrated"] and state["decoder_step"] < config.decoder_steps:
        for p in decoder_parameters(vae):
            p.requires_grad_(True)
        vae.decoder.train()
    while state["calibrated"] and state["decoder_step"] < config.decoder_steps and not out_of_time():
        step = state["decoder_step"]
        video, _ = clip_batch(base + DECODER_STREAM + step * config.vae_batch_size, config.vae_batch_size,
                              config.decoder_frames)  # fmt: skip
        video = _random_crop(video, config.vae_crop, base + DECODER_STREAM + step).to(device)
        generator = torch.Generator().manual_seed(base + DECODER_STREAM + step)
        with autocast:
            with torch.no_grad():
                latents = vae.encode(video).latent_dist.sample(generator=generator)
            reconstruction = decode_unclamped(vae, latents)
        autoencoder_step("decoder", step, torch.nn.functional.mse_loss(reconstruction.float(), video))
    vae.eval()
    vae.requires_grad_(False)
    transformer.train()
    text_encoder.train()
    vae_config = vae.config
    steps = _DenoiserClips(config, tokenizer, vae_config.z_dim, vae_config.scale_factor_spatial,
                           vae_config.scale_factor_temporal)  # fmt: skip
    clips = iter(_steps(steps, state["denoiser_step"], config, device) if state["calibrated"] else ())
    normalisation = latent_normalisation(vae, device, torch.float32) if state["calibrated"] else None
    while state["calibrated"] and state["denoiser_step"] < config.denoiser_steps and not out_of_time():
        step = state["denoiser_step"]
        # no blocking copy in the step: its inputs come pinned and go over asynchronously
        pixels, ids, mask, noise, sigma = (t.to(device, non_blocking=True) for t in next(clips))
        with torch.no_grad():
            latents = _normalised_latents(vae, pixels_to_video(pixels), normalisation)
            weight = None
            if config.object_weight:
                weight = object_weights(pixels, config.object_weight, vae_config.scale_factor_temporal,
                                        vae_config.scale_factor_spatial)  # fmt: skip
        with autocast:
            embeds = encode_tokens(text_encoder, ids, mask)
            loss = flow_matching_loss(transformer, latents, embeds, noise, sigma, weight)
        optimizers["denoiser"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["denoiser"].step()
        if ema is not None:
            _ema_update(ema, denoiser_params, config.ema_decay, step)
        state["denoiser_step"] = step + 1
        log.add("denoiser-images" if is_image_step(config, step) else "denoiser", step, loss)  # a curve each
        if state["denoiser_step"] % config.checkpoint_every == 0:
            save()
    save()
    if state["calibrated"]:
        export_pipeline(
            pipe, out / "pipeline", {k: v for k, v in state.items() if k != "config"}, ema, denoiser_params
        )
    log.file.close()
    return state
