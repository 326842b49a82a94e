"""Block-sparse attention against independent references (plain SDPA, per-block SDPA, hand-computed CSR)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from diffattn.kernels import BlockSparseLayout, block_sparse_attention, merge_attention_outputs


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ["gather"] + (["triton"] if INTERPRET else [])


def random_mask(generator, heads, q_blocks, k_blocks, density):
    shape = (q_blocks, k_blocks) if heads is None else (heads, q_blocks, k_blocks)
    mask = torch.rand(shape, generator=generator) < density
    # keep one random key block per query row so every row is valid
    rows = torch.randint(0, k_blocks, shape[:-1], generator=generator)
    mask.scatter_(-1, rows.unsqueeze(-1), True)
    return mask


def qkv(generator, b, h, n, d, dtype=torch.float32, requires_grad=False):
    return [torch.randn(b, h, n, d, generator=generator, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def plain_masked_attention(q, k, v, token_keep, scale):
    """Independent spec: SDPA with the token mask, in float64."""
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=token_keep, scale=scale)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~token_keep, float("-inf")), dim=-1)
    return out, lse


def expand_mask(mask, block, n):
    m = mask.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :n]
    return m if m.ndim == 3 else m.unsqueeze(0)


# ---- layout ----------------------------------------------------------------------------------------------------


def test_layout_csr_matches_hand_computed_case():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    layout = BlockSparseLayout(mask, block_size=(64, 32))
    assert (layout.block_q, layout.block_k) == (64, 32)
    assert layout.kv_counts.tolist() == [[2, 1, 4]]
    assert layout.kv_indices.tolist() == [[[0, 2, 2, 2], [3, 3, 3, 3], [0, 1, 2, 3]]]  # padded with the last valid
    assert layout.q_counts.tolist() == [[2, 1, 2, 2]]
    assert layout.q_indices[0, :, :2].tolist() == [[0, 2], [2, 2], [0, 2], [1, 2]]
    assert layout.density == pytest.approx(7 / 12)
    assert layout.kv_indices.dtype == torch.int32 and layout.kv_counts.dtype == torch.int32


def test_layout_per_head_and_token_mask():
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0] = torch.eye(2, dtype=torch.bool)
    mask[1] = True
    layout = BlockSparseLayout(mask, block_size=16)
    assert layout.per_head and layout.num_heads == 2
    assert layout.kv_counts.tolist() == [[1, 1], [2, 2]]
    tokens = layout.token_mask(20, 20)
    assert tokens.shape == (2, 20, 20)
    assert tokens[0, :16, :16].all() and not tokens[0, :16, 16:].any() and tokens[0, 16:, 16:].all()
    assert tokens[1].all()


@pytest.mark.parametrize(
    "mask, block_size, message",
    [
        (torch.ones(2, 2), 64, "block_mask must be a bool tensor"),
        (torch.ones(2, dtype=torch.bool), 64, r"must be \[Qb, Kb\] or \[H, Qb, Kb\]"),
        (torch.ones(2, 2, dtype=torch.bool), 48, r"block_size=48 is not allowed: expected one of \(16, 32, 64, 128\)"),
        (torch.ones(2, 2, dtype=torch.bool), (64, 100), r"block_size=\(64, 100\) is not allowed"),
        (torch.tensor([[True, False], [False, False]]), 64, "no key block for query block 1: every query block"),
        (torch.tensor([[[True]], [[False]]]), 64, "no key block for query block 0 of head 1"),
    ],
)
def test_layout_validation(mask, block_size, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseLayout(mask, block_size)


def test_sequence_and_input_validation():
    layout = BlockSparseLayout(torch.ones(3, 3, dtype=torch.bool), 64)
    g = torch.Generator().manual_seed(0)
    q, k, v = qkv(g, 1, 2, 150, 32)
    with pytest.raises(ValueError, match=r"layout is 3x3 blocks of 64x64, but 100 queries and 100 keys need 2x2"):
        block_sparse_attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], layout)
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        block_sparse_attention(q, k, v, layout, backend="cuda")
    with pytest.raises(ValueError, match="qkv_format='nhd' is not allowed"):
        block_sparse_attention(q, k, v, layout, qkv_format="nhd")
    with pytest.raises(ValueError, match="same shape|one shape"):
        block_sparse_attention(q, k[:, :1], v, layout)
    with pytest.raises(ValueError, match="share a dtype"):
        block_sparse_attention(q, k.double(), v, layout)
    with pytest.raises(ValueError, match="head dim 8 is not allowed"):
        block_sparse_attention(q[..., :8], k[..., :8], v[..., :8], layout)
    per_head = BlockSparseLayout(torch.ones(3, 3, 3, dtype=torch.bool), 64)
    with pytest.raises(ValueError, match="layout has 3 heads, the inputs have 2"):
        block_sparse_attention(q, k, v, per_head)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layout = BlockSparseLayout(torch.ones(1, 1, dtype=torch.bool), 64)
    q = torch.randn(1, 1, 64, 32)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        block_sparse_attention(q, q, q, layout, backend="triton")


# ---- the torch reference against independent computations ------------------------------------------------------


def test_reference_with_full_mask_is_dense_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = qkv(g, 2, 3, 150, 32)
    layout = BlockSparseLayout(torch.ones(3, 3, dtype=torch.bool), 64)
    out = block_sparse_attention(q, k, v, layout, backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_reference_with_block_diagonal_mask_is_per_block_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = qkv(g, 1, 2, 96, 16)
    layout = BlockSparseLayout(torch.eye(3, dtype=torch.bool), 32)
    out = block_sparse_attention(q, k, v, layout, backend="torch")
    for i in range(3):
        s = slice(32 * i, 32 * (i + 1))
        expected = F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s])
        torch.testing.assert_close(out[:, :, s], expected, rtol=1e-5, atol=1e-5)


def test_reference_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    q, k, v = qkv(g, 1, 2, 40, 16, dtype=torch.float64, requires_grad=True)
    layout = BlockSparseLayout(random_mask(g, 2, 3, 3, 0.4), 16)

    def fn(q, k, v):
        out, lse = block_sparse_attention(q, k, v, layout, backend="torch", return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---- every backend against the reference -----------------------------------------------------------------------


CASES = [
    # (batch, heads, n, head_dim, block, per_head, density)
    (2, 2, 200, 32, 64, False, 0.4),
    (1, 3, 256, 40, 64, True, 0.3),
    (1, 2, 100, 80, 32, False, 0.5),
    (2, 1, 130, 64, (32, 64), True, 0.5),
    (1, 2, 129, 128, 64, False, 0.6),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"n{c[2]}-d{c[3]}" for c in CASES])
def test_forward_and_lse_match_reference(backend, case):
    b, h, n, d, block, per_head, density = case
    g = torch.Generator().manual_seed(n * d)
    bq, bk = (block, block) if isinstance(block, int) else block
    mask = random_mask(g, h if per_head else None, math.ceil(n / bq), math.ceil(n / bk), density)
    layout = BlockSparseLayout(mask, block)
    q, k, v = qkv(g, b, h, n, d)
    token_keep = layout.token_mask(n, n).unsqueeze(0)
    expected, expected_lse = plain_masked_attention(q, k, v, token_keep, d**-0.5)
    out, lse = block_sparse_attention(q, k, v, layout, backend=backend, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, h, n) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-4)
    plain = block_sparse_attention(q, k, v, layout, backend=backend, scale=0.3)
    torch.testing.assert_close(
        plain.double(), plain_masked_attention(q, k, v, token_keep, 0.3)[0], rtol=1e-4, atol=2e-5
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_gradients_match_reference(backend, per_head):
    g = torch.Generator().manual_seed(7)
    b, h, n, d = 2, 2, 150, 40
    mask = random_mask(g, h if per_head else None, 3, 3, 0.5)
    layout = BlockSparseLayout(mask, 64)
    q, k, v = qkv(g, b, h, n, d, requires_grad=True)
    grad_out, grad_lse = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, generator=g)

    def grads(be):
        out, lse = block_sparse_attention(q, k, v, layout, backend=be, return_lse=True)
        return torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), (q, k, v))

    for got, want in zip(grads(backend), grads("torch")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_bnhd_format_matches_bhnd(backend):
    g = torch.Generator().manual_seed(11)
    q, k, v = qkv(g, 1, 2, 96, 32)
    layout = BlockSparseLayout(random_mask(g, None, 3, 3, 0.5), 32)
    expected = block_sparse_attention(q, k, v, layout, backend="torch")
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # diffusers' [B, N, H, D]
    out = block_sparse_attention(qt, kt, vt, layout, backend=backend, qkv_format="bnhd")
    assert out.shape == qt.shape
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)


def test_gather_fp64_and_bf16():
    g = torch.Generator().manual_seed(12)
    layout = BlockSparseLayout(random_mask(g, None, 4, 4, 0.4), 32)
    q, k, v = qkv(g, 1, 2, 110, 64, dtype=torch.float64)
    token_keep = layout.token_mask(110, 110).unsqueeze(0)
    expected, _ = plain_masked_attention(q, k, v, token_keep, 64**-0.5)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, backend="gather"), expected)
    out = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, backend="gather")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)


GRADIENT_CASES = [  # (b, h, n, d, block, per_head, dtype, rtol, atol)
    (2, 2, 150, 40, 64, False, torch.float32, 1e-4, 1e-5),  # ragged tail: padded keys masked
    (1, 3, 160, 24, 16, True, torch.float32, 1e-4, 1e-5),  # per-head layouts, radial's 16-token blocks
    (1, 2, 130, 32, (32, 64), False, torch.float32, 1e-4, 1e-5),  # query and key blocks of different sizes
    (1, 2, 128, 32, 32, True, torch.float64, 1e-7, 1e-9),
    (1, 2, 128, 64, 32, False, torch.bfloat16, 0.0, 4e-2),
]


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=lambda c: f"n{c[2]}-d{c[3]}-{str(c[6])[6:]}")
@pytest.mark.parametrize("lse_gradient", [False, True])
def test_gather_gradients_match_plain_masked_attention(case, lse_gradient):
    """The gather path's gradients (on the CPU: the fused kernels group by group; with a gradient on the
    log-sum-exp, as joint attention's merge gives it, the explicit per-group backward) against autograd through
    SDPA with the token mask in float64."""
    b, h, n, d, block, per_head, dtype, rtol, atol = case
    g = torch.Generator().manual_seed(n + d)
    bq, bk = (block, block) if isinstance(block, int) else block
    mask = random_mask(g, h if per_head else None, math.ceil(n / bq), math.ceil(n / bk), 0.4)
    layout = BlockSparseLayout(mask, block)
    q, k, v = qkv(g, b, h, n, d, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(b, h, n, d, generator=g, dtype=dtype)
    grad_lse = torch.randn(b, h, n, generator=g) if lse_gradient else None
    out, lse = block_sparse_attention(q, k, v, layout, backend="gather", return_lse=True)
    loss = (out.double() * grad_out.double()).sum() + ((lse.double() * grad_lse.double()).sum() if lse_gradient else 0)
    got = torch.autograd.grad(loss, (q, k, v))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    token_keep = layout.token_mask(n, n).unsqueeze(0)
    ref_out, ref_lse = plain_masked_attention(q64, k64, v64, token_keep, d**-0.5)
    ref_loss = (ref_out * grad_out.double()).sum() + ((ref_lse * grad_lse.double()).sum() if lse_gradient else 0)
    want = torch.autograd.grad(ref_loss, (q64, k64, v64))
    for name, a, e in zip("qkv", got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol, msg=f"d{name}")


def banded_mask(heads, q_blocks, k_blocks, widths):
    """Per head h, query block i keeps key blocks within widths[h] of i (a sliding window), plus block 0 (a sink)."""
    i = torch.arange(q_blocks).view(-1, 1)
    j = torch.arange(k_blocks).view(1, -1)
    mask = torch.stack([(i - j).abs() <= w for w in widths[:heads]])
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
@pytest.mark.parametrize("lse_gradient", [False, True])
def test_gather_groups_of_query_blocks_match_plain_masked_attention(group_size, lse_gradient):
    """Consecutive query blocks run as one call against the union of their key blocks, each masked to its own:
    outputs, log-sum-exps and gradients against autograd through SDPA with the token mask in float64, for every
    group size, on per-head windows of different widths (unions padded to the widest head), a ragged tail and a
    last group shorter than the others."""
    g = torch.Generator().manual_seed(group_size)
    b, h, n, d, block = 2, 3, 16 * 11 - 5, 24, 16
    mask = banded_mask(h, 11, 11, (0, 1, 3))
    layout = BlockSparseLayout(mask, block, gather_group_size=group_size)
    q, k, v = qkv(g, b, h, n, d, requires_grad=True)
    grad_out, grad_lse = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, generator=g)
    out, lse = block_sparse_attention(q, k, v, layout, backend="gather", return_lse=True)
    loss = (out.double() * grad_out.double()).sum() + ((lse.double() * grad_lse.double()).sum() if lse_gradient else 0)
    got = torch.autograd.grad(loss, (q, k, v))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = plain_masked_attention(q64, k64, v64, layout.token_mask(n, n).unsqueeze(0), d**-0.5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    ref_loss = (ref_out * grad_out.double()).sum() + ((ref_lse * grad_lse.double()).sum() if lse_gradient else 0)
    for name, a, e in zip("qkv", got, torch.autograd.grad(ref_loss, (q64, k64, v64))):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=f"d{name}")

    from diffattn.kernels.block_sparse_gather import _autograd_gather_attention  # the GPU / torch.compile path

    auto_out, auto_lse = _autograd_gather_attention(q, k, v, layout, d**-0.5, True)
    torch.testing.assert_close(auto_out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(auto_lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_gather_group_size_is_chosen_from_the_mask():
    """The largest group whose union tiles stay within 1.3x the mask's own. Band |i - j| <= 2, 16 blocks: 74 tiles;
    pairs of rows take unions of 4, 6, ..., 6, 4 blocks (88 tiles, 1.19x), fours 6, 8, 8, 6 (112, 1.51x): pairs.
    Band |i - j| <= 1: 46 tiles, pairs 3, 4, ..., 4, 3 (60, 1.304x): single blocks. A random mask shares few key
    blocks between neighbours: single blocks. The radial mask groups by four."""
    from diffattn.methods.radial_mask import radial_block_mask

    i = torch.arange(16)
    distance = (i.view(-1, 1) - i.view(1, -1)).abs()
    assert BlockSparseLayout(distance <= 2, 16).gather_group_size() == 2
    assert BlockSparseLayout(distance <= 1, 16).gather_group_size() == 1
    g = torch.Generator().manual_seed(3)
    assert BlockSparseLayout(random_mask(g, None, 64, 64, 0.1), 16).gather_group_size() == 1
    radial = radial_block_mask(9, 256, block_size=16, decay_factor=0.25, sink_frames=1)
    assert BlockSparseLayout(radial, 16).gather_group_size() == 4
    groups = BlockSparseLayout(radial, 16).gather_groups()
    assert [int(x) for x in groups[1].q_blocks] == [4, 5, 6, 7]
    union = radial[4:8].any(0).nonzero().squeeze(1)
    assert groups[1].kv_blocks[0].tolist() == union.tolist()
    assert torch.equal(groups[1].kv_valid[0], radial[4:8][:, union])
    with pytest.raises(ValueError, match="gather_group_size=3 is not allowed"):
        BlockSparseLayout(distance <= 1, 16, gather_group_size=3)


def test_gather_backward_is_one_node_not_one_per_group():
    """On the CPU the whole gather attention is one autograd node: differentiating its per-group gathers instead
    gives every group a full-size key gradient and the backward a cost of groups x sequence length (it was no faster
    than dense attention at 19% density). The graph between the output and q, k, v stays the same size as the
    layout grows."""

    def graph_size(num_blocks):
        layout = BlockSparseLayout(torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril(), 16)
        q, k, v = (torch.randn(1, 2, 16 * num_blocks, 32, requires_grad=True) for _ in range(3))
        seen, todo = set(), [block_sparse_attention(q, k, v, layout, backend="gather").grad_fn]
        while todo:
            node = todo.pop()
            if node is not None and node not in seen:
                seen.add(node)
                todo.extend(next_node for next_node, _ in node.next_functions)
        return len(seen)

    assert graph_size(4) == graph_size(32) <= 8


def test_gather_autograd_path_matches_reference():
    """The gathers under plain autograd, the path a GPU and torch.compile take, run here on the CPU."""
    from diffattn.kernels.block_sparse_gather import _autograd_gather_attention

    g = torch.Generator().manual_seed(21)
    b, h, n, d = 1, 2, 150, 32
    layout = BlockSparseLayout(random_mask(g, h, 3, 3, 0.5), 64)
    q, k, v = qkv(g, b, h, n, d, requires_grad=True)
    grad_out, grad_lse = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, generator=g)
    for return_lse in (False, True):
        out, lse = _autograd_gather_attention(q, k, v, layout, d**-0.5, return_lse)
        ref_out, ref_lse = block_sparse_attention(q, k, v, layout, backend="torch", return_lse=True)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        loss = (out * grad_out).sum() + ((lse * grad_lse).sum() if return_lse else 0)
        ref_loss = (ref_out * grad_out).sum() + ((ref_lse * grad_lse).sum() if return_lse else 0)
        for a, e in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q, k, v))):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_merging_two_key_sets_through_lse_equals_attention_over_both():
    """Attention over keys A and keys B, merged by LSE, equals attention over A union B (text keys, context
    parallel)."""
    g = torch.Generator().manual_seed(13)
    q, k, v = qkv(g, 1, 2, 128, 32)
    mask_a = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    mask_b = torch.tensor([[0, 1], [1, 0]], dtype=torch.bool)
    out_a, lse_a = block_sparse_attention(q, k, v, BlockSparseLayout(mask_a, 64), return_lse=True)
    out_b, lse_b = block_sparse_attention(q, k, v, BlockSparseLayout(mask_b, 64), return_lse=True)
    merged, lse = merge_attention_outputs(out_a, lse_a, out_b, lse_b)
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(merged, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp((q @ k.transpose(-1, -2)) / math.sqrt(32), -1))


def test_auto_is_gather_on_cpu_and_matches():
    from diffattn.kernels import resolve_backend

    cuda = torch.device("cuda")
    assert resolve_backend("auto", torch.device("cpu")) == "gather"
    assert resolve_backend("auto", cuda, dtype=torch.bfloat16, head_dim=128) == "triton"
    assert resolve_backend("auto", cuda, dtype=torch.float16, head_dim=80) == "triton"
    # the H100/H200 measurements: fp32 and head dims over 128 go to FlexAttention, fp64 to the gather path
    assert resolve_backend("auto", cuda, dtype=torch.float32) == "flex"
    assert resolve_backend("auto", cuda, dtype=torch.float16, head_dim=256) == "flex"
    assert resolve_backend("auto", cuda, dtype=torch.float64) == "gather"


class _NoHostSync(torch.overrides.TorchFunctionMode):
    """Fails on any op that reads tensor values back to the host."""

    banned = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.nonzero, torch.Tensor.any, torch.Tensor.all}  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.banned:
            raise AssertionError(f"host read-back {func.__name__} in a repeated call")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_call_does_no_host_side_mask_work(backend):
    g = torch.Generator().manual_seed(14)
    layout = BlockSparseLayout(random_mask(g, 2, 4, 4, 0.4), 32)
    q, k, v = qkv(g, 1, 2, 120, 32, requires_grad=True)
    first = block_sparse_attention(q, k, v, layout, backend=backend)  # builds per-length plans once
    with _NoHostSync():
        again = block_sparse_attention(q, k, v, layout, backend=backend)
        again.sum().backward()
    torch.testing.assert_close(again, first)


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernel under TRITON_INTERPRET=1")
def test_triton_op_traces_under_torch_compile():
    g = torch.Generator().manual_seed(15)
    layout = BlockSparseLayout(random_mask(g, None, 2, 2, 0.5), 32)
    q, k, v = qkv(g, 1, 2, 64, 32, requires_grad=True)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(q, k, v):
        return block_sparse_attention(q, k, v, layout, backend="triton").square().sum()

    loss = step(q, k, v)
    loss.backward()
    expected = block_sparse_attention(q, k, v, layout, backend="torch").square().sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    dq = q.grad.clone()
    q.grad = None
    expected.backward()
    torch.testing.assert_close(dq, q.grad, rtol=1e-4, atol=1e-5)


def test_flex_eager_matches_reference(monkeypatch):
    """PyTorch's eager FlexAttention applies only mask_mod: this checks the mask_mod states the layout."""
    monkeypatch.setenv("DIFFATTN_FLEX_EAGER", "1")
    g = torch.Generator().manual_seed(16)
    layout = BlockSparseLayout(random_mask(g, 2, 4, 4, 0.4), 32)
    q, k, v = qkv(g, 1, 2, 100, 32)
    out, lse = block_sparse_attention(q, k, v, layout, backend="flex", return_lse=True)
    ref, ref_lse = block_sparse_attention(q, k, v, layout, backend="torch", return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_flex_compiled_on_cpu_uses_the_block_lists():
    """The compiled kernel reads the CSR block lists (as full blocks), not mask_mod: checked against the reference."""
    g = torch.Generator().manual_seed(17)
    layout = BlockSparseLayout(random_mask(g, None, 4, 4, 0.4), 64)
    q, k, v = qkv(g, 1, 2, 230, 64)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, layout, backend="flex")
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, layout, backend="torch"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no backward on the CPU"):
        block_sparse_attention(q.requires_grad_(), k, v, layout, backend="flex")


