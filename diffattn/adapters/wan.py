"""Wan 2.1 / 2.2 (T2V, I2V): `WanTransformer3DModel` with `WanAttention` modules.

`blocks.N.attn1` is self-attention over the video tokens only, laid out frame by frame in raster order
(`[B, F*H*W, C]` after a (1, 2, 2) patch embedding); `blocks.N.attn2` is cross-attention to the text (and, for I2V,
image) tokens. Rotary embeddings are applied to q and k inside the processor.
"""

from __future__ import annotations

import torch

from .base import AttentionLayer, LatentGeometry, ModelAdapter


class WanAdapter(ModelAdapter):
    family = "wan"
    model_class_names = ("WanTransformer3DModel", "WanVACETransformer3DModel")

    def attention_layers(self) -> list[AttentionLayer]:
        def classify(path: str, module: torch.nn.Module):
            if path.endswith("attn1"):
                return "self", "blocks"
            if path.endswith("attn2"):
                return "cross", "blocks"
            return None

        return self._layers_by_kind(classify)

    def geometry(self, sample: torch.Tensor) -> LatentGeometry:
        # sample: [B, C, F, H, W] latents; patch_size (t, h, w) divides them into tokens.
        if sample.ndim != 5:
            raise ValueError(f"Wan transformer sample must be [B, C, F, H, W], got shape {tuple(sample.shape)}")
        pt, ph, pw = self.model.config.patch_size
        batch, _, frames, height, width = sample.shape
        return LatentGeometry(batch, frames // pt, height // ph, width // pw)
