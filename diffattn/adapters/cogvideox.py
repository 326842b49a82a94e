"""CogVideoX (1.0 and 1.5): `CogVideoXTransformer3DModel` with legacy `Attention` and joint attention.

`transformer_blocks.N.attn1` attends over one sequence: the text tokens first (226 for the released models), then
the video tokens frame by frame in raster order, with rotary embeddings on the video part only. The denoiser's
sample is `[B, F, C, H, W]` (frames before channels); patches are `patch_size` square and `patch_size_t` frames.
"""

from __future__ import annotations

import torch

from .base import AttentionLayer, LatentGeometry, ModelAdapter, project_heads, sdpa_bnhd


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    model_class_names = ("CogVideoXTransformer3DModel",)
    plain_processor_names = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")

    def attention_layers(self) -> list[AttentionLayer]:
        def classify(path: str, module: torch.nn.Module):
            return ("joint", "blocks") if path.endswith("attn1") else None

        return self._layers_by_kind(classify)

    def context_parallel_support(self) -> tuple[dict, dict[str, type]]:
        return cogvideox_cp_plan(), {"joint": UlyssesCogVideoXProcessor}

    def geometry(self, sample: torch.Tensor) -> LatentGeometry:
        if sample.ndim != 5:
            raise ValueError(f"CogVideoX sample must be [B, F, C, H, W], got shape {tuple(sample.shape)}")
        config = self.model.config
        pt = config.patch_size_t or 1
        batch, frames, _, height, width = sample.shape
        return LatentGeometry(batch, frames // pt, height // config.patch_size, width // config.patch_size)


class CogVideoXJointAttnProcessor:
    """The computation of diffusers' `CogVideoXAttnProcessor2_0`, with `attend` overridable.

    `attend(attn, q, k, v, num_text)` gets q, k, v: [B, N, H, D] over [text | video] tokens (rotary applied to the
    video part) and returns [B, N, H, D].
    """

    def attend(self, attn, query, key, value, num_text: int) -> torch.Tensor:
        return sdpa_bnhd(query, key, value)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} does not take an attention mask (CogVideoX passes none)")
        num_text = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = project_heads(attn, hidden_states, "to_q", "to_k", "to_v", "norm_q", "norm_k")
        if image_rotary_emb is not None:
            query = torch.cat(
                [query[:, :num_text], apply_rotary_emb(query[:, num_text:], image_rotary_emb, sequence_dim=1)], 1
            )
            if not attn.is_cross_attention:
                key = torch.cat(
                    [key[:, :num_text], apply_rotary_emb(key[:, num_text:], image_rotary_emb, sequence_dim=1)], 1
                )
        hidden_states = self.attend(attn, query, key, value, num_text).flatten(2, 3)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [num_text, hidden_states.shape[1] - num_text], dim=1
        )
        return hidden_states, encoder_hidden_states


def cogvideox_cp_plan() -> dict:
    """A context-parallel plan for CogVideoX (diffusers has none): the video tokens are split across ranks at the
    first block, with their rotary embeddings (passed to the transformer as `image_rotary_emb`); the text tokens,
    which come first in every attention, stay whole on every rank; the output is gathered at `proj_out`. Its
    attention layers must run `UlyssesCogVideoXProcessor` (or radial attention over it).
    """
    from .ulysses import video_shard_plan

    return video_shard_plan("", "image_rotary_emb", rotary_dims=2)


class UlyssesCogVideoXProcessor(CogVideoXJointAttnProcessor):
    """CogVideoX's attention under Ulysses context parallelism with `cogvideox_cp_plan` (each rank: the whole text,
    then its video shard; see `ulysses.ulysses_joint_attention`); without a parallel config, the plain one."""

    _parallel_config = None  # set by `enable_parallelism`, or by whoever installs this processor afterwards

    def attend(self, attn, query, key, value, num_text: int) -> torch.Tensor:
        from .ulysses import sdpa_joint, ulysses_group, ulysses_joint_attention

        group = ulysses_group(self._parallel_config)
        if group is None:
            return sdpa_bnhd(query, key, value)
        return ulysses_joint_attention(query, key, value, slice(num_text, query.shape[1]), group, sdpa_joint)
