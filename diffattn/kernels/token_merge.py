"""Token merging for 2D token grids (ToMe for SD, Bolya & Hoffman 2023): bipartite matching, merge, unmerge.

Tokens are a row-major h x w grid: x: [B, N, C] with N = h * w. Destinations are one token per sy x sx window
(random, or the window's top-left); every other token is a source. Each source finds its most similar destination
(cosine similarity of `metric`), sources are ranked by that similarity, and the r best merge into their destination
by a segment mean (the destination counted once); unmerging copies each destination's output back to the sources
merged into it. One matching serves several merge amounts (ToMe's r and AgentSD's agent count), since the ranking
does not depend on r.

No host syncs: every index is computed on the device with static shapes (r, grid sizes) known on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .triton_support import triton_usable


@dataclass(frozen=True)
class TokenMatch:
    """The result of bipartite matching on a batch.

    dst_index: [Nd] token positions of the destinations (shared by the batch).
    src_index: [Ns] token positions of the sources.
    order: [B, Ns] sources (indices into src_index) sorted by similarity, most similar first.
    best_dst: [B, Ns] for each source, the destination (index into dst_index) it is most similar to.
    """

    dst_index: torch.Tensor
    src_index: torch.Tensor
    order: torch.Tensor
    best_dst: torch.Tensor

    @property
    def num_src(self) -> int:
        return self.src_index.shape[0]

    @property
    def num_dst(self) -> int:
        return self.dst_index.shape[0]


def destination_grid(
    h: int,
    w: int,
    sx: int,
    sy: int,
    *,
    generator: torch.Generator | None = None,
    device=None,
    global_rng: bool = False,
) -> torch.Tensor:
    """Token positions [Nd] of one destination per sy x sx window (random within the window with a generator, or
    from torch's global RNG with `global_rng`, which torch.compile can trace; else the top-left). Rows and columns
    past the last whole window hold only sources."""
    wh, ww = h // sy, w // sx
    if wh == 0 or ww == 0:
        raise ValueError(f"a {h}x{w} grid has no whole {sy}x{sx} window")
    if generator is not None:
        pick = torch.randint(sy * sx, (wh, ww), generator=generator, device=generator.device).to(device)
    elif global_rng:
        pick = torch.randint(sy * sx, (wh, ww), device=device)
    else:
        pick = torch.zeros(wh, ww, dtype=torch.long, device=device)
    rows = torch.arange(wh, device=device).view(-1, 1) * sy + pick // sx
    cols = torch.arange(ww, device=device).view(1, -1) * sx + pick % sx
    return (rows * w + cols).reshape(-1)


MATCHING_BACKENDS = ("auto", "torch", "triton")


def bipartite_matching(
    metric: torch.Tensor,
    h: int,
    w: int,
    sx: int = 2,
    sy: int = 2,
    *,
    generator: torch.Generator | None = None,
    global_rng: bool = False,
    chunk: int = 2048,
    backend: str = "auto",
) -> TokenMatch:
    """Match every source token of `metric: [B, N, C]` to its most similar destination (cosine similarity).

    backend: "torch" computes the similarity in chunks of `chunk` sources, so the full [Ns, Nd] score matrix is
    never stored; "triton" (`token_match_triton`, CUDA, or the CPU under TRITON_INTERPRET=1) never stores even a
    chunk. "auto" takes the kernel on CUDA (H200, fp16, batch 2, 320 channels, stride 4: 0.78 ms vs the torch
    path's 1.18 ms at 4,096 tokens, 0.77 vs 1.81 ms at 16,384; benchmarks/agent_attention.py) and torch elsewhere.
    """
    if backend not in MATCHING_BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not allowed: expected one of {', '.join(map(repr, MATCHING_BACKENDS))}"
        )
    batch, n, _ = metric.shape
    if n != h * w:
        raise ValueError(f"metric has {n} tokens, the grid is {h}x{w}")
    device = metric.device
    if backend == "triton" and not triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); got {device}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    dst = destination_grid(h, w, sx, sy, generator=generator, device=device, global_rng=global_rng)
    is_dst = torch.zeros(n, dtype=torch.bool, device=device)
    is_dst.index_fill_(0, dst, True)  # a scalar fill: `is_dst[dst] = True` copies a CPU tensor (no CUDA graphs)
    # Static size: N - Nd sources; boolean indexing would read the count back to the host, so compute it instead.
    src = torch.argsort(is_dst.to(torch.int8), stable=True)[: n - dst.shape[0]]
    with torch.no_grad():
        if backend == "triton":
            from .token_match_triton import triton_best_destination

            best_score, best = triton_best_destination(metric, src, dst)
        else:
            best_score, best = _best_destination_torch(metric, src, dst, chunk)
        order = torch.argsort(best_score, dim=1, descending=True, stable=True)
    return TokenMatch(dst, src, order, best)


def _best_destination_torch(
    metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best cosine similarity [B, Ns], its destination [B, Ns]) in chunks of `chunk` sources."""
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    dst_unit = unit[:, dst]  # [B, Nd, C]
    best_score, best_dst = [], []
    for start in range(0, src.shape[0], chunk):
        scores = torch.matmul(unit[:, src[start : start + chunk]], dst_unit.transpose(1, 2))  # [B, c, Nd]
        value, index = scores.max(dim=-1)
        best_score.append(value)
        best_dst.append(index)
    return torch.cat(best_score, dim=1), torch.cat(best_dst, dim=1)


def merge_tokens(x: torch.Tensor, match: TokenMatch, r: int) -> torch.Tensor:
    """x: [B, N, C] -> [B, N - r, C]: the unmerged sources (in similarity order), then the destinations, each the
    mean of itself and the r best sources merged into it."""
    r = min(r, match.num_src)
    batch, _, c = x.shape
    src_tokens = x[:, match.src_index]  # [B, Ns, C]
    ranked = torch.gather(src_tokens, 1, match.order.unsqueeze(-1).expand(-1, -1, c))
    kept, merged = ranked[:, r:], ranked[:, :r]
    targets = torch.gather(match.best_dst, 1, match.order[:, :r])  # [B, r]
    dst_tokens = x[:, match.dst_index].float()
    sums = dst_tokens.scatter_add(1, targets.unsqueeze(-1).expand(-1, -1, c), merged.float())
    counts = torch.ones(batch, match.num_dst, 1, device=x.device, dtype=torch.float32)
    counts = counts.scatter_add(1, targets.unsqueeze(-1), torch.ones_like(targets, dtype=torch.float32).unsqueeze(-1))
    return torch.cat([kept, (sums / counts).to(x.dtype)], dim=1)


def unmerge_tokens(y: torch.Tensor, match: TokenMatch, r: int, num_tokens: int) -> torch.Tensor:
    """y: [B, N - r, C] (the layout `merge_tokens` returns) -> [B, N, C]; merged sources copy their destination."""
    r = min(r, match.num_src)
    batch, _, c = y.shape
    kept_count = match.num_src - r
    kept, dst_out = y[:, :kept_count], y[:, kept_count:]
    targets = torch.gather(match.best_dst, 1, match.order[:, :r])
    merged = torch.gather(dst_out, 1, targets.unsqueeze(-1).expand(-1, -1, c))  # [B, r, C]
    src_out = torch.cat([merged, kept], dim=1)  # in ranked order
    positions = match.src_index[match.order]  # [B, Ns] token positions in ranked order
    out = y.new_empty(batch, num_tokens, c)
    out[:, match.dst_index] = dst_out
    out.scatter_(1, positions.unsqueeze(-1).expand(-1, -1, c), src_out)
    return out