# ---- GPU (run when one is lent: pytest -m gpu) -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "flex", "gather"])
@pytest.mark.parametrize("d, block", [(40, 64), (64, 128), (80, 128), (128, 128)])
def test_gpu_forward_backward_match_reference(dtype, backend, d, block):
    g = torch.Generator().manual_seed(d)
    b, h, n = 2, 4, 1000  # not a multiple of the block: the partial last block is masked
    blocks = -(-n // block)
    layout = BlockSparseLayout(random_mask(g, h, blocks, blocks, 0.3), block).to("cuda")
    q, k, v = (t.to("cuda", dtype).requires_grad_() for t in qkv(g, b, h, n, d))
    grad = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    ref = block_sparse_attention(q.float(), k.float(), v.float(), layout, backend="torch")
    ref_grads = torch.autograd.grad((ref * grad.float()).sum(), (q, k, v))
    out = block_sparse_attention(q, k, v, layout, backend=backend)
    grads = torch.autograd.grad((out.float() * grad.float()).sum(), (q, k, v))
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol * 5, atol=tol * 5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "launch",
    [
        {"dkdv": {"tile": 64, "sub": 32}, "dq": {"tile": 64, "sub": 32}},
        # (H200 sweep: 3 stages of 128-row tiles overflow shared memory, so those configs keep 2)
        {"dkdv": {"tile": 64, "sub": 128, "num_warps": 4, "num_stages": 3}, "dq": {"tile": 128, "sub": 64}},
        {"dkdv": {"tile": 128, "sub": 32}, "dq": {"tile": 64, "sub": 128, "num_warps": 4, "num_stages": 3}},
    ],
)
def test_gpu_triton_backward_launch_configs_match_reference(launch):
    """The backward's tile/slice launch configurations the sweep chooses from are exact at D=128, bf16."""
    from diffattn.kernels.block_sparse_triton import triton_backward, triton_forward

    g = torch.Generator().manual_seed(7)
    b, h, n, d = 1, 4, 1000, 128
    layout = BlockSparseLayout(random_mask(g, h, 8, 8, 0.4), 128).to("cuda")
    q, k, v = (t.to("cuda", torch.bfloat16).requires_grad_() for t in qkv(g, b, h, n, d))
    grad = torch.randn(b, h, n, d, generator=g).to("cuda", torch.bfloat16)
    ref = block_sparse_attention(q.float(), k.float(), v.float(), layout, backend="torch")
    want = torch.autograd.grad(ref, (q, k, v), grad.float())
    with torch.no_grad():
        out, lse = triton_forward(q, k, v, layout.kv_counts, layout.kv_indices, 128, 128, d**-0.5)
        delta = (grad.float() * out.float()).sum(-1)
        got = triton_backward(grad, q, k, v, lse, delta, layout.kv_counts, layout.kv_indices, layout.q_counts,
                              layout.q_indices, 128, 128, d**-0.5, launch=launch)  # fmt: skip
    for name, a, w in zip("qkv", got, want):
        torch.testing.assert_close(a.float(), w.float(), rtol=0.1, atol=0.1, msg=f"d{name}")


