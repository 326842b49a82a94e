"""Triton block-sparse flash attention: forward, and the FlashAttention-2 backward (dk/dv pass, dq pass).

Each program owns one query block (forward, dq) or one key block (dk/dv) of one (batch, head) and walks only the
tiles its CSR list names (`BlockSparseLayout.kv_indices` / `q_indices`), with an online softmax in fp32.
Layouts: q, k, v, o, do, dq, dk, dv: [B, H, N, D] with any strides (a [B, N, H, D] tensor passed as a transposed
view works without a copy); lse, delta: [B, H, N] float32, natural log. Head dims that are not a power of two
(40, 80) are padded inside the kernel with masked loads; the partial last block is masked, never read past N.
The torch reference is `block_sparse_attention(..., backend="torch")`; tests compare against it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl


LOG2E = 1.4426950408889634


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_COUNTS, KV_INDICES,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, slb, slh,
    s_cnt_h, s_idx_h, s_idx_q,
    H, N, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PER_HEAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    mh = h if PER_HEAD else 0
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < N) & d_ok,
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.load(KV_COUNTS + mh * s_cnt_h + qb)
    index_row = KV_INDICES + mh * s_idx_h + qb * s_idx_q
    for i in range(count):
        kb = tl.load(index_row + i)
        offs_k = kb * BLOCK_N + offs_n
        k_ok = offs_k < N
        k = tl.load(
            K + b * skb + h * skh + offs_k[:, None] * skn + offs_d[None, :] * skd,
            mask=k_ok[:, None] & d_ok,
            other=0.0,
        )
        v = tl.load(
            V + b * svb + h * svh + offs_k[:, None] * svn + offs_d[None, :] * svd,
            mask=k_ok[:, None] & d_ok,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    m_ok = offs_m < N
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
        acc.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok,
    )
    tl.store(LSE + b * slb + h * slh + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_COUNTS, Q_INDICES,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod, slb, slh,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    s_cnt_h, s_idx_h, s_idx_k,
    H, N, D, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PER_HEAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILE_N: tl.constexpr, SUB_M: tl.constexpr,
):  # fmt: skip
    # Each program owns TILE_N keys of one key block (the block's list of query blocks is shared by its tiles):
    # a smaller dk/dv accumulator than the whole block, and more programs.
    kb = tl.program_id(0) // (BLOCK_N // TILE_N)
    part = tl.program_id(0) % (BLOCK_N // TILE_N)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    mh = h if PER_HEAD else 0
    offs_k = kb * BLOCK_N + part * TILE_N + tl.arange(0, TILE_N)
    offs_m0 = tl.arange(0, SUB_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    k_ok = offs_k < N
    k = tl.load(
        K + b * skb + h * skh + offs_k[:, None] * skn + offs_d[None, :] * skd, mask=k_ok[:, None] & d_ok, other=0.0
    )
    v = tl.load(
        V + b * svb + h * svh + offs_k[:, None] * svn + offs_d[None, :] * svd, mask=k_ok[:, None] & d_ok, other=0.0
    )
    dk = tl.zeros([TILE_N, BLOCK_D], tl.float32)
    dv = tl.zeros([TILE_N, BLOCK_D], tl.float32)
    count = tl.load(Q_COUNTS + mh * s_cnt_h + kb)
    index_row = Q_INDICES + mh * s_idx_h + kb * s_idx_k
    for i in range(count):
        qb = tl.load(index_row + i)
        # SUB_M-row slices of the query block: smaller live tiles (registers) than the whole block at once
        for j in tl.static_range(BLOCK_M // SUB_M):
            offs_m = qb * BLOCK_M + j * SUB_M + offs_m0
            m_ok = offs_m < N
            q = tl.load(
                Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok,
                other=0.0,
            )
            do = tl.load(
                DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod,
                mask=m_ok[:, None] & d_ok,
                other=0.0,
            )
            lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=m_ok, other=0.0)
            # Transposed tile: s_t[key, query], so dk and dv accumulate without transposing p.
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            p_t = tl.exp2(s_t - lse[None, :])
            p_t = tl.where(k_ok[:, None] & m_ok[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(
        DK + b * sdkb + h * sdkh + offs_k[:, None] * sdkn + offs_d[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=k_ok[:, None] & d_ok,
    )
    tl.store(
        DV + b * sdvb + h * sdvh + offs_k[:, None] * sdvn + offs_d[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=k_ok[:, None] & d_ok,
    )


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_COUNTS, KV_INDICES,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod, slb, slh,
    sdqb, sdqh, sdqn, sdqd,
    s_cnt_h, s_idx_h, s_idx_q,
    H, N, D, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PER_HEAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILE_M: tl.constexpr, SUB_N: tl.constexpr,
):  # fmt: skip
    # Each program owns TILE_M queries of one query block (see the dk/dv kernel).
    qb = tl.program_id(0) // (BLOCK_M // TILE_M)
    part = tl.program_id(0) % (BLOCK_M // TILE_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    mh = h if PER_HEAD else 0
    offs_m = qb * BLOCK_M + part * TILE_M + tl.arange(0, TILE_M)
    offs_n = tl.arange(0, SUB_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    m_ok = offs_m < N
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok, other=0.0
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod,
        mask=m_ok[:, None] & d_ok,
        other=0.0,
    )
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([TILE_M, BLOCK_D], tl.float32)
    count = tl.load(KV_COUNTS + mh * s_cnt_h + qb)
    index_row = KV_INDICES + mh * s_idx_h + qb * s_idx_q
    for i in range(count):
        kb = tl.load(index_row + i)
        # SUB_N-key slices of the key block (see the dk/dv kernel)
        for j in tl.static_range(BLOCK_N // SUB_N):
            offs_k = kb * BLOCK_N + j * SUB_N + offs_n
            k_ok = offs_k < N
            k = tl.load(
                K + b * skb + h * skh + offs_k[:, None] * skn + offs_d[None, :] * skd,
                mask=k_ok[:, None] & d_ok,
                other=0.0,
            )
            v = tl.load(
                V + b * svb + h * svh + offs_k[:, None] * svn + offs_d[None, :] * svd,
                mask=k_ok[:, None] & d_ok,
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(k_ok[None, :] & m_ok[:, None], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=m_ok[:, None] & d_ok,
    )


PASSES = ("forward", "dkdv", "dq")
# Launch configurations measured per GPU model (`benchmarks/block_sparse_attention.py --sweep --write-launch-configs`),
# keyed by `torch.cuda.get_device_name()` and then by `_config_key`. Entries missing for a GPU or a shape fall back to
# the rule in `_default_launch`.
LAUNCH_CONFIGS_FILE = Path(__file__).with_name("launch_configs.json")


def _config_key(pass_name: str, block_q: int, block_k: int, head_dim: int, element_size: int) -> str:
    return f"{pass_name}:e{element_size}:d{max(16, triton.next_power_of_2(head_dim))}:b{block_q}x{block_k}"


@functools.lru_cache(maxsize=None)
def _tuned_launch_table(device_name: str) -> dict[str, dict[str, int]]:
    if not LAUNCH_CONFIGS_FILE.exists():
        return {}
    return json.loads(LAUNCH_CONFIGS_FILE.read_text()).get(device_name, {})


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str | None:
    # a host-side driver query, cached: no device sync on the hot path
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _default_launch(
    pass_name: str, block_q: int, block_k: int, head_dim: int, element_size: int = 2
) -> dict[str, int]:
    # Forward, H100 and H200, bf16, 128x128 tiles, D=128 (benchmark sweeps): 8 warps and 3 stages is the fastest
    # (H200: 5.2 ms vs 5.5 at 2 stages, 8.8+ at 4 warps); 4 stages overflows shared memory. The backward passes run 2
    # stages above D=64 (3 overflow at 128-row tiles). H200 sweep, whole backward times with the other pass at its
    # old default: dk/dv with a whole 128-key block per program computed in 64-query-row slices, 15.5 ms vs 35.1 ms
    # in whole 128-row slices (their fp32 tiles spill) and 19.0+ ms with 64-key programs; dq fastest with whole
    # blocks (35.1 ms, every other config 35.6-57 ms). fp32 tiles are twice the bytes: 3 stages at D=64 asked for
    # 256 KiB of the 227 KiB, so fp32 runs unpipelined.
    big = block_q * block_k >= 128 * 64 or head_dim > 64
    backward = pass_name != "forward"
    stages = 1 if element_size > 2 else (2 if backward and head_dim > 64 else 3)
    config = {"num_warps": 8 if big else 4, "num_stages": stages}
    if pass_name == "dkdv":  # a program's keys (tile) and the query rows it computes at once (sub)
        config |= {"tile": block_k, "sub": min(block_q, 64)}
    elif pass_name == "dq":  # a program's queries (tile) and the key rows it computes at once (sub)
        config |= {"tile": block_q, "sub": block_k}
    return config


def launch_config(
    pass_name: str, block_q: int, block_k: int, head_dim: int, element_size: int, device: torch.device
) -> dict[str, int]:
    """The launch configuration of one pass ("forward", "dkdv" or "dq"): the measured one for this GPU model and
    shape from `launch_configs.json` where there is one, else the default rule."""
    if pass_name not in PASSES:
        raise ValueError(f"pass_name={pass_name!r} is not allowed: expected one of {PASSES}")
    config = _default_launch(pass_name, block_q, block_k, head_dim, element_size)
    name = _device_name(device)
    if name is not None:
        config |= _tuned_launch_table(name).get(_config_key(pass_name, block_q, block_k, head_dim, element_size), {})
    return config


def _check_slices(pass_name: str, tile: int, sub: int, tile_of: int, sub_of: int) -> None:
    # tile: rows per program, a divisor of its block; sub: rows of the other block computed at once
    for field, value, block in (("tile", tile, tile_of), ("sub", sub, sub_of)):
        if block % value or value < 16:
            raise ValueError(
                f"launch {pass_name} {field}={value} is not allowed: "
                f"expected a divisor of the block size ({block}) >= 16"
            )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full precision (no TF32) so they match the reference; halves use tensor cores as they are.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    launch: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [B, H, N, D] (any strides) -> out [B, H, N, D] (q's dtype), lse [B, H, N] float32.

    `launch` overrides `num_warps` / `num_stages` (the benchmark's sweep times the choices).
    """
    batch, heads, n, d = q.shape
    out = torch.empty((batch, heads, n, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, n), device=q.device, dtype=torch.float32)
    grid = (kv_counts.shape[1], batch * heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, kv_counts, kv_indices,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out), lse.stride(0), lse.stride(1),
        kv_counts.stride(0), kv_indices.stride(0), kv_indices.stride(1),
        heads, n, d, scale * LOG2E,
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=max(16, triton.next_power_of_2(d)),
        PER_HEAD=kv_counts.shape[0] > 1, DOT_PRECISION=_dot_precision(q.dtype),
        **(launch_config("forward", block_q, block_k, d, q.element_size(), q.device) | (launch or {})),
    )  # fmt: skip
    return out, lse


