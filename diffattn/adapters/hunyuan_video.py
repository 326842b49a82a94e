"""HunyuanVideo: `HunyuanVideoTransformer3DModel` with legacy `Attention` modules and joint attention.

Dual-stream blocks (`transformer_blocks.N.attn`) and single-stream blocks (`single_transformer_blocks.N.attn`)
attend over one sequence: the video tokens first (frame by frame, raster order), the text tokens at the end.
The token refiner's attention (`context_embedder...`) sees text only and is not listed.
"""

from __future__ import annotations

import torch

from .base import AttentionLayer, LatentGeometry, ModelAdapter


class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan-video"
    model_class_names = ("HunyuanVideoTransformer3DModel",)

    def attention_layers(self) -> list[AttentionLayer]:
        def classify(path: str, module: torch.nn.Module):
            if path.startswith("transformer_blocks."):
                return "joint", "double"
            if path.startswith("single_transformer_blocks."):
                return "joint", "single"
            return None

        return self._layers_by_kind(classify)

    def geometry(self, sample: torch.Tensor) -> LatentGeometry:
        # sample: [B, C, F, H, W] latents; patch_size_t over frames, patch_size over height and width.
        if sample.ndim != 5:
            raise ValueError(f"HunyuanVideo sample must be [B, C, F, H, W], got shape {tuple(sample.shape)}")
        config = self.model.config
        batch, _, frames, height, width = sample.shape
        return LatentGeometry(
            batch, frames // config.patch_size_t, height // config.patch_size, width // config.patch_size
        )
