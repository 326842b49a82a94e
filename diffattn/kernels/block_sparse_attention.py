"""Block-sparse attention: one op, four backends, all exact against the same spec.

    out = block_sparse_attention(q, k, v, layout)                 # q, k, v: [B, H, N, D]
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True)
    out = block_sparse_attention(q, k, v, layout, qkv_format="bnhd")   # diffusers' [B, N, H, D], no copies

Backends:
- "torch": the reference and the spec. Dense attention with the block mask expanded to tokens, softmax in fp32.
- "triton": our kernel (`block_sparse_triton.py`), CUDA; on CPU only under TRITON_INTERPRET=1 (tests). Registered
  as the custom ops `diffattn::block_sparse_attention_fwd/_bwd` with autograd and fake (meta) kernels, so it
  trains (LoRA) and runs inside `torch.compile` and CUDA graphs.
- "flex": PyTorch FlexAttention with a `BlockMask` made from the same layout (compiled on first use).
- "gather": block-gather in plain torch (`block_sparse_gather.py`; CPU and GPU): each query block gathers only its
  key blocks and runs fused attention on them; on the CPU forward and backward run on PyTorch's fused CPU kernels
  group by group. The fast CPU path, for inference and training.
- "auto": on CUDA triton for fp16/bf16 with head dims up to 128 (inference and training), flex for fp32 and head
  dims over 128 (measured on an H100 and an H200, see `resolve_backend`); gather elsewhere.
"""

from __future__ import annotations

import logging
import os

import torch

from .block_sparse_gather import gather_block_sparse_attention
from .block_sparse_layout import BlockSparseLayout
from .triton_support import triton_usable


logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "flex", "gather", "torch")
QKV_FORMATS = ("bhnd", "bnhd")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_MAX_HEAD_DIM = 128