def test_benchmark_smoke_run_writes_json(tmp_path):
    """The benchmark runs end to end (quick shape, forward) and reports every backend beside dense."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import block_sparse_attention as bench

    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--no-backward", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["torch"] == torch.__version__
    backends = {r["backend"] for r in report["results"]}
    # the radial mask groups query blocks, so its plan of one query block a call is measured beside it
    assert backends == {"dense-sdpa", "gather", "flex", "gather-single-blocks"}
    radial = [r for r in report["results"] if r.get("mask", "").startswith("radial")]
    grouped = {r["backend"]: r["gather_group_size"] for r in radial if r["backend"].startswith("gather")}
    assert grouped["gather-single-blocks"] == 1 and grouped["gather"] > 1
    assert any(r.get("mask", "").startswith("radial-") for r in report["results"])
    for row in report["results"]:
        assert row["time_ms"] > 0
        assert row["fraction_of_ideal"] == pytest.approx(row["speedup_vs_dense"] * row["density"], abs=2e-3)


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernel under TRITON_INTERPRET=1")
@pytest.mark.parametrize(
    "launch",
    [
        None,
        {"sub": 16},  # both passes: 16-row slices of the other block
        {"dkdv": {"tile": 16, "sub": 16}, "dq": {"tile": 16, "sub": 16}},  # two programs per block, in slices
        {"dkdv": {"tile": 16}, "dq": {"sub": 16}},
    ],
)
def test_triton_backward_in_slices_matches_reference_gradients(launch):
    """The backward kernels splitting each block over programs (tile) and computing it in slices (sub) give the
    reference's dq, dk, dv."""
    from diffattn.kernels.block_sparse_triton import triton_backward, triton_forward

    g = torch.Generator().manual_seed(5)
    layout = BlockSparseLayout(random_mask(g, 2, 4, 4, 0.5), 32)
    q, k, v = (t.requires_grad_() for t in qkv(g, 1, 2, 110, 32))  # 110: a partial last block
    grad = torch.randn(1, 2, 110, 32, generator=g)
    ref = block_sparse_attention(q, k, v, layout, backend="torch")
    want = torch.autograd.grad(ref, (q, k, v), grad)
    with torch.no_grad():
        out, lse = triton_forward(q, k, v, layout.kv_counts, layout.kv_indices, 32, 32, 32**-0.5)
        delta = (grad * out).sum(-1)
        got = triton_backward(grad, q, k, v, lse, delta, layout.kv_counts, layout.kv_indices, layout.q_counts,
                              layout.q_indices, 32, 32, 32**-0.5, launch=launch)  # fmt: skip
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name}")
    with pytest.raises(ValueError, match="sub=24 is not allowed"):
        triton_backward(grad, q, k, v, lse, delta, layout.kv_counts, layout.kv_indices, layout.q_counts,
                        layout.q_indices, 32, 32, 32**-0.5, launch={"sub": 24})  # fmt: skip
    with pytest.raises(ValueError, match="dq tile=8 is not allowed"):
        triton_backward(grad, q, k, v, lse, delta, layout.kv_counts, layout.kv_indices, layout.q_counts,
                        layout.q_indices, 32, 32, 32**-0.5, launch={"dq": {"tile": 8}})  # fmt: skip


