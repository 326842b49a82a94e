"""Wan 2.1 / 2.2 (T2V, I2V) and VACE: `WanTransformer3DModel` / `WanVACETransformer3DModel` with `WanAttention`.

`blocks.N.attn1` is self-attention over the video tokens only, laid out frame by frame in raster order
(`[B, F*H*W, C]` after a (1, 2, 2) patch embedding); `blocks.N.attn2` is cross-attention to the text (and, for I2V,
image) tokens. Rotary embeddings are applied to q and k inside the processor. VACE's control branch
(`vace_blocks.N`) has the same two attentions over the same video tokens, so it is handled the same way.
"""

from __future__ import annotations

import torch

from .base import AttentionLayer, LatentGeometry, ModelAdapter, sdpa_bnhd


class WanAdapter(ModelAdapter):
    family = "wan"
    model_class_names = ("WanTransformer3DModel", "WanVACETransformer3DModel")
    plain_processor_names = ("WanAttnProcessor", "WanAttnProcessor2_0")

    def attention_layers(self) -> list[AttentionLayer]:
        return self._self_and_cross_layers()

    def geometry(self, sample: torch.Tensor) -> LatentGeometry:
        # sample: [B, C, F, H, W] latents; patch_size (t, h, w) divides them into tokens.
        if sample.ndim != 5:
            raise ValueError(f"Wan transformer sample must be [B, C, F, H, W], got shape {tuple(sample.shape)}")
        pt, ph, pw = self.model.config.patch_size
        batch, _, frames, height, width = sample.shape
        return LatentGeometry(batch, frames // pt, height // ph, width // pw)


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on x: [B, N, H, D] (interleaved pairs), as diffusers' WanAttnProcessor applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttnProcessor:
    """The self-attention (`attn1`) computation of diffusers' `WanAttnProcessor`, with `attend` overridable.

    Projections (fused or not), RMS q/k norms, rotary embeddings and the output projection are Wan's; `attend`
    receives q, k, v: [B, N, H, D] for the video tokens (frame-major) and returns [B, N, H, D].
    """

    def attend(self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        return sdpa_bnhd(query, key, value)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{type(self).__name__} is for Wan self-attention (attn1) without a mask")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        hidden_states = self.attend(attn, query, key, value).flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
