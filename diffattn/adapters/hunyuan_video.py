"""HunyuanVideo: `HunyuanVideoTransformer3DModel` with legacy `Attention` modules and joint attention.

Dual-stream blocks (`transformer_blocks.N.attn`) and single-stream blocks (`single_transformer_blocks.N.attn`)
attend over one sequence: the video tokens first (frame by frame, raster order), the text tokens at the end.
The token refiner's attention (`context_embedder...`) sees text only and is not listed.
"""

from __future__ import annotations

import torch

from .base import AttentionLayer, LatentGeometry, ModelAdapter, project_heads, sdpa_bnhd


class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan-video"
    model_class_names = ("HunyuanVideoTransformer3DModel",)
    plain_processor_names = ("HunyuanVideoAttnProcessor2_0",)

    def attention_layers(self) -> list[AttentionLayer]:
        def classify(path: str, module: torch.nn.Module):
            if path.startswith("transformer_blocks."):
                return "joint", "double"
            if path.startswith("single_transformer_blocks."):
                return "joint", "single"
            return None

        return self._layers_by_kind(classify)

    def context_parallel_support(self) -> tuple[dict, dict[str, type]]:
        return hunyuan_video_cp_plan(), {"joint": UlyssesHunyuanVideoProcessor}

    def geometry(self, sample: torch.Tensor) -> LatentGeometry:
        # sample: [B, C, F, H, W] latents; patch_size_t over frames, patch_size over height and width.
        if sample.ndim != 5:
            raise ValueError(f"HunyuanVideo sample must be [B, C, F, H, W], got shape {tuple(sample.shape)}")
        config = self.model.config
        batch, _, frames, height, width = sample.shape
        return LatentGeometry(
            batch, frames // config.patch_size_t, height // config.patch_size, width // config.patch_size
        )


class HunyuanVideoJointAttnProcessor:
    """The computation of diffusers' `HunyuanVideoAttnProcessor2_0`, with `attend` overridable.

    `attend(attn, q, k, v, num_video, key_mask)` gets q, k, v: [B, N, H, D] over [video | text] tokens (video
    first, `num_video` of them, rotary applied to the video part) and key_mask: bool [B, N] (text padding is False)
    or None; it returns [B, N, H, D].
    """

    def attend(self, attn, query, key, value, num_video: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        return sdpa_bnhd(query, key, value, key_mask)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        num_video = hidden_states.shape[1]
        num_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        joint_input = attn.add_q_proj is None and encoder_hidden_states is not None
        if joint_input:  # single-stream blocks project video and text together
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = project_heads(attn, hidden_states, "to_q", "to_k", "to_v", "norm_q", "norm_k")
        if image_rotary_emb is not None:
            query = torch.cat(
                [apply_rotary_emb(query[:, :num_video], image_rotary_emb, sequence_dim=1), query[:, num_video:]], 1
            )
            key = torch.cat(
                [apply_rotary_emb(key[:, :num_video], image_rotary_emb, sequence_dim=1), key[:, num_video:]], 1
            )
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            enc_query, enc_key, enc_value = project_heads(
                attn, encoder_hidden_states, "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"
            )
            query = torch.cat([query, enc_query], dim=1)
            key = torch.cat([key, enc_key], dim=1)
            value = torch.cat([value, enc_value], dim=1)
        # diffusers passes [B, 1, 1, N] (bool, True = keep); keep it as [B, N].
        key_mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1).bool()
        hidden_states = self.attend(attn, query, key, value, num_video, key_mask).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states, encoder_hidden_states
        hidden_states, encoder_hidden_states = hidden_states[:, :-num_text], hidden_states[:, -num_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def hunyuan_video_cp_plan() -> dict:
    """A context-parallel plan for HunyuanVideo (diffusers has none): the video tokens are split across ranks at the
    first dual-stream block (with their rotary embeddings), the text stays whole on every rank, the output is
    gathered at `proj_out`. Its attention layers must run `UlyssesHunyuanVideoProcessor` (or radial attention over
    it): diffusers' own Ulysses path would count the replicated text once per rank.

    The text cannot be split like the video: the attention mask marks padding by its position in the whole text.
    """
    from .ulysses import video_shard_plan

    return video_shard_plan("rope", None, rotary_dims=2)


class UlyssesHunyuanVideoProcessor(HunyuanVideoJointAttnProcessor):
    """HunyuanVideo's attention under Ulysses context parallelism with `hunyuan_video_cp_plan` (each rank: its video
    shard and the whole text; see `ulysses.ulysses_joint_attention`); without a parallel config, the plain one."""

    _parallel_config = None  # set by `enable_parallelism`, or by whoever installs this processor afterwards

    def attend(self, attn, query, key, value, num_video: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        from .ulysses import sdpa_joint, text_mask_of, ulysses_group, ulysses_joint_attention

        group = ulysses_group(self._parallel_config)
        if group is None:
            return sdpa_bnhd(query, key, value, key_mask)
        # key_mask spans [all video | text]: the transformer builds it before the plan splits the video
        text_mask = text_mask_of(key_mask, query.shape[1] - num_video, text_first=False)
        return ulysses_joint_attention(query, key, value, slice(0, num_video), group, sdpa_joint, text_mask)
