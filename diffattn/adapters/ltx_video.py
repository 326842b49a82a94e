"""LTX-Video: `LTXVideoTransformer3DModel` with `LTXAttention` modules.

`transformer_blocks.N.attn1` is self-attention over the video tokens only (frame by frame, raster order);
`attn2` is cross-attention to the T5 text tokens. The denoiser gets packed tokens `[B, N, C]` plus the latent
`num_frames`, `height` and `width` as forward arguments, from which the geometry is read.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import AttentionLayer, LatentGeometry, ModelAdapter, sdpa_bnhd


class LTXVideoAdapter(ModelAdapter):
    family = "ltx-video"
    model_class_names = ("LTXVideoTransformer3DModel",)
    plain_processor_names = ("LTXVideoAttnProcessor", "LTXVideoAttentionProcessor2_0")

    def attention_layers(self) -> list[AttentionLayer]:
        return self._self_and_cross_layers()

    def context_parallel_support(self) -> tuple[None, dict[str, type]]:
        # diffusers' own plan; its text-masked cross-attention fails under Ulysses, so attn2 gets diffattn's
        return None, {"cross": UlyssesLTXCrossAttnProcessor}

    def geometry_from_call(self, args: tuple, kwargs: dict[str, Any]) -> LatentGeometry:
        sample = self.sample_from_call(args, kwargs)
        missing = [k for k in ("num_frames", "height", "width") if kwargs.get(k) is None]
        if missing:
            raise ValueError(f"LTXVideoTransformer3DModel.forward needs {missing} as keywords for diffattn")
        config = self.model.config
        frames = kwargs["num_frames"] // config.patch_size_t
        height, width = kwargs["height"] // config.patch_size, kwargs["width"] // config.patch_size
        if frames * height * width != sample.shape[1]:
            raise ValueError(f"{frames}x{height}x{width} tokens do not match the sample's {sample.shape[1]}")
        return LatentGeometry(sample.shape[0], frames, height, width)


class LTXVideoSelfAttnProcessor:
    """The self-attention (`attn1`) computation of diffusers' `LTXVideoAttnProcessor`, `attend` overridable.

    `attend(attn, q, k, v)` gets q, k, v: [B, N, H, D] (q/k RMS-normed, rotary applied) and returns [B, N, H, D].
    """

    def attend(self, attn, query, key, value) -> torch.Tensor:
        return sdpa_bnhd(query, key, value)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{type(self).__name__} is for LTX self-attention (attn1) without a mask")
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        hidden_states = self.attend(attn, query, key, value).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class UlyssesLTXCrossAttnProcessor:
    """LTX-Video's cross-attention (`attn2`, video queries, text keys with the padding bias) under diffusers' own LTX
    plan with Ulysses, where each rank holds 1/P of the video tokens and 1/P of the text tokens and of their bias.

    diffusers 0.42's processor slices the queries' heads for the exchange but not the bias, which it also keeps at
    this rank's 1/P of the text (a broadcast error, so LTX under context parallelism fails whenever the pipeline
    passes its text mask). Here q, k and v are exchanged for all tokens of H/P heads, the bias is gathered whole,
    and the output goes back to token shards. Without a parallel config it computes what diffusers' does.
    """

    _parallel_config = None  # set by `enable_parallelism`, or by whoever installs this processor afterwards

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from .ulysses import all_to_all, check_heads, ulysses_group

        if encoder_hidden_states is None or image_rotary_emb is not None:
            raise ValueError(f"{type(self).__name__} is for LTX cross-attention (attn2): text keys, no rotary")
        batch = hidden_states.shape[0]
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, N, H, D]
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))  # [B, T, H, D]
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        bias = None if attention_mask is None else attention_mask.reshape(batch, -1)  # [B, T] additive, per key
        group = ulysses_group(self._parallel_config)
        if group is not None:
            import torch.distributed as dist

            check_heads(attn.heads, group)
            query, key, value = (all_to_all(t.contiguous(), group, scatter_heads=True) for t in (query, key, value))
            if bias is not None:  # token shards in rank order, as the plan split them
                parts = [torch.empty_like(bias) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, bias.contiguous(), group=group)
                bias = torch.cat(parts, dim=1)
        mask = None if bias is None else bias[:, None, None, :].to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        if group is not None:
            out = all_to_all(out.contiguous(), group, scatter_heads=False)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
