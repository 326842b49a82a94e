"""Benchmark AgentSD and token merging against SDPA and tomesd, side by side in one run.

    python benchmarks/agent_attention.py             # layer at 4,096 and 16,384 tokens; SD 1.5 UNet at 512 and 1024
    python benchmarks/agent_attention.py --quick     # small smoke run

Variants: the SDPA baseline (diffusers' AttnProcessor2_0), tomesd at the same merge ratio (installed with pip when
missing, unless --no-install), diffattn's token merging (agent_ratio=None) and diffattn's agent mode (AgentSD's
first-phase settings: stride 4, agent ratio 0.95). The UNet is the SD 1.5 config with random weights, batch 2;
fp16 on a GPU, fp32 on the CPU. A stage breakdown of the agent layer (matching on the torch and, on CUDA, the Triton
backend; merge; agent attention; unmerge) shows where its time goes; on CUDA the layer is also timed captured in a
CUDA graph (no launch or Python cost) and, with --compile, compiled by torch.compile. Each UNet row also times the
UNet with the agent layers' attention removed
(projections kept): 1 - that / SDPA is their attention share f, and SDPA / that the ceiling of any speedup there.
Results go to benchmarks/results/ with the device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import diffattn


sys.path.insert(0, str(Path(__file__).parent))
from _report import median_ms, write_report  # noqa: E402
from _sd15 import sd15_unet  # noqa: E402


MERGE_RATIO = 0.4  # AgentSD's ratio; tomesd and diffattn's ToMe mode use the same


def tomesd_module(install: bool):
    try:
        return importlib.import_module("tomesd")
    except ImportError:
        if not install:
            return None
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "tomesd"], check=False)
        try:
            return importlib.import_module("tomesd")
        except ImportError:
            return None


def measure(fn, device: str, warmup: int, repeats: int) -> float:
    return median_ms(fn, device, warmup, repeats)


VARIANTS = {
    "tome": diffattn.AgentAttentionConfig.tome(MERGE_RATIO),
    "agent": diffattn.AgentAttentionConfig(ratio=MERGE_RATIO),
}


def sd15_self_attention(device: str, dtype: torch.dtype):
    """SD 1.5's full-resolution self-attention layer (C=320, 8 heads of 40), from a UNet cut to two levels."""
    unet = sd15_unet(device, block_out_channels=(320, 640), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
    return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to(device, dtype)


def bench_layer(tokens_list, device, dtype, warmup, repeats) -> list[dict]:
    """One SD 1.5 full-resolution self-attention layer (C=320, 8 heads of 40)."""
    attn = sd15_self_attention(device, dtype)
    baseline = attn.processor
    rows = []
    for tokens in tokens_list:
        x = torch.randn(2, tokens, 320, device=device, dtype=dtype)
        with torch.no_grad():
            t_sdpa = measure(lambda: baseline(attn, x), device, warmup, repeats)
            row = {"bench": "layer", "tokens": tokens, "sdpa_ms": round(t_sdpa, 2)}
            for name, config in VARIANTS.items():
                processor = diffattn.AgentAttentionProcessor(config)  # no state: square grid, first phase
                t = measure(lambda p=processor: p(attn, x), device, warmup, repeats)
                row[f"{name}_ms"] = round(t, 2)
                row[f"{name}_speedup"] = round(t_sdpa / t, 3)
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cuda_graph_replay(fn):
    """`fn` captured in a CUDA graph (after warm-up on a side stream): the replay, without Python and launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _bench_layer_prepared(tokens_list, device, dtype, warmup, repeats, bench: str, prepare) -> list[dict]:
    """The layer's SDPA and agent calls, each turned by `prepare(call, x) -> (timed fn, extra fields)` (a CUDA graph
    replay, a compiled function) before timing; a variant that cannot be prepared reports its error."""
    attn = sd15_self_attention(device, dtype)
    # use_rand=False: the random destinations draw from the processor's own CUDA generator, which a graph can only
    # capture once registered with it (torch.cuda.CUDAGraph.register_generator_state); the kernels are the same
    variants = {"sdpa": attn.processor, "agent_no_rand": diffattn.AgentAttentionProcessor(
                    diffattn.AgentAttentionConfig(ratio=MERGE_RATIO, use_rand=False))}  # fmt: skip
    rows = []
    for tokens in tokens_list:
        x = torch.randn(2, tokens, 320, device=device, dtype=dtype)
        row = {"bench": bench, "tokens": tokens}
        with torch.no_grad():
            for name, processor in variants.items():
                try:
                    fn, fields = prepare(lambda h, p=processor: p(attn, h), x)
                    row.update({f"{name}_{key}": value for key, value in fields.items()})
                    row[f"{name}_ms"] = round(measure(fn, device, warmup, repeats * 5), 3)
                except Exception as exc:  # e.g. a generator that cannot be captured, a compiler failure: report it
                    row[f"{name}_error"] = repr(exc)[:200]
        if "agent_no_rand_ms" in row and "sdpa_ms" in row:
            row["agent_no_rand_speedup"] = round(row["sdpa_ms"] / row["agent_no_rand_ms"], 3)
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_layer_graphed(tokens_list, device, dtype, warmup, repeats) -> list[dict]:
    """The layer benchmark with every variant captured in a CUDA graph: how much of agent mode's time is launch and
    Python overhead (its stages are many small kernels) rather than GPU work."""
    return _bench_layer_prepared(
        tokens_list, device, dtype, warmup, repeats, "layer_cuda_graph",
        lambda call, x: (cuda_graph_replay(lambda: call(x)), {}),
    )  # fmt: skip


def bench_layer_compiled(tokens_list, device, dtype, warmup, repeats) -> list[dict]:
    """The layer with each variant's call compiled by torch.compile (inductor, max-autotune without CUDA graphs):
    what fusing the agent layer's small ops buys beside the CUDA-graph rows (which remove launch cost only). The
    agent layer compiles as one graph (tests/test_agent_attention.py checks it on the CPU)."""

    def prepare(call, x):
        compiled = torch.compile(call, mode="max-autotune-no-cudagraphs")
        start = time.perf_counter()
        compiled(x)
        return (lambda: compiled(x)), {"compile_s": round(time.perf_counter() - start, 1)}

    return _bench_layer_prepared(tokens_list, device, dtype, warmup, repeats, "layer_compiled", prepare)


class _NoAttentionCore:
    """Stand-in processor with the layer's value and output projections but no attention: the UNet time left when
    those layers' attention costs nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return attn.to_out[0](attn.to_v(hidden_states))