def resolve_backend(
    backend: str,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
) -> str:
    """The concrete backend `auto` means for these inputs; validates explicit names.

    On CUDA, `auto` takes the Triton kernel for fp16/bf16 with head dims up to 128, for inference and training
    (H200, bf16, block 128, D=128: forward 1.16-1.22 of ideal, ahead of FlexAttention on all 12 shapes and masks;
    forward+backward 1.04-1.12, ahead of FlexAttention on 3 of 4 masks and 0.6% behind on the fourth), and
    FlexAttention for fp32 (Triton's 128-wide fp32 tiles run unpipelined) and head dims over 128. fp64 and every
    other device: the block-gather path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed: expected one of {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "gather"
        if dtype in (torch.float16, torch.bfloat16) and head_dim <= TRITON_MAX_HEAD_DIM:
            return "triton"
        return "flex"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); got device {device}. "
            "Use backend='auto', 'gather' or 'flex' on the CPU."
        )
    return backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    qkv_format: str = "bhnd",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale, restricted to the layout's tiles) v.

    Args:
        q, k, v: [B, H, N, D] (qkv_format="bhnd") or [B, N, H, D] ("bnhd"), same shape; fp16, bf16, fp32 (fp64 on
            the torch and gather backends). D from 16 to 256 (triton: up to 128); any N (the last block may be
            partial).
        layout: a `BlockSparseLayout` on q's device with ceil(N / block) blocks each way.
        scale: defaults to D**-0.5.
        return_lse: also return the log-sum-exp of each query's scores, [B, H, N] float32 (natural log), to merge
            partial results: out = (o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)), lse = logaddexp(lse1, lse2).
        backend: "auto", "triton", "flex", "gather" or "torch" (see the module docstring).

    Returns:
        out in q's format and dtype, and lse if asked.
    """
    if qkv_format not in QKV_FORMATS:
        raise ValueError(f"qkv_format={qkv_format!r} is not allowed: expected 'bhnd' ([B, H, N, D]) or 'bnhd'")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D] or [B, N, H, D], got {getattr(t, 'shape', t)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(
            f"q, k, v must share a dtype among fp16, bf16, fp32, fp64; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not isinstance(layout, BlockSparseLayout):
        raise ValueError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if qkv_format == "bnhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    _, heads, n, d = q.shape
    if not 16 <= d <= 256:
        raise ValueError(f"head dim {d} is not allowed: expected 16 to 256")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}: build it there (layout.to(device))")
    layout.check_sequence(n, n, heads)
    scale = d**-0.5 if scale is None else float(scale)
    chosen = resolve_backend(backend, q.device, dtype=q.dtype, head_dim=d)
    if chosen == "triton" and (d > TRITON_MAX_HEAD_DIM or q.dtype == torch.float64):
        raise ValueError(f"backend='triton' supports head dims up to {TRITON_MAX_HEAD_DIM} in fp16/bf16/fp32")

    if chosen == "torch":
        out, lse = reference_block_sparse_attention(q, k, v, layout, scale)
    elif chosen == "gather":
        out, lse = gather_block_sparse_attention(q, k, v, layout, scale, return_lse=return_lse)
    elif chosen == "flex":
        out, lse = flex_block_sparse_attention(q, k, v, layout, scale, return_lse=return_lse)
    else:
        out, lse = torch.ops.diffattn.block_sparse_attention_fwd(
            q, k, v, layout.kv_counts, layout.kv_indices, layout.q_counts, layout.q_indices,
            layout.block_q, layout.block_k, scale,
        )  # fmt: skip
    if qkv_format == "bnhd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def merge_attention_outputs(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets. out: [B, H, N, D]; lse: [B, H, N] float32."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.float() * torch.exp(lse_a - lse).unsqueeze(-1) + out_b.float() * torch.exp(lse_b - lse).unsqueeze(-1)
    return out.to(out_a.dtype), lse


# ---- torch reference --------------------------------------------------------------------------------------------


def reference_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockSparseLayout, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec. q, k, v: [B, H, N, D] -> out [B, H, N, D], lse [B, H, N] float32 (dense, materialises scores)."""
    n = q.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = layout.token_mask(n, n).unsqueeze(0)  # [1, Hm, N, N]
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v.to(compute)).to(q.dtype)
    return out, lse.float() if compute == torch.float32 else lse


# ---- FlexAttention path -----------------------------------------------------------------------------------------

_compiled_flex = None


def flex_block_mask(layout: BlockSparseLayout, n: int):
    """A FlexAttention `BlockMask` with exactly the layout's tiles (cached on the layout per sequence length)."""
    from torch.nn.attention.flex_attention import BlockMask

    cache = layout.flex_masks
    if n not in cache:
        # Pad rows to Kb entries by repeating their last valid block: code that reads past a row's count (some
        # eager FlexAttention paths do) then only ever sees blocks the row really has.
        indices = layout.kv_indices
        extra = layout.num_k_blocks - indices.shape[-1]
        if extra:
            indices = torch.cat([indices, indices[..., -1:].expand(*indices.shape[:-1], extra)], dim=-1)
        counts = layout.kv_counts
        tiles, bq, bk = layout.block_mask, layout.block_q, layout.block_k

        # Compiled kernels take the tiles as "full" blocks and never evaluate mask_mod inside them; the eager
        # (math) path ignores the block lists and applies mask_mod alone, so it must state the same mask.
        if layout.per_head:

            def mask_mod(b, h, q_idx, kv_idx):
                return tiles[h, q_idx // bq, kv_idx // bk]
        else:

            def mask_mod(b, h, q_idx, kv_idx):
                return tiles[0, q_idx // bq, kv_idx // bk]

        cache[n] = BlockMask.from_kv_blocks(
            torch.zeros_like(counts)[None],
            indices[None].contiguous(),
            counts[None],
            indices[None].contiguous(),
            BLOCK_SIZE=(bq, bk),
            mask_mod=mask_mod,
            seq_lengths=(n, n),
        )
    return cache[n]


def flex_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockSparseLayout, scale: float, return_lse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FlexAttention on the layout's BlockMask. q, k, v: [B, H, N, D] -> out, lse (None unless asked).

    Compiled on first use unless already inside torch.compile; DIFFATTN_FLEX_EAGER=1 runs PyTorch's eager
    reference instead (dense, slow: for debugging). PyTorch limits on the CPU: no backward, and the compiled
    kernel returns no log-sum-exp.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    on_cpu = q.device.type == "cpu"
    if on_cpu and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("backend='flex' has no backward on the CPU (a PyTorch limitation); use backend='gather'")
    eager = os.environ.get("DIFFATTN_FLEX_EAGER") == "1"
    if on_cpu and return_lse and not eager:
        raise ValueError("backend='flex' cannot return the log-sum-exp on the CPU (a PyTorch limitation)")
    block_mask = flex_block_mask(layout, q.shape[2])
    if torch.compiler.is_compiling() or eager:
        fn = flex_attention
    else:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    if not return_lse:
        return fn(q, k, v, block_mask=block_mask, scale=scale), None
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
        return out, lse.float()
    out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse.float()


# ---- triton custom ops ------------------------------------------------------------------------------------------


@torch.library.custom_op("diffattn::block_sparse_attention_fwd", mutates_args=())
def _triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    q_counts: torch.Tensor,
    q_indices: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .block_sparse_triton import triton_forward

    return triton_forward(q, k, v, kv_counts, kv_indices, block_q, block_k, scale)


@_triton_fwd.register_fake
def _triton_fwd_fake(q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_q, block_k, scale):
    batch, heads, n, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (batch, heads, n), dtype=torch.float32
    )


@torch.library.custom_op("diffattn::block_sparse_attention_bwd", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    q_counts: torch.Tensor,
    q_indices: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .block_sparse_triton import triton_backward

    return triton_backward(
        grad_out, q, k, v, lse, delta, kv_counts, kv_indices, q_counts, q_indices, block_q, block_k, scale
    )


@_triton_bwd.register_fake
def _triton_bwd_fake(grad_out, q, k, v, lse, delta, kv_counts, kv_indices, q_counts, q_indices, bq, bk, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _triton_setup_context(ctx, inputs, output):
    q, k, v, kv_counts, kv_indices, q_counts, q_indices, block_q, block_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices)
    ctx.block_q, ctx.block_k, ctx.scale = block_q, block_k, scale


def _triton_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_counts, kv_indices, q_counts, q_indices = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O)
    if grad_lse is not None:
        delta = delta - grad_lse  # d lse / d s = softmax, so the LSE's gradient enters through delta
    dq, dk, dv = _triton_bwd(
        grad_out, q, k, v, lse, delta.contiguous(), kv_counts, kv_indices, q_counts, q_indices,
        ctx.block_q, ctx.block_k, ctx.scale,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None, None, None


_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)
