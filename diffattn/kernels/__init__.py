"""diffattn.kernels: tensor ops only (torch and triton, nothing of diffusers).

Layouts are given at every boundary: `q: [B, H, N, D]` unless a function says otherwise.
"""

from .agent_attention import agent_attention
from .attention_probs import attention_with_probs
from .block_sparse_attention import (
    BACKENDS,
    block_sparse_attention,
    merge_attention_outputs,
    reference_block_sparse_attention,
    resolve_backend,
)
from .block_sparse_gather import gather_block_sparse_attention
from .block_sparse_layout import BlockSparseLayout
from .token_merge import TokenMatch, bipartite_matching, destination_grid, merge_tokens, unmerge_tokens


__all__ = [
    "agent_attention",
    "attention_with_probs",
    "TokenMatch",
    "bipartite_matching",
    "destination_grid",
    "merge_tokens",
    "unmerge_tokens",
    "BACKENDS",
    "BlockSparseLayout",
    "block_sparse_attention",
    "gather_block_sparse_attention",
    "merge_attention_outputs",
    "reference_block_sparse_attention",
    "resolve_backend",
]
