"""Ulysses context parallelism's exchanges (Jacobs et al., DeepSpeed-Ulysses): each rank holds 1/P of the tokens
with every head; an all-to-all gives it every token of 1/P of the heads, attention runs there, a second all-to-all
brings the output back to token shards.

Used by processors that run their own attention under diffusers' context-parallel config: radial attention (the
mask needs the whole sequence) and the joint-attention families diffusers has no plan for (HunyuanVideo, whose text
is kept whole on every rank: see `hunyuan_video.hunyuan_video_cp_plan`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


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
    num_video: int,
    group,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention over [video | text] when each rank holds its shard of the video and the whole text.

    query, key, value: [B, num_video + T, H, D], this rank's `num_video` video tokens then all T text tokens (the
    same on every rank). The video part is exchanged for every video token of H/P heads; the text's H/P heads are
    sliced locally (no exchange). `attend(q, k, v)` gets [B, P * num_video + T, H/P, D] over [all video | text] and
    returns the same layout. The video output goes back to token shards; the text output's heads are gathered, so
    every rank returns [B, num_video + T, H, D] with the text outputs whole.
    """
    import torch.distributed as dist

    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    heads = query.shape[2]
    check_heads(heads, group)
    local = slice(rank * heads // ranks, (rank + 1) * heads // ranks)

    def gather(x: torch.Tensor) -> torch.Tensor:
        video = all_to_all(x[:, :num_video].contiguous(), group, scatter_heads=True)
        return torch.cat([video, x[:, num_video:, local]], dim=1)

    out = attend(gather(query), gather(key), gather(value))
    total = ranks * num_video
    video_out = all_to_all(out[:, :total].contiguous(), group, scatter_heads=False)
    text_out = out[:, total:].contiguous()
    parts = [torch.empty_like(text_out) for _ in range(ranks)]
    dist.all_gather(parts, text_out, group=group)
    return torch.cat([video_out, torch.cat(parts, dim=2)], dim=1)