def bench_stages(tokens_list, device, dtype, warmup, repeats) -> list[dict]:
    """Where agent mode's layer time goes (AgentSD's first phase: stride 4, agent ratio 0.95, merge 0.4): each stage
    alone, plus the bipartite matching on both backends (Triton on CUDA only) and dense SDPA at the full N."""
    from diffattn.kernels import agent_attention, bipartite_matching, merge_tokens, unmerge_tokens

    config = VARIANTS["agent"]
    heads, channels = 8, 320
    rows = []
    for tokens in tokens_list:
        side = int(tokens**0.5)
        x = torch.randn(2, tokens, channels, device=device, dtype=dtype)
        generator = torch.Generator(device=device).manual_seed(0)
        row = {"bench": "stages", "tokens": tokens, "stride": 4, "agent_ratio": config.agent_ratio}
        with torch.no_grad():
            backends = ["torch", "triton"] if device == "cuda" else ["torch"]
            for backend in backends:
                row[f"matching_{backend}_ms"] = round(measure(
                    lambda b=backend: bipartite_matching(x, side, side, 4, 4, generator=generator, backend=b),
                    device, warmup, repeats), 3)  # fmt: skip
            match = bipartite_matching(x, side, side, 4, 4, generator=generator)
            r = min(int(tokens * config.ratio), match.num_src)
            r_agents = min(int(tokens * config.agent_ratio), match.num_src)
            merged = merge_tokens(x, match, r)
            row["merge_ms"] = round(measure(lambda: merge_tokens(x, match, r), device, warmup, repeats), 3)
            row["agent_merge_ms"] = round(
                measure(lambda: merge_tokens(x, match, r_agents), device, warmup, repeats), 3
            )
            q = torch.randn(2, heads, merged.shape[1], channels // heads, device=device, dtype=dtype)
            agents = torch.randn(2, heads, tokens - r_agents, channels // heads, device=device, dtype=dtype)
            row["agent_attention_ms"] = round(measure(lambda: agent_attention(q, q, q, agents), device, warmup,
                                                      repeats), 3)  # fmt: skip
            row["unmerge_ms"] = round(measure(lambda: unmerge_tokens(merged, match, r, tokens), device, warmup,
                                              repeats), 3)  # fmt: skip
            full = torch.randn(2, heads, tokens, channels // heads, device=device, dtype=dtype)
            row["dense_sdpa_ms"] = round(measure(lambda: torch.nn.functional.scaled_dot_product_attention(
                full, full, full), device, warmup, repeats), 3)  # fmt: skip
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_unet(sizes, device, dtype, warmup, repeats, tomesd) -> list[dict]:
    unet = sd15_unet(device).to(dtype).eval()
    rows = []
    for pixels, warmup, repeats in sizes:
        latents = torch.randn(2, 4, pixels // 8, pixels // 8, device=device, dtype=dtype)
        text = torch.randn(2, 77, 768, device=device, dtype=dtype)
        timestep = torch.tensor([500.0, 500.0], device=device)

        def forward():
            with torch.no_grad():
                return unet(latents, timestep, text).sample

        if device == "cuda" and pixels == sizes[0][0]:
            # the first UNet timed ran slower than a 4x larger one in the H200 run (59 vs 49 ms): clocks and
            # allocator still settling; run it for two seconds first
            deadline = time.perf_counter() + 2.0
            while time.perf_counter() < deadline:
                forward()
            torch.cuda.synchronize()
        t_sdpa = measure(forward, device, warmup, repeats)
        row = {"bench": "unet", "pixels": pixels, "batch": 2, "sdpa_ms": round(t_sdpa, 1)}
        if tomesd is not None:
            tomesd.apply_patch(unet, ratio=MERGE_RATIO)
            try:
                t = measure(forward, device, warmup, repeats)
                row.update(tomesd_ms=round(t, 1), tomesd_speedup=round(t_sdpa / t, 3))
            except Exception as exc:  # report a peer that breaks on this diffusers, do not hide it
                row["tomesd_error"] = repr(exc)[:200]
            finally:
                tomesd.remove_patch(unet)
        agent_layers = []
        for name, config in VARIANTS.items():
            handle = diffattn.apply(unet, config)
            agent_layers = [
                k for k, p in unet.attn_processors.items() if isinstance(p, diffattn.AgentAttentionProcessor)
            ]
            t = measure(forward, device, warmup, repeats)
            handle.remove()
            row.update({f"{name}_ms": round(t, 1), f"{name}_speedup": round(t_sdpa / t, 3)})
        # the ceiling: the same layers with no attention at all (Amdahl's bound on any attention speedup there)
        original = unet.attn_processors
        unet.set_attn_processor({k: _NoAttentionCore() if k in agent_layers else p for k, p in original.items()})
        t_free = measure(forward, device, warmup, repeats)
        unet.set_attn_processor(original)
        row.update(
            agent_layers=len(agent_layers),
            no_attention_ms=round(t_free, 1),
            attention_share_f=round(1 - t_free / t_sdpa, 4),
            speedup_ceiling=round(t_sdpa / t_free, 3),
        )
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-install", action="store_true", help="do not pip-install tomesd when it is missing")
    parser.add_argument("--compile", action="store_true", help="also time the layer compiled with torch.compile")
    parser.add_argument("--layer-only", action="store_true", help="the layer rows only (no stages, no UNet)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    tomesd = tomesd_module(install=not args.no_install)
    # unet sizes: (pixels, warmup calls, timed calls); a CPU forward at 1024 px takes about a minute
    if args.quick:
        layer_tokens, unet_sizes, warmup, repeats = [1024], [(256, 1, 1)], 1, 1
    elif device == "cuda":
        layer_tokens, unet_sizes, warmup, repeats = [4096, 16384], [(512, 3, 10), (1024, 3, 10)], 3, 10
    else:
        layer_tokens, unet_sizes, warmup, repeats = [4096, 16384], [(512, 1, 2), (1024, 1, 1)], 1, 3
    rows = bench_layer(layer_tokens, device, dtype, warmup, repeats)
    if not args.layer_only:
        rows += bench_stages(layer_tokens, device, dtype, warmup, repeats)
    if device == "cuda":
        rows += bench_layer_graphed(layer_tokens, device, dtype, warmup, repeats)
    if args.compile:
        rows += bench_layer_compiled(layer_tokens, device, dtype, warmup, repeats)
    if not args.layer_only:
        rows += bench_unet(unet_sizes, device, dtype, warmup, repeats, tomesd)
    fields = {
        "dtype": str(dtype).replace("torch.", ""),
        "tomesd": getattr(tomesd, "__version__", "installed") if tomesd is not None else None,
        "merge_ratio": MERGE_RATIO,
        "variants": {k: repr(v) for k, v in VARIANTS.items()},
        "results": rows,
    }
    name = "agent_attention_layer" if args.layer_only else "agent_attention"
    write_report(name, device, fields, quick=args.quick, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
