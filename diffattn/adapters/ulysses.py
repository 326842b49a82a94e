"""Ulysses context parallelism's exchanges (Jacobs et al., DeepSpeed-Ulysses): each rank holds 1/P of the tokens
with every head; an all-to-all gives it every token of 1/P of the heads, attention runs there, a second all-to-all
brings the output back to token shards.

Used by processors that run their own attention under diffusers' context-parallel config: radial attention (the
mask needs the whole sequence) and the joint-attention families diffusers has no plan for (HunyuanVideo, CogVideoX,
Mochi), whose text is kept whole on every rank: see the `*_cp_plan` functions of their adapters.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .base import sdpa_bnhd


def ulysses_group(parallel_config: Any):
    """The process group of Ulysses context parallelism in diffusers' parallel config (None: no context parallelism).

    diffusers keeps the group's mesh in the private `ContextParallelConfig._ulysses_mesh` (set up by
    `enable_parallelism`); isolated here so a diffusers upgrade breaks in one place. Ring degrees are refused: these
    exchanges are Ulysses only.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if cp.ring_degree > 1:
        raise ValueError(
            f"ring context parallelism (ring_degree={cp.ring_degree}) is not supported here: a ring passes every key "
            "block around, a block-sparse mask saves nothing there; use ContextParallelConfig(ulysses_degree=N)"
        )
    return cp._ulysses_mesh.get_group() if cp.ulysses_degree > 1 else None


def all_to_all(x: torch.Tensor, group, scatter_heads: bool) -> torch.Tensor:
    """Ulysses' exchange. scatter_heads: [B, N/P, H, D] (this rank's tokens, all heads) -> [B, N, H/P, D] (all
    tokens, this rank's heads); else the inverse. Token shards are in rank order, as diffusers splits them."""
    import torch.distributed as dist

    ranks = dist.get_world_size(group)
    b, n, h, d = x.shape
    if scatter_heads:
        send = x.reshape(b, n, ranks, h // ranks, d).permute(2, 1, 0, 3, 4).contiguous()  # [P, N/P, B, H/P, D]
    else:
        send = x.reshape(b, ranks, n // ranks, h, d).permute(1, 2, 0, 3, 4).contiguous()  # [P, N/P, B, H, D]
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    if scatter_heads:  # received[p]: rank p's tokens, my heads
        return received.permute(2, 0, 1, 3, 4).reshape(b, ranks * n, h // ranks, d)
    return received.permute(2, 1, 0, 3, 4).reshape(b, n // ranks, ranks * h, d)  # received[p]: my tokens, p's heads


def check_heads(heads: int, group) -> None:
    import torch.distributed as dist

    ranks = dist.get_world_size(group)
    if heads % ranks:
        raise ValueError(f"ulysses_degree={ranks} must divide the attention heads ({heads})")


def ulysses_joint_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    video: slice,
    group,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, slice, torch.Tensor | None], torch.Tensor],
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Joint attention over video and text when each rank holds its shard of the video and the whole text.

    query, key, value: [B, n + T, H, D], this rank's n video tokens at `video` and the T text tokens (the same on
    every rank) before them (CogVideoX: [text | video]) or after them (HunyuanVideo, Mochi: [video | text]);
    text_mask: bool [B, T] (True = a valid text token) or None; video keys are always valid. The video part is
    exchanged for every video token of H/P heads; the text's H/P heads are sliced locally (no exchange).
    `attend(q, k, v, video, key_mask)` gets [B, P * n + T, H/P, D] in the same order (text first or last),
    the slice of all P * n video tokens in it and the bool key mask [B, P * n + T] (None without a text mask), and
    returns that layout. The video output goes back to token shards, the text output's heads are gathered: every
    rank returns [B, n + T, H, D] in its input's order, the text outputs whole.
    """
    import torch.distributed as dist

    length = query.shape[1]
    if video.start != 0 and video.stop != length:
        raise ValueError(f"expected the video tokens first or last in the joint sequence, got {video} of {length}")
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    heads = query.shape[2]
    check_heads(heads, group)
    local = slice(rank * heads // ranks, (rank + 1) * heads // ranks)
    text_first = video.start > 0
    num_text = length - (video.stop - video.start)
    total = ranks * (video.stop - video.start)
    all_video = slice(num_text, num_text + total) if text_first else slice(0, total)

    def join(text: torch.Tensor, video_part: torch.Tensor) -> torch.Tensor:
        return torch.cat([text, video_part] if text_first else [video_part, text], dim=1)

    def gather(x: torch.Tensor) -> torch.Tensor:
        text = x[:, :num_text] if text_first else x[:, video.stop :]
        return join(text[:, :, local], all_to_all(x[:, video].contiguous(), group, scatter_heads=True))

    key_mask = None
    if text_mask is not None:
        video_valid = torch.ones(text_mask.shape[0], total, dtype=torch.bool, device=text_mask.device)
        key_mask = join(text_mask.bool(), video_valid)
    out = attend(gather(query), gather(key), gather(value), all_video, key_mask)
    video_out = all_to_all(out[:, all_video].contiguous(), group, scatter_heads=False)
    text_out = (out[:, :num_text] if text_first else out[:, all_video.stop :]).contiguous()
    parts = [torch.empty_like(text_out) for _ in range(ranks)]
    dist.all_gather(parts, text_out, group=group)
    return join(torch.cat(parts, dim=2), video_out)


def sdpa_joint(query, key, value, video: slice, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Dense joint attention in `ulysses_joint_attention`'s `attend` signature: [B, N, H, D] -> [B, N, H, D]."""
    return sdpa_bnhd(query, key, value, key_mask)


def text_mask_of(key_mask: torch.Tensor | None, num_text: int, text_first: bool) -> torch.Tensor | None:
    """The text part, [B, num_text], of a joint key mask [B, N] (None stays None)."""
    if key_mask is None:
        return None
    return key_mask[:, :num_text] if text_first else key_mask[:, key_mask.shape[1] - num_text :]


def video_shard_plan(rotary_source: str, rotary_argument: str | None, rotary_dims: int) -> dict:
    """A context-parallel plan (diffusers' `_cp_plan` format) for a joint-attention transformer whose text stays
    whole on every rank: the video tokens are split at `transformer_blocks.0`'s `hidden_states` and gathered at
    `proj_out`; the rotary embeddings (cos, sin) [N, ...] of `rotary_dims` dims are split over their tokens too,
    as the outputs of the module `rotary_source` (rotary_argument None) or as its forward argument
    `rotary_argument` (`rotary_source` "" is the transformer itself).
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    if rotary_argument is None:
        split = ContextParallelInput(split_dim=0, expected_dims=rotary_dims, split_output=True)
        rotary = {0: split, 1: split}
    else:
        split = ContextParallelInput(split_dim=0, expected_dims=rotary_dims, split_output=False)
        rotary = {rotary_argument: [split, split]}
    return {
        rotary_source: rotary,
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
