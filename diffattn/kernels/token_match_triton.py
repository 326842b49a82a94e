"""Triton bipartite matching for token merging: each source token's most similar destination by cosine similarity.

One program owns BLOCK_M source tokens of one batch element. It gathers their rows of `metric` by index (no copy
of the source or destination sets), computes their norms, then walks the destinations BLOCK_N at a time: dot
products over the channels in BLOCK_C slices (fp32 accumulation), divided by both norms, and a running maximum
with its index. The [Ns, Nd] score matrix never exists, not even in chunks. Among exactly equal scores the lowest
destination index wins; identical destination rows (flat image regions) can score an ulp apart after the tiled
dot product, so either of them may be chosen, both with the best similarity.

Layouts: metric: [B, N, C] with any strides; src_index: [Ns], dst_index: [Nd] token positions (int64);
returns best_score: [B, Ns] float32 and best_dst: [B, Ns] int64 (indices into dst_index). The torch reference is
`bipartite_matching(..., backend="torch")`; tests compare against a plain re-implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _best_destination_kernel(
    X, SRC, DST, SCORE, BEST,
    sxb, sxn, sxc, ssb, sbb,
    NS, ND, C,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < NS
    src_rows = tl.load(SRC + offs_m, mask=m_ok, other=0)
    x_b = X + b * sxb
    src_sq = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(x_b + src_rows[:, None] * sxn + offs_c[None, :] * sxc,
                    mask=m_ok[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)  # fmt: skip
        src_sq += tl.sum(a * a, 1)
    src_inv = 1.0 / tl.maximum(tl.sqrt(src_sq), 1e-6)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, ND, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < ND
        dst_rows = tl.load(DST + offs_n, mask=n_ok, other=0)
        dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dst_sq = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c[None, :] < C
            a = tl.load(x_b + src_rows[:, None] * sxn + offs_c[None, :] * sxc, mask=m_ok[:, None] & c_ok, other=0.0)
            d = tl.load(x_b + dst_rows[:, None] * sxn + offs_c[None, :] * sxc, mask=n_ok[:, None] & c_ok, other=0.0)
            dot = tl.dot(a, tl.trans(d), dot, input_precision=DOT_PRECISION)
            d32 = d.to(tl.float32)
            dst_sq += tl.sum(d32 * d32, 1)
        dst_inv = 1.0 / tl.maximum(tl.sqrt(dst_sq), 1e-6)
        score = dot * src_inv[:, None] * dst_inv[None, :]
        score = tl.where(n_ok[None, :], score, float("-inf"))
        tile_best = tl.max(score, 1)
        # The lowest index among the tile's maxima, written out: argmax's tie-breaking differs between backends.
        tile_index = tl.min(tl.where(score == tile_best[:, None], offs_n[None, :], ND), 1)
        better = tile_best > best  # strictly: an equal score in a later tile keeps the lower index
        best_index = tl.where(better, tile_index, best_index)
        best = tl.where(better, tile_best, best)
    tl.store(SCORE + b * ssb + offs_m, best, mask=m_ok)
    tl.store(BEST + b * sbb + offs_m, best_index.to(tl.int64), mask=m_ok)


def triton_best_destination(
    metric: torch.Tensor,
    src_index: torch.Tensor,
    dst_index: torch.Tensor,
    *,
    block_m: int = 64,
    block_n: int = 64,
    block_c: int = 64,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """metric: [B, N, C]; src_index: [Ns], dst_index: [Nd] -> (best_score [B, Ns] fp32, best_dst [B, Ns] int64)."""
    batch, _, channels = metric.shape
    num_src, num_dst = src_index.shape[0], dst_index.shape[0]
    score = torch.empty(batch, num_src, device=metric.device, dtype=torch.float32)
    best = torch.empty(batch, num_src, device=metric.device, dtype=torch.int64)
    if num_src == 0:
        return score, best
    # fp32 metrics: exact fp32 products, since the argmax of near-equal similarities is what gets compared.
    precision = "ieee" if metric.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(num_src, block_m), batch)
    _best_destination_kernel[grid](
        metric, src_index, dst_index, score, best,
        metric.stride(0), metric.stride(1), metric.stride(2), score.stride(0), best.stride(0),
        num_src, num_dst, channels,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, DOT_PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    return score, best