def test_launch_config_takes_the_measured_table_for_the_gpu_model(tmp_path, monkeypatch):
    """A GPU model with an entry in launch_configs.json gets it (over the default rule); other models and shapes
    keep the rule."""
    import json

    from diffattn.kernels import block_sparse_triton as bst

    table = {"Fake GPU": {"dkdv:e2:d128:b128x128": {"num_warps": 4, "tile": 64, "sub": 32}}}
    (tmp_path / "launch_configs.json").write_text(json.dumps(table))
    monkeypatch.setattr(bst, "LAUNCH_CONFIGS_FILE", tmp_path / "launch_configs.json")
    monkeypatch.setattr(bst, "_device_name", lambda device: "Fake GPU" if device.type == "cuda" else None)
    bst._tuned_launch_table.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert bst.launch_config("dkdv", 128, 128, 128, 2, cuda) == {"num_warps": 4, "num_stages": 2, "tile": 64,
                                                                     "sub": 32}  # fmt: skip
        # head dim 80 pads to 128: the same tiles
        assert bst.launch_config("dkdv", 128, 128, 80, 2, cuda)["tile"] == 64
        assert bst.launch_config("dq", 128, 128, 128, 2, cuda) == {"num_warps": 8, "num_stages": 2, "tile": 128,
                                                                   "sub": 128}  # fmt: skip
        assert bst.launch_config("dkdv", 128, 128, 128, 2, torch.device("cpu"))["tile"] == 128
        with pytest.raises(ValueError, match="pass_name='bwd' is not allowed"):
            bst.launch_config("bwd", 128, 128, 128, 2, cuda)
    finally:
        bst._tuned_launch_table.cache_clear()
