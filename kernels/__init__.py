"""diffattn.kernels: tensor ops only (torch and triton, nothing of diffusers).

Layouts are given at every boundary: `q: [B, H, N, D]` unless a function says otherwise.
"""

from .attention_probs import attention_with_probs


__all__ = ["attention_with_probs"]
