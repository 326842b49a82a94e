"""The Stable Diffusion 1.5 architecture with seeded random weights, for benchmarks that need real sizes offline.

The configs are SD 1.5's (UNet 860M, VAE with four 128-512 channel levels, CLIP ViT-L/14 text encoder with 12
layers of 768); the tokenizer is diffattn's local CLIP tokenizer (a smaller vocabulary: only the embedding table
is smaller than the real one). Compute time and memory therefore match the real model; the images do not.
"""

from __future__ import annotations

import torch


def sd15_unet(device: str = "cpu", **overrides):
    from diffusers import UNet2DConditionModel

    # UNet2DConditionModel's defaults are SD 1.x's blocks, channels and layers
    config = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
    config.update(overrides)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs (a CPU init of 860M parameters is slow)
        return UNet2DConditionModel(**config)


def sd15_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32, **unet_overrides):
    """A StableDiffusionPipeline with SD 1.5's architecture and random weights, on `device` in `dtype`."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel

    from diffattn.presets.image import clip_text_config, stable_diffusion_pipeline
    from diffattn.presets.text_tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    unet = sd15_unet(device, **unet_overrides)
    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        # CLIP ViT-L/14's text tower
        config = clip_text_config(tokenizer, 768, layers=12, heads=12, intermediate_size=3072)
        text_encoder = CLIPTextModel(config)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
        set_alpha_to_one=False,
    )  # fmt: skip
    return stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler).to(device, dtype)