def triton_backward(
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
    launch: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq, dk, dv ([B, H, N, D], input dtypes) of the forward above.

    `launch` overrides the launch configuration: flat keys apply to both passes, and "dkdv" / "dq" hold one pass's
    own (`num_warps`, `num_stages`, `tile`, `sub`). `tile` is the rows of its own block one program owns (keys in the
    dk/dv pass, queries in the dq pass; a divisor of the block, at least 16) and `sub` the rows of the other block
    it computes at once (query rows in dk/dv, key rows in dq). By default each pass takes the measured
    configuration for this GPU (`launch_config`), else the default rule.

    delta: [B, H, N] float32 = rowsum(dO * O) - dLSE (FA2's preprocessing, plus the gradient reaching the LSE
    output when partial results were merged through it).
    """
    batch, heads, n, d = q.shape
    lse = lse.contiguous()
    delta = delta.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    block_d = max(16, triton.next_power_of_2(d))
    per_head = kv_counts.shape[0] > 1
    precision = _dot_precision(q.dtype)
    launch = dict(launch or {})
    per_pass = {name: launch.pop(name, {}) for name in ("dkdv", "dq")}
    configs = {
        name: launch_config(name, block_q, block_k, d, q.element_size(), q.device) | launch | per_pass[name]
        for name in ("dkdv", "dq")
    }
    dkdv, dq_config = configs["dkdv"], configs["dq"]
    tile_n, sub_m = dkdv.pop("tile"), dkdv.pop("sub")
    tile_m, sub_n = dq_config.pop("tile"), dq_config.pop("sub")
    _check_slices("dkdv", tile_n, sub_m, block_k, block_q)
    _check_slices("dq", tile_m, sub_n, block_q, block_k)
    common = (*_strides4(q), *_strides4(k), *_strides4(v), *_strides4(grad_out), lse.stride(0), lse.stride(1))
    _bwd_dkdv_kernel[(q_counts.shape[1] * (block_k // tile_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, q_counts, q_indices,
        *common, *_strides4(dk), *_strides4(dv),
        q_counts.stride(0), q_indices.stride(0), q_indices.stride(1),
        heads, n, d, scale * LOG2E, scale,
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, PER_HEAD=per_head, DOT_PRECISION=precision,
        TILE_N=tile_n, SUB_M=sub_m, **dkdv,
    )  # fmt: skip
    _bwd_dq_kernel[(kv_counts.shape[1] * (block_q // tile_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, kv_counts, kv_indices,
        *common, *_strides4(dq),
        kv_counts.stride(0), kv_indices.stride(0), kv_indices.stride(1),
        heads, n, d, scale * LOG2E, scale,
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, PER_HEAD=per_head, DOT_PRECISION=precision,
        TILE_M=tile_m, SUB_N=sub_n, **dq_config,
    )  # fmt: skip
    return dq, dk, dv
