"""Attention that also returns its probabilities: the op behind attention maps and cross-attention losses.

Maps need the softmax itself, which fused kernels (SDPA-flash, our block-sparse kernel) never materialise, so this
is plain torch by design: it runs only on the few layers a method records, at their (small) resolution.
"""

from __future__ import annotations

import torch


def attention_with_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v, and the softmax.

    Args:
        q: [B, H, Nq, D]; k, v: [B, H, Nk, D].
        scale: defaults to D**-0.5.
        attn_mask: additive float mask or boolean keep-mask, broadcastable to [B, H, Nq, Nk].

    Returns:
        out: [B, H, Nq, D] in q's dtype; probs: [B, H, Nq, Nk] in float32 (softmax is computed in fp32).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)
    return out, probs
