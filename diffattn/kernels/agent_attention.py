"""Agent attention (Han et al., "Agent Attention", ECCV 2024), in AgentSD's training-free form.

With n agent tokens A (n << N), attention runs in two stages that never form an N x N matrix:

    aggregation:  V_A = softmax(A K^T * d^-1/2) V                 [B, H, n, D]
    broadcast:    O   = softmax(Q A^T * d^-(1/2 * p)) V_A + k * V  [B, H, N, D]

p (`agent_scale_power`, 0.3 in AgentSD) sharpens the broadcast softmax (d^-0.15), and k (`shortcut`, 0.075)
adds the value shortcut that replaces the trained depthwise convolution. Both stages are fused SDPA calls; with
`fp32=True` (AgentSD's attn_precision="fp32", for SD 2.1) they run in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    agent_scale_power: float = 0.3,
    shortcut: float = 0.075,
    fp32: bool = False,
) -> torch.Tensor:
    """q, k, v: [B, H, N, D]; agents: [B, H, n, D] -> [B, H, N, D] in q's dtype."""
    if q.ndim != 4 or agents.ndim != 4 or agents.shape[:2] != q.shape[:2] or agents.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"q: [B, H, N, D] and agents: [B, H, n, D] expected, got {tuple(q.shape)}, {tuple(agents.shape)}"
        )
    dtype = q.dtype
    if fp32:
        q, k, v, agents = q.float(), k.float(), v.float(), agents.float()
    d = q.shape[-1]
    agent_values = F.scaled_dot_product_attention(agents, k, v, scale=d**-0.5)
    out = F.scaled_dot_product_attention(q, agents, agent_values, scale=d ** (-0.5 * agent_scale_power))
    return out.add_(v, alpha=shortcut).to(dtype)
