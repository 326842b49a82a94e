"""Block-sparse attention by block gather, in plain torch: query blocks gather only the key blocks they keep.

    out, lse = gather_block_sparse_attention(q, k, v, layout, scale)      # q, k, v: [B, H, N, D]

Each group of consecutive query blocks (`BlockSparseLayout.gather_plan`) gathers the union of its key blocks into
one short sequence and runs fused attention on it, each query block masked to its own key blocks: neighbouring
query blocks of a radial or windowed mask share most of their keys, so a group copies them once. On the CPU the
forward and the backward are one autograd Function around PyTorch's fused CPU flash-attention kernels, run group by
group, the backward adding each group's key and value gradients into one buffer: letting autograd differentiate the
gathers instead gives every group's `index_select` a full-size gradient and every `index_copy_` a full-size copy,
which makes the backward cost grow with groups x sequence length and left training no faster than dense attention.
Elsewhere (a GPU, inside `torch.compile`) the same gathers run under plain autograd. The spec is
`block_sparse_attention.reference_block_sparse_attention`; tests compare both directions.
"""

from __future__ import annotations

import torch

from .block_sparse_layout import BlockSparseLayout, GatherStep


def gather_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k, v: [B, H, N, D] -> out [B, H, N, D], lse [B, H, N] (float32; float64 for float64 inputs; None unless
    asked)."""
    if q.device.type == "cpu" and _HAS_CPU_FLASH and not torch.compiler.is_compiling():
        out, lse = _CpuGatherAttention.apply(q, k, v, layout, scale)
        return out, lse if return_lse else None
    return _autograd_gather_attention(q, k, v, layout, scale, return_lse)


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, length, D] with zero rows appended (no copy when N == length and contiguous)."""
    n = t.shape[2]
    if n == length:
        return t.contiguous()
    return torch.nn.functional.pad(t, (0, 0, 0, length - n))


def _float_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics and summed gradients are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(t: torch.Tensor, count: int, block: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H * count, block, D]: the sequence cut into blocks, padded with zero rows."""
    batch, heads, _, d = t.shape
    return _pad_tokens(t, count * block).view(batch, heads * count, block, d)


def _unblock(t: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """[B, H * count, block, ...] -> [B, H, N, ...], the padding rows dropped."""
    return t.view(t.shape[0], heads, -1, *t.shape[3:])[:, :, :n]


def _gathered(step: GatherStep, blocks: tuple[torch.Tensor, ...], q_side: tuple[torch.Tensor, ...], batch: int):
    """One group's inputs: the query-side block tensors ([B, H*Qb, bq, ...]) at its query blocks, as
    [B, H, G*bq, ...], and the key-side ones ([B, H*Kb, bk, D]) at the union of its key blocks, as [B, H, U*bk, D]."""
    heads = step.q_index.shape[0] // step.group_size
    keys = tuple(t.index_select(1, step.kv_index).view(batch, heads, -1, t.shape[-1]) for t in blocks)
    queries = tuple(t.index_select(1, step.q_index).view(batch, heads, -1, *t.shape[3:]) for t in q_side)
    return queries, keys


def _scatter(step: GatherStep, target: torch.Tensor, part: torch.Tensor) -> None:
    """Write one group's query-side result [B, H, G*bq, ...] into `target` [B, H*Qb, bq, ...] at its blocks."""
    target.index_copy_(1, step.q_index, part.reshape(target.shape[0], -1, *target.shape[2:]))


def _key_mask(step: GatherStep, block_q: int) -> torch.Tensor | None:
    """The group's key mask per query, bool [1, Hm, G*bq, U*bk] (a broadcast view of the plan's [Hm, G, U*bk]),
    or None."""
    if step.key_mask is None:
        return None
    rows, size, keys = step.key_mask.shape
    return step.key_mask.unsqueeze(2).expand(rows, size, block_q, keys).reshape(1, rows, size * block_q, keys)


def _additive_mask(step: GatherStep, dtype: torch.dtype, block_q: int) -> torch.Tensor | None:
    """`_key_mask` as the additive bias the fused CPU kernels take (0 kept, -inf dropped), in the inputs' dtype.
    Built per group just before its call, so only one group's bias is ever held."""
    keep = _key_mask(step, block_q)
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


# PyTorch's fused CPU flash attention, forward with its log-sum-exp and backward from it. These aten ops are private
# (scaled_dot_product_attention calls them on the CPU but returns neither the log-sum-exp nor a backward one can call
# group by group); they are used here only, and a torch without them takes the plain-autograd path.
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
)


def _cpu_flash_forward(q, k, v, bias, scale):
    """q: [B, R, L, D], k, v: [B, R, S, D], bias: broadcastable to [B, R, L, S] or None -> out, lse [B, R, L]."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)


def _cpu_flash_backward(grad_out, q, k, v, out, lse, bias, scale):
    """Gradients (dq, dk, dv) of `_cpu_flash_forward`'s out, given its out and lse."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
    )


