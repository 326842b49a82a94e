"""`BlockSparseLayout`: a block mask and the compressed forms every block-sparse backend needs, built once.

A block mask `[Qb, Kb]` (shared by all heads) or `[H, Qb, Kb]` (per head) says which (query block, key block)
tiles are computed. From it the layout keeps, on the mask's device:

- forward CSR: `kv_counts: [Hm, Qb]` int32 and `kv_indices: [Hm, Qb, max_kv]` int32 (key blocks of each query block,
  ascending, padded with the last valid index so a stray read stays in bounds), Hm = 1 (shared) or H;
- transposed CSR for the dk/dv backward: `q_counts: [Hm, Kb]`, `q_indices: [Hm, Kb, max_q]`;
- a plan for the block-gather path (consecutive query blocks grouped, each group against the union of its key
  blocks).

Everything is derived here, at construction: calling attention with the same layout again does no host-side
mask work and no device sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


ALLOWED_BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class GatherGroup:
    """Consecutive query blocks that the block-gather path runs as one call against the union of their key blocks.

    q_blocks: [G] consecutive query block ids; kv_blocks: [Hm, U] the union of their key block ids, ascending (per
    head, a narrower head's union padded with its last block); kv_valid: [Hm, G, U] bool, whether query block g keeps
    union block u (False on padding).
    """

    q_blocks: torch.Tensor
    kv_blocks: torch.Tensor
    kv_valid: torch.Tensor


@dataclass(frozen=True)
class GatherStep:
    """One group as the gather path runs it, for a given head count and sequence length.

    q_index: [H*G] into query blocks flattened over (head, block), head-major; kv_index: [H*U] into key blocks
    flattened the same way; key_mask: bool [Hm, G, U*bk], which gathered keys each query block of the group attends
    (True), or None when every query block attends every gathered key; group_size: G.
    """

    q_index: torch.Tensor
    kv_index: torch.Tensor
    key_mask: torch.Tensor | None
    group_size: int


GATHER_GROUP_SIZES = (1, 2, 4, 8)
# A group attends the union of its blocks' keys: it gathers fewer bytes but computes the keys its rows drop. The
# largest group whose extra computation stays within this factor is taken (benchmarks/block_sparse_attention.py).
GATHER_MAX_EXTRA_COMPUTE = 1.3


def _csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [Hm, R, C] -> counts [Hm, R] int32, indices [Hm, R, max(counts)] int32 (True columns first, ascending)."""
    counts = mask.sum(-1)
    width = max(int(counts.max()), 1)
    # Stable sort puts the True columns first in ascending order.
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    last = (counts.clamp_min(1) - 1).unsqueeze(-1)
    slot = torch.arange(width, device=mask.device).expand_as(order)
    pad_with = torch.gather(order, -1, last.clamp_max(width - 1)).expand_as(order)
    order = torch.where(slot < counts.unsqueeze(-1), order, pad_with)
    return counts.to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


class BlockSparseLayout:
    """Which attention tiles to compute, in the compressed forms the kernels read.

    Args:
        block_mask: bool `[Qb, Kb]` shared by all heads, or `[H, Qb, Kb]` per head. True = compute the tile.
        block_size: tile size in tokens, an int or a (query, key) pair, each one of 16, 32, 64, 128
            (64 and 128 are the fast GPU sizes; 16 and 32 keep tests small).
        gather_group_size: how many consecutive query blocks the block-gather path runs as one call, one of
            `GATHER_GROUP_SIZES`; None (the default) chooses from the mask (`gather_group_size()`).

    A sequence of N tokens needs `Qb == ceil(N / block_q)` and `Kb == ceil(N / block_k)`; the last block may be
    partial. Every query block must keep at least one key block.
    """

    def __init__(
        self,
        block_mask: torch.Tensor,
        block_size: int | tuple[int, int] = 128,
        gather_group_size: int | None = None,
    ):
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            kind = type(block_mask).__name__ if not isinstance(block_mask, torch.Tensor) else block_mask.dtype
            raise ValueError(f"block_mask must be a bool tensor [Qb, Kb] or [H, Qb, Kb], got {kind}")
        if block_mask.ndim not in (2, 3) or 0 in block_mask.shape:
            raise ValueError(
                f"block_mask must be [Qb, Kb] or [H, Qb, Kb] with no empty dimension, got shape "
                f"{tuple(block_mask.shape)}"
            )
        sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        if len(sizes) != 2 or any(isinstance(s, bool) or s not in ALLOWED_BLOCK_SIZES for s in sizes):
            raise ValueError(
                f"block_size={block_size!r} is not allowed: "
                f"expected one of {ALLOWED_BLOCK_SIZES} or a (query, key) pair of them"
            )
        if gather_group_size is not None and (
            isinstance(gather_group_size, bool) or gather_group_size not in GATHER_GROUP_SIZES
        ):
            raise ValueError(
                f"gather_group_size={gather_group_size!r} is not allowed: expected one of {GATHER_GROUP_SIZES} or None"
            )
        self.block_q, self.block_k = sizes
        self.per_head = block_mask.ndim == 3
        mask = block_mask if self.per_head else block_mask.unsqueeze(0)
        empty = ~mask.any(-1)
        if bool(empty.any()):
            head, row = (int(i) for i in empty.nonzero()[0])
            where = f"query block {row}" + (f" of head {head}" if self.per_head else "")
            raise ValueError(f"block_mask keeps no key block for {where}: every query block needs at least one")
        self.block_mask = mask.contiguous()  # [Hm, Qb, Kb]
        self.num_heads = mask.shape[0] if self.per_head else None
        self.num_q_blocks, self.num_k_blocks = mask.shape[1], mask.shape[2]
        self.kv_counts, self.kv_indices = _csr(self.block_mask)
        self.q_counts, self.q_indices = _csr(self.block_mask.transpose(1, 2))
        self.density = float(self.block_mask.float().mean())
        self._gather_group_size = gather_group_size
        self._gather_groups: dict[int, list[GatherGroup]] = {}
        self._gather_plans: dict[tuple[int, int], list[GatherStep]] = {}
        self.flex_masks: dict[int, Any] = {}  # FlexAttention BlockMasks by sequence length (built by the flex path)

    @property
    def device(self) -> torch.device:
        return self.block_mask.device

    def to(self, device: torch.device | str) -> "BlockSparseLayout":
        """A copy on `device` (its compressed forms are rebuilt there once)."""
        mask = self.block_mask if self.per_head else self.block_mask[0]
        return BlockSparseLayout(mask.to(device), (self.block_q, self.block_k), self._gather_group_size)

    def check_sequence(self, num_queries: int, num_keys: int, num_heads: int) -> None:
        """Raise if a [.., N, ..] problem does not fit this layout (host ints only: no device sync)."""
        need_q, need_k = math.ceil(num_queries / self.block_q), math.ceil(num_keys / self.block_k)
        if (need_q, need_k) != (self.num_q_blocks, self.num_k_blocks):
            raise ValueError(
                f"layout is {self.num_q_blocks}x{self.num_k_blocks} blocks of {self.block_q}x{self.block_k}, but "
                f"{num_queries} queries and {num_keys} keys need {need_q}x{need_k}"
            )
        if self.per_head and num_heads != self.num_heads:
            raise ValueError(f"layout has {self.num_heads} heads, the inputs have {num_heads}")

    def token_mask(self, num_queries: int, num_keys: int) -> torch.Tensor:
        """The block mask expanded to tokens: bool [Hm, Nq, Nk] (True = attend)."""
        expanded = self.block_mask.repeat_interleave(self.block_q, 1).repeat_interleave(self.block_k, 2)
        return expanded[:, :num_queries, :num_keys]

    def gather_group_size(self) -> int:
        """How many consecutive query blocks the gather path runs as one call: the largest of
        `GATHER_GROUP_SIZES` whose tiles (each block against its group's union of key blocks) stay within
        `GATHER_MAX_EXTRA_COMPUTE` times the mask's own, unless the constructor fixed it. Masks whose neighbouring
        query blocks share key blocks (radial, sliding windows) get groups that gather a fraction of the bytes; a
        random mask keeps 1."""
        if self._gather_group_size is None:
            heads, rows, cols = self.block_mask.shape
            kept = self.block_mask.sum().item()
            best = 1
            for size in GATHER_GROUP_SIZES[1:]:
                groups = -(-rows // size)
                padded = torch.zeros(heads, groups * size, cols, dtype=torch.bool, device=self.device)
                padded[:, :rows] = self.block_mask
                union = padded.view(heads, groups, size, cols).any(2).sum(-1).amax(0)  # [groups]: widest head
                lengths = (rows - size * torch.arange(groups, device=self.device)).clamp(max=size)  # last may be short
                if (union * lengths).sum().item() * heads <= GATHER_MAX_EXTRA_COMPUTE * kept:
                    best = size
            self._gather_group_size = best
        return self._gather_group_size

    def gather_groups(self, group_size: int | None = None) -> list[GatherGroup]:
        """Consecutive query blocks, `group_size` a group (default `gather_group_size()`), each with the union of
        their key blocks. Built once per group size."""
        size = self.gather_group_size() if group_size is None else group_size
        if size not in self._gather_groups:
            groups = []
            for start in range(0, self.num_q_blocks, size):
                rows = torch.arange(start, min(start + size, self.num_q_blocks), device=self.device)
                keep = self.block_mask[:, rows]  # [Hm, G, Kb]
                union = keep.any(1)  # [Hm, Kb]
                counts, blocks = _csr(union.unsqueeze(1))  # [Hm, 1], [Hm, 1, U]: ascending, padded with the last
                blocks = blocks[:, 0].long()
                valid = torch.gather(keep, 2, blocks.unsqueeze(1).expand(-1, rows.shape[0], -1))
                slot = torch.arange(blocks.shape[1], device=self.device)
                valid &= (slot < counts).unsqueeze(1)  # padding repeats a real block: never attended twice
                groups.append(GatherGroup(rows, blocks.contiguous(), valid.contiguous()))
            self._gather_groups[size] = groups
        return self._gather_groups[size]

    def gather_plan(self, num_keys: int, num_heads: int) -> list[GatherStep]:
        """Per group of query blocks: flat block indices for `index_select` and the keep-mask of its keys.

        Indices address blocks flattened over (head, block), so shared and per-head layouts take one path and each
        gather is a plain contiguous copy. Built once per (sequence length, heads); cached on the layout.
        """
        key = (num_keys, num_heads)
        if key not in self._gather_plans:
            bk = self.block_k
            in_range = (torch.arange(self.num_k_blocks * bk, device=self.device) < num_keys).view(-1, bk)
            heads = torch.arange(num_heads, device=self.device).view(num_heads, 1)
            steps = []
            for group in self.gather_groups():
                g, width = group.q_blocks.shape[0], group.kv_blocks.shape[1]
                q_flat = (heads * self.num_q_blocks + group.q_blocks.view(1, g)).reshape(-1)
                kv_flat = (heads * self.num_k_blocks + group.kv_blocks.expand(num_heads, width)).reshape(-1)
                keep = group.kv_valid.unsqueeze(-1) & in_range[group.kv_blocks].unsqueeze(1)  # [Hm, G, U, bk]
                mask = None if bool(keep.all()) else keep.reshape(keep.shape[0], g, width * bk)
                steps.append(GatherStep(q_flat, kv_flat, mask, g))
            self._gather_plans[key] = steps
        return self._gather_plans[key]

    def __repr__(self) -> str:
        heads = f", heads={self.num_heads}" if self.per_head else ""
        return (
            f"BlockSparseLayout({self.num_q_blocks}x{self.num_k_blocks} blocks of {self.block_q}x{self.block_k}"
            f"{heads}, density={self.density:.3f}, device={self.device})"
        )
