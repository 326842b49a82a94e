"""AgentSD: token matching/merging against a loop re-implementation, agent attention against its formula."""

import math
import os

import pytest
import torch

import diffattn
import diffattn.methods.agent_attention as agent_module
from diffattn.kernels import agent_attention, bipartite_matching, destination_grid, merge_tokens, unmerge_tokens

from helpers import load, run


# ---- token merging --------------------------------------------------------------------------------------------


def loop_tome(x, h, w, sx, sy, r):
    """ToMe with top-left destinations, written out token by token (one batch element: x [N, C])."""
    n = h * w
    dst = [(i * sy) * w + j * sx for i in range(h // sy) for j in range(w // sx)]
    src = [t for t in range(n) if t not in dst]
    unit = [x[t] / x[t].norm() for t in range(n)]
    best = {}
    for s in src:
        sims = [float(unit[s] @ unit[d]) for d in dst]
        k = max(range(len(dst)), key=lambda i: (sims[i], -i))  # first maximum
        best[s] = (sims[k], k)
    ranked = sorted(src, key=lambda s: -best[s][0])  # stable: ties keep token order
    merged, kept = ranked[:r], ranked[r:]
    dst_vals = []
    for k, d in enumerate(dst):
        group = [x[d]] + [x[s] for s in merged if best[s][1] == k]
        dst_vals.append(torch.stack(group).mean(0))
    merged_x = torch.stack([x[s] for s in kept] + dst_vals)
    return merged_x, dst, kept, merged, best


@pytest.mark.parametrize("h, w, sx, r", [(8, 8, 2, 20), (6, 10, 2, 30), (8, 8, 4, 60), (7, 9, 2, 10)])
def test_merge_and_unmerge_match_loop_reimplementation(h, w, sx, r):
    g = torch.Generator().manual_seed(h * w + r)
    x = torch.randn(2, h * w, 6, generator=g, dtype=torch.float64)
    match = bipartite_matching(x, h, w, sx, sx)  # no generator: top-left destinations
    merged = merge_tokens(x, match, r)
    y = torch.randn_like(merged)
    out = unmerge_tokens(y, match, r, h * w)
    for b in range(2):
        expected, dst, kept, merged_src, best = loop_tome(x[b], h, w, sx, sx, r)
        torch.testing.assert_close(merged[b], expected)
        # unmerge: kept sources and destinations get their own rows, merged sources their destination's row
        rows = {t: i for i, t in enumerate(kept)}
        rows.update({d: len(kept) + k for k, d in enumerate(dst)})
        rows.update({s: len(kept) + best[s][1] for s in merged_src})
        torch.testing.assert_close(out[b], torch.stack([y[b, rows[t]] for t in range(h * w)]))


TRITON_ONLY = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@TRITON_ONLY
@pytest.mark.parametrize("h, w, sx, r, block", [(8, 8, 2, 20, 64), (12, 10, 2, 40, 16), (8, 12, 4, 50, 16)])
def test_triton_matching_matches_loop_reimplementation(h, w, sx, r, block):
    """One or several destination tiles (block 16: a partial last tile too): the best score, its destination and
    the merge built on them agree with the loop re-implementation."""
    from diffattn.kernels.token_match_triton import triton_best_destination

    x = torch.randn(2, h * w, 20, generator=torch.Generator().manual_seed(h * w + r))
    match = bipartite_matching(x, h, w, sx, sx, backend="triton")
    score, best_dst = triton_best_destination(x, match.src_index, match.dst_index, block_m=block, block_n=block,
                                              block_c=16)  # fmt: skip
    assert torch.equal(best_dst, match.best_dst)
    for b in range(2):
        expected, _, _, _, best = loop_tome(x[b], h, w, sx, sx, r)
        sources = match.src_index.tolist()
        assert best_dst[b].tolist() == [best[s][1] for s in sources]
        torch.testing.assert_close(score[b], torch.tensor([best[s][0] for s in sources]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merge_tokens(x, match, r)[b], expected, rtol=1e-5, atol=1e-5)


@TRITON_ONLY
def test_triton_matching_with_identical_destinations_picks_a_best_one():
    """Flat regions make identical destination rows; whichever the kernel picks scores the maximum."""
    from diffattn.kernels.token_match_triton import triton_best_destination

    x = torch.randn(1, 64, 20, generator=torch.Generator().manual_seed(0))
    dst = destination_grid(8, 8, 2, 2)
    x[:, dst[5]] = x[:, dst[1]]
    x[:, dst[-1]] = x[:, dst[0]]
    src = torch.tensor([t for t in range(64) if t not in dst.tolist()])
    score, best_dst = triton_best_destination(x, src, dst, block_m=16, block_n=16, block_c=16)
    unit = x[0] / x[0].norm(dim=-1, keepdim=True)
    sims = unit[src] @ unit[dst].T  # [Ns, Nd]
    chosen = sims.gather(1, best_dst[0].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(chosen, sims.max(1).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(score[0], sims.max(1).values, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_triton_matching_picks_the_most_similar_destination(dtype):
    """On CUDA at SD's full-resolution size (64x64 tokens, 320 channels): every source's chosen destination has the
    highest cosine similarity of its candidates (plain fp32 torch in the test), and the score is that similarity."""
    x = torch.randn(2, 4096, 320, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    match = bipartite_matching(x, 64, 64, 4, 4, backend="triton")
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    sims = unit[:, match.src_index] @ unit[:, match.dst_index].transpose(1, 2)  # [B, Ns, Nd]
    chosen = sims.gather(2, match.best_dst.unsqueeze(2)).squeeze(2)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(chosen, sims.max(2).values, rtol=0, atol=tol)


def test_matching_backend_validation():
    x = torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        bipartite_matching(x, 4, 4, backend="cuda")


def test_random_destinations_one_per_window_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    dst = destination_grid(8, 12, 4, 2, generator=g1)
    assert torch.equal(dst, destination_grid(8, 12, 4, 2, generator=g2))
    rows, cols = dst // 12, dst % 12
    windows = sorted(zip((rows // 2).tolist(), (cols // 4).tolist()))
    assert windows == [(i, j) for i in range(4) for j in range(3)]  # exactly one per 2x4 window
    assert not torch.equal(dst, destination_grid(8, 12, 4, 2))  # differs from the top-left grid


def test_merge_with_zero_r_is_identity_up_to_order():
    x = torch.randn(1, 64, 4)
    match = bipartite_matching(x, 8, 8, 2, 2)
    assert torch.equal(unmerge_tokens(merge_tokens(x, match, 0), match, 0, 64), x)


# ---- agent attention ------------------------------------------------------------------------------------------


def test_agent_attention_matches_formula():
    g = torch.Generator().manual_seed(0)
    b, heads, n, agents_n, d = 2, 3, 50, 7, 40
    q, k, v = (torch.randn(b, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    a = torch.randn(b, heads, agents_n, d, generator=g, dtype=torch.float64)
    agent_values = torch.softmax(a @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    expected = torch.softmax(q @ a.transpose(-1, -2) * d**-0.15, -1) @ agent_values + 0.075 * v
    torch.testing.assert_close(agent_attention(q, k, v, a), expected)
    half = agent_attention(q.half(), k.half(), v.half(), a.half(), fp32=True)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), expected, rtol=2e-2, atol=2e-2)


def test_layer_output_matches_the_agentsd_formula():
    """One SD self-attention layer: merge -> projections -> agent formula -> out proj -> unmerge, written out."""
    pipe = load("tiny-sd")
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    config = diffattn.AgentAttentionConfig(use_rand=False)
    processor = diffattn.AgentAttentionProcessor(config)  # no state: square grid, first phase
    x = torch.randn(1, 256, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = processor(attn, x)
        merged, dst, kept, merged_src, best = loop_tome(x[0], 16, 16, 4, 4, int(256 * 0.4))
        agent_seed, *_ = loop_tome(x[0], 16, 16, 4, 4, 240)  # 0.95 * 256 capped at the 240 sources
        heads, d = attn.heads, attn.to_q.out_features // attn.heads

        def split(t):
            return t.view(t.shape[0], heads, d).transpose(0, 1)

        q, k, v = split(attn.to_q(merged)), split(attn.to_k(merged)), split(attn.to_v(merged))
        a = split(attn.to_q(agent_seed))
        assert a.shape[1] == 16 and q.shape[1] == 154  # n = N/16 agents, N' = N - 102 tokens
        agent_values = torch.softmax(a @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        o = torch.softmax(q @ a.transpose(-1, -2) * d**-0.15, -1) @ agent_values + 0.075 * v
        o = attn.to_out[0](o.transpose(0, 1).reshape(154, -1))
        rows = {t: i for i, t in enumerate(kept)}
        rows.update({t: len(kept) + kk for kk, t in enumerate(dst)})
        rows.update({s: len(kept) + best[s][1] for s in merged_src})
        expected = torch.stack([o[rows[t]] for t in range(256)])
    torch.testing.assert_close(out[0], expected, rtol=1e-4, atol=1e-5)


# ---- schedule and pipelines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, early", [(50, 20), (20, 8)])
def test_schedule_phases(steps, early):
    config = diffattn.AgentAttentionConfig()
    phases = [config.phase(i, steps) for i in range(steps)]
    assert phases[:early] == [(4, 0.95)] * early and phases[early:] == [(2, 0.5)] * (steps - early)
    tome = diffattn.AgentAttentionConfig(agent_ratio=None, stride=2, ratio=0.5)
    assert {tome.phase(i, steps) for i in range(steps)} == {(2, None)}


@pytest.mark.parametrize("steps", [20, 5])
def test_pipeline_runs_agents_early_and_plain_merging_late(monkeypatch, steps):
    pipe = load("tiny-sd")
    seen = []
    original = agent_module.agent_attention

    def spy(*args, **kwargs):
        seen.append(handle.state.step_index)
        return original(*args, **kwargs)

    monkeypatch.setattr(agent_module, "agent_attention", spy)
    handle = diffattn.apply(pipe, diffattn.AgentAttentionConfig())
    run(pipe, "tiny-sd", steps=steps)
    handle.remove()
    early = round(0.4 * steps)
    # 3 self-attention layers at 16x16: early steps use agents (n=16 < N'/2), late steps plain token merging
    assert sorted(set(seen)) == list(range(early)) and len(seen) == 3 * early


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("batch, guidance", [(1, 1.0), (3, 1.0), (2, 7.5)])
def test_presets_run_and_remove_exactly(name, batch, guidance):
    pipe = load(name)
    kwargs = {"num_images_per_prompt": batch, "guidance_scale": guidance}
    dense = run(pipe, name, steps=3, **kwargs)
    handle = diffattn.apply(pipe, diffattn.AgentAttentionConfig())
    merged = run(pipe, name, steps=3, **kwargs)
    again = run(pipe, name, steps=3, **kwargs)
    handle.remove()
    assert merged.shape == dense.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, dense)
    assert torch.equal(again, merged)  # seeded destinations: reproducible runs
    assert torch.equal(run(pipe, name, steps=3, **kwargs), dense)


def test_tome_mode_and_level_choice():
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe, diffattn.AgentAttentionConfig(agent_ratio=None, ratio=0.5, stride=2, levels=(1, 2)))
    keys = set(handle._installed[id(pipe.unet)])
    handle.remove()
    assert len(keys) == 6 and all("attn1" in k for k in keys)  # 3 layers at 16x16 and 3 at 8x8
    with pytest.raises(ValueError, match=r"levels=\(8,\) is not allowed: this UNet has self-attention at"):
        diffattn.apply(pipe, diffattn.AgentAttentionConfig(levels=8))


def test_config_validation():
    with pytest.raises(ValueError, match="ratio=1.5 is not allowed"):
        diffattn.AgentAttentionConfig(ratio=1.5)
    with pytest.raises(ValueError, match="stride=0 is not allowed"):
        diffattn.AgentAttentionConfig(stride=0)
    with pytest.raises(ValueError, match="attn_precision='fp16' is not allowed"):
        diffattn.AgentAttentionConfig(attn_precision="fp16")
    with pytest.raises(ValueError, match="levels=\\(3,\\) is not allowed"):
        diffattn.AgentAttentionConfig(levels=(3,))
    with pytest.raises(ValueError, match="does not support the wan family"):
        diffattn.apply(load("tiny-wan"), diffattn.AgentAttentionConfig())


def test_agent_layer_creates_no_host_tensors():
    """CUDA graphs forbid host-to-device copies: the agent layer (matching, merges, agent attention, unmerge) must
    not build a tensor from a Python scalar (`x[idx] = True` makes a host scalar tensor and copies it) nor copy
    between devices. Run on the meta device, where every op is seen and none computes."""
    from diffusers.models.attention_processor import Attention
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bad = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
            if func is torch.ops.aten.scalar_tensor.default or any(a.device.type != "meta" for a in inputs):
                self.bad.append(str(func))
            return out

    attn = Attention(320, heads=8, dim_head=40).to("meta")
    x = torch.empty(2, 4096, 320, device="meta")
    configs = (
        diffattn.AgentAttentionConfig(use_rand=False),
        diffattn.AgentAttentionConfig(agent_ratio=None, use_rand=False),
    )
    for config in configs:
        with torch.no_grad(), Recorder() as recorder:
            out = diffattn.AgentAttentionProcessor(config)(attn, x)
        assert out.shape == x.shape
        assert recorder.bad == []


def test_agent_layer_compiles_as_one_graph():
    """torch.compile(mode="reduce-overhead") and CUDA graphs need the layer in one graph: no graph breaks
    (fullgraph=True), and the compiled layer gives the eager layer's output, in agent and in ToMe mode."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(64, heads=4, dim_head=16).eval()
    x = torch.randn(2, 256, 64)
    for agent_ratio in (0.95, None):
        processor = diffattn.AgentAttentionProcessor(
            diffattn.AgentAttentionConfig(agent_ratio=agent_ratio, use_rand=False)
        )
        torch._dynamo.reset()
        compiled = torch.compile(lambda h, p=processor: p(attn, h), fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), processor(attn, x))
        # random destinations: drawn from torch's global RNG under compile, so torch.manual_seed reproduces them
        processor = diffattn.AgentAttentionProcessor(diffattn.AgentAttentionConfig(agent_ratio=agent_ratio))
        torch._dynamo.reset()
        compiled = torch.compile(lambda h, p=processor: p(attn, h), fullgraph=True, backend="aot_eager")
        outs = []
        for _ in range(2):
            torch.manual_seed(5)
            with torch.no_grad():
                outs.append(compiled(x))
        assert outs[0].shape == x.shape and torch.isfinite(outs[0]).all()
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