def _explicit_backward(grad_out, grad_lse, q, k, v, out, lse, bias, scale):
    """Gradients (dq, dk, dv) of one group when its log-sum-exp has a gradient too (joint attention merges the video
    part with the text part through it): dS = P * (dP - rowsum(dO * O) + dlse), in float32 (float64 for float64)."""
    compute = _float_for(q.dtype)
    qc, kc, vc, go = q.to(compute), k.to(compute), v.to(compute), grad_out.to(compute)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(compute)
    probs = torch.exp(scores - lse.to(compute).unsqueeze(-1))  # [B, R, L, S]
    grad_v = torch.matmul(probs.transpose(-1, -2), go)
    delta = (go * out.to(compute)).sum(-1) - grad_lse.to(compute)  # [B, R, L]
    grad_scores = probs * (torch.matmul(go, vc.transpose(-1, -2)) - delta.unsqueeze(-1))
    grad_q = torch.matmul(grad_scores, kc) * scale
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), qc) * scale
    return grad_q, grad_k, grad_v


class _CpuGatherAttention(torch.autograd.Function):
    """Block-gather attention on the CPU: forward and backward group by group on the fused kernels.

    forward: q, k, v [B, H, N, D] -> out [B, H, N, D], lse [B, H, N] (float32; float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: BlockSparseLayout, scale: float):
        batch, heads, n, d = q.shape
        bq, bk = layout.block_q, layout.block_k
        q_blocks = _blocks(q, layout.num_q_blocks, bq)
        kv_blocks = (_blocks(k, layout.num_k_blocks, bk), _blocks(v, layout.num_k_blocks, bk))
        out = q.new_empty(q_blocks.shape)
        lse = q.new_empty(q_blocks.shape[:3], dtype=_float_for(q.dtype))
        for step in layout.gather_plan(n, heads):
            (qg,), (kg, vg) = _gathered(step, kv_blocks, (q_blocks,), batch)
            part, part_lse = _cpu_flash_forward(qg, kg, vg, _additive_mask(step, q.dtype, bq), scale)
            _scatter(step, out, part)
            _scatter(step, lse, part_lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        ctx.set_materialize_grads(False)
        return _unblock(out, heads, n), _unblock(lse, heads, n)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out_blocks, lse_blocks = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        batch, heads, n, d = q.shape
        bq, bk = layout.block_q, layout.block_k
        if grad_out is None:
            grad_out = torch.zeros_like(q)
        q_side = (_blocks(q, layout.num_q_blocks, bq), out_blocks, _blocks(grad_out, layout.num_q_blocks, bq),
                  lse_blocks)  # fmt: skip
        if grad_lse is not None:
            q_side += (_blocks(grad_lse.unsqueeze(-1), layout.num_q_blocks, bq).squeeze(-1),)
        kv_blocks = (_blocks(k, layout.num_k_blocks, bk), _blocks(v, layout.num_k_blocks, bk))
        # key and value gradients gather from many groups: summed in float32 (float64 for float64 inputs)
        accumulate = _float_for(q.dtype)
        grad_q = q.new_empty(q_side[0].shape)
        grad_k = torch.zeros(kv_blocks[0].shape, dtype=accumulate, device=q.device)
        grad_v = torch.zeros(kv_blocks[1].shape, dtype=accumulate, device=q.device)
        for step in layout.gather_plan(n, heads):
            gathered, (kg, vg) = _gathered(step, kv_blocks, q_side, batch)
            qg, og, gog, lg = gathered[:4]
            bias = _additive_mask(step, q.dtype, bq)
            if grad_lse is None:
                dq, dk, dv = _cpu_flash_backward(gog, qg, kg, vg, og, lg, bias, scale)
            else:
                dq, dk, dv = _explicit_backward(gog, gathered[4], qg, kg, vg, og, lg, bias, scale)
            _scatter(step, grad_q, dq.to(q.dtype))
            flat = (batch, step.kv_index.shape[0], bk, d)
            grad_k.index_add_(1, step.kv_index, dk.reshape(flat).to(accumulate))
            grad_v.index_add_(1, step.kv_index, dv.reshape(flat).to(accumulate))
        return (_unblock(grad_q, heads, n), _unblock(grad_k.to(k.dtype), heads, n),
                _unblock(grad_v.to(v.dtype), heads, n), None, None)  # fmt: skip


def _autograd_gather_attention(q, k, v, layout: BlockSparseLayout, scale: float, return_lse: bool):
    """The gathers under plain autograd (a GPU, torch.compile): SDPA per group, or with `return_lse` an explicit
    softmax in float32 (float64 for float64) that yields the log-sum-exp too."""
    batch, heads, n, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    compute = _float_for(q.dtype)
    q_blocks = _blocks(q, layout.num_q_blocks, bq)
    kv_blocks = (_blocks(k, layout.num_k_blocks, bk), _blocks(v, layout.num_k_blocks, bk))
    out = q.new_empty(q_blocks.shape)
    lse_out = q.new_empty(q_blocks.shape[:3], dtype=compute) if return_lse else None
    for step in layout.gather_plan(n, heads):
        (qg,), (kg, vg) = _gathered(step, kv_blocks, (q_blocks,), batch)
        keep = _key_mask(step, bq)
        if not return_lse:
            part = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=keep, scale=scale)
            _scatter(step, out, part)
            continue
        scores = torch.matmul(qg.to(compute), kg.to(compute).transpose(-1, -2)) * scale  # [B, H, G*bq, U*bk]
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        part = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype), vg)
        _scatter(step, out, part)
        _scatter(step, lse_out, lse)
    return _unblock(out, heads, n), _unblock(lse_out, heads, n) if return_lse else None
