"""Stable Diffusion 1.x / 2.x / SDXL: `UNet2DConditionModel` with diffusers' legacy `Attention` modules.

Each transformer block has `attn1` (self-attention over the latent pixels of its level) and `attn2` (cross-attention
to the 77 text tokens). Tokens are the level's pixels in raster order: `hidden_states: [B, h*w, C]`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import AttentionLayer, LatentGeometry, ModelAdapter


class UNetAdapter(ModelAdapter):
    family = "stable-diffusion-unet"
    model_class_names = ("UNet2DConditionModel",)
    sample_argument = "sample"

    def attention_layers(self) -> list[AttentionLayer]:
        return self._self_and_cross_layers(
            lambda path: "down" if path.startswith("down_blocks") else "mid" if path.startswith("mid_block") else "up"
        )

    def level_factor(self, layer: AttentionLayer) -> int:
        """How many times the latent is downsampled at `layer`'s level (1, 2, 4, ...)."""
        num_down = len(self.model.down_blocks)
        parts = layer.key.split(".")
        if parts[0] == "down_blocks":
            return 2 ** int(parts[1])
        if parts[0] == "mid_block":
            return 2 ** (num_down - 1)
        return 2 ** (len(self.model.up_blocks) - 1 - int(parts[1]))

    def sample_size(self) -> tuple[int, int]:
        """(h, w) of the latent at the model's default size (config.sample_size, an int or a pair)."""
        size = self.model.config.sample_size
        return (size, size) if isinstance(size, int) else (size[0], size[1])

    def level_size(self, layer: AttentionLayer) -> tuple[int, int]:
        """(h, w) in tokens of `layer`'s level at the model's default size (stride-2 downsampling rounds up)."""
        factor, (h, w) = self.level_factor(layer), self.sample_size()
        return math.ceil(h / factor), math.ceil(w / factor)

    def geometry(self, sample: torch.Tensor) -> LatentGeometry:
        # sample: [B, C, H, W] latents; the first attention level sees them unpatched.
        if sample.ndim != 4:
            raise ValueError(f"UNet2DConditionModel sample must be [B, C, H, W], got shape {tuple(sample.shape)}")
        batch, _, height, width = sample.shape
        return LatentGeometry(batch, 1, height, width)


class UNetAttnProcessor:
    """The computation of diffusers' `AttnProcessor2_0`, with the attention step as an overridable method.

    Subclasses override `attend` (q, k, v: [B, H, N, D]) to record or change attention; everything around it
    (norms, projections, masks, residual) stays as diffusers does it, so the processor drops into any SD UNet.
    """

    def value_states(self, attn: torch.nn.Module, context: torch.Tensor) -> torch.Tensor:
        """The states the values are projected from: [B, Nk, C] (the keys' context unless a method changes it)."""
        return context

    def attend(
        self,
        attn: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_cross: bool,
    ) -> torch.Tensor:
        """Attention proper. query: [B, H, Nq, D]; key, value: [B, H, Nk, D] -> [B, H, Nq, D]."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(self.value_states(attn, context))

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(attn, query, key, value, attention_mask, is_cross)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
