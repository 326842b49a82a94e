"""Mochi: `MochiTransformer3DModel` with `MochiAttention` and asymmetric joint attention.

`transformer_blocks.N.attn1` projects video and text with separate weights and attends over [video | valid text]
(video first, frame by frame, raster order; rotary on the video part). Text padding is dropped per sample and
the padded text positions get zero output. The sample is `[B, C, F, H, W]` with `patch_size` square patches.
"""

from __future__ import annotations

import torch

from .base import AttentionLayer, LatentGeometry, ModelAdapter, project_heads, sdpa_bnhd


class MochiAdapter(ModelAdapter):
    family = "mochi"
    model_class_names = ("MochiTransformer3DModel",)
    plain_processor_names = ("MochiAttnProcessor2_0",)

    def attention_layers(self) -> list[AttentionLayer]:
        def classify(path: str, module: torch.nn.Module):
            return ("joint", "blocks") if path.endswith("attn1") else None

        return self._layers_by_kind(classify)

    def context_parallel_support(self) -> tuple[dict, dict[str, type]]:
        return mochi_cp_plan(), {"joint": UlyssesMochiProcessor}

    def geometry(self, sample: torch.Tensor) -> LatentGeometry:
        if sample.ndim != 5:
            raise ValueError(f"Mochi sample must be [B, C, F, H, W], got shape {tuple(sample.shape)}")
        p = self.model.config.patch_size
        batch, _, frames, height, width = sample.shape
        return LatentGeometry(batch, frames, height // p, width // p)


def _mochi_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding on x: [B, N, H, D] (interleaved pairs, computed in fp32)."""
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiJointAttnProcessor:
    """The computation of diffusers' `MochiAttnProcessor2_0`, with `attend` overridable.

    `attend(attn, q, k, v, num_video, key_mask)` gets q, k, v: [B, N, H, D] over [video | text] and key_mask: bool
    [B, N] (False for text padding); it returns [B, N, H, D]. The padded text positions' outputs are then zeroed, as
    Mochi does, whatever `attend` computed there.
    """

    def attend(self, attn, query, key, value, num_video: int, key_mask: torch.Tensor) -> torch.Tensor:
        return sdpa_bnhd(query, key, value, key_mask)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        num_video, num_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        query, key, value = project_heads(attn, hidden_states, "to_q", "to_k", "to_v", "norm_q", "norm_k")
        enc_query, enc_key, enc_value = project_heads(
            attn, encoder_hidden_states, "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"
        )
        if image_rotary_emb is not None:
            query = _mochi_rotary(query, *image_rotary_emb)
            key = _mochi_rotary(key, *image_rotary_emb)
        video_valid = torch.ones(hidden_states.shape[0], num_video, dtype=torch.bool, device=hidden_states.device)
        key_mask = torch.cat([video_valid, attention_mask.bool()], dim=1)
        out = self.attend(
            attn,
            torch.cat([query, enc_query], 1),
            torch.cat([key, enc_key], 1),
            torch.cat([value, enc_value], 1),
            num_video,
            key_mask,
        )
        out = (out * key_mask[:, :, None, None].to(out.dtype)).flatten(2, 3)
        hidden_states, encoder_hidden_states = out.split_with_sizes((num_video, num_text), dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def mochi_cp_plan() -> dict:
    """A context-parallel plan for Mochi (diffusers has none): the video tokens are split across ranks at the first
    block, with their rotary embeddings (the `rope` module's output); the text stays whole on every rank (its padding
    mask is per caption, not per shard); the output is gathered at `proj_out`. Its attention layers must run
    `UlyssesMochiProcessor` (or radial attention over it).
    """
    from .ulysses import video_shard_plan

    return video_shard_plan("rope", None, rotary_dims=3)


class UlyssesMochiProcessor(MochiJointAttnProcessor):
    """Mochi's attention under Ulysses context parallelism with `mochi_cp_plan` (each rank: its video shard, then the
    whole text; see `ulysses.ulysses_joint_attention`); without a parallel config, the plain one."""

    _parallel_config = None  # set by `enable_parallelism`, or by whoever installs this processor afterwards

    def attend(self, attn, query, key, value, num_video: int, key_mask: torch.Tensor) -> torch.Tensor:
        from .ulysses import sdpa_joint, ulysses_group, ulysses_joint_attention

        group = ulysses_group(self._parallel_config)
        if group is None:
            return super().attend(attn, query, key, value, num_video, key_mask)
        return ulysses_joint_attention(
            query, key, value, slice(0, num_video), group, sdpa_joint, key_mask[:, num_video:]
        )
