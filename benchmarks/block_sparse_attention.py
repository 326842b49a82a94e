"""Benchmark block-sparse attention against dense SDPA and FlexAttention on the same masks, side by side.

    python benchmarks/block_sparse_attention.py            # GPU if present, else the reduced CPU set
    python benchmarks/block_sparse_attention.py --quick    # one small shape (smoke run)
    python benchmarks/block_sparse_attention.py --sweep --write-launch-configs diffattn/kernels/launch_configs.json
        # CUDA: first time the Triton kernels' launch configurations on the first shape's radial mask and store the
        # fastest for this GPU model, which the benchmark (and every later use of the kernel) then runs with

Reports per shape, mask and backend: time, dense-equivalent TFLOP/s (the dense FLOPs over the sparse time), actual
TFLOP/s (the FLOPs really computed) and fraction of ideal = (t_dense / t_sparse) x density, where 1.0 means the
sparse kernel is exactly 1/density faster than dense. Writes JSON to benchmarks/results/ naming the device.
Forward FLOPs are 4*N^2*D*H*B; forward+backward counts 3.5x that (the FlashAttention convention).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffattn.kernels import BlockSparseLayout, block_sparse_attention
from diffattn.methods.radial_mask import radial_block_mask


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402


# shape name -> (latent frames, tokens per frame, decay factor, sink frames) of the radial mask at that shape
RADIAL = {
    "wan-1.3b-480p": (21, 1560, 0.2, 1),
    "wan-1.3b-720p": (21, 3600, 0.2, 1),
    "hunyuan-720p": (30, 3840, 0.95, 0),
    "cpu-reduced": (16, 512, 0.2, 1),
    "shapes-wan-129f": (33, 256, 0.25, 1),
    "quick": (8, 256, 1.0, 1),
}
# shapes whose blocks are not 128 tokens, and that are measured on their radial mask only: shapes-wan at 4x its
# trained length, the length-extension LoRA's attention (16-token blocks, 4 heads of 24)
BLOCK = {"shapes-wan-129f": 16}
RADIAL_ONLY = {"shapes-wan-129f"}
GPU_SHAPES = [  # (name, batch, heads, tokens, head dim)
    ("wan-1.3b-480p", 1, 12, 32760, 128),
    ("wan-1.3b-720p", 1, 12, 75600, 128),
    ("hunyuan-720p", 1, 24, 115200, 128),
]
CPU_SHAPES = [("cpu-reduced", 1, 4, 8192, 64), ("shapes-wan-129f", 1, 4, 8448, 24)]
QUICK_SHAPES = [("quick", 1, 2, 2048, 64)]
DENSITIES = (0.10, 0.25, 0.50)


def random_block_mask(num_blocks: int, density: float, seed: int, device: str) -> torch.Tensor:
    """Random [Qb, Kb] mask at `density`, with the diagonal kept so every query block has a key block."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_blocks, num_blocks, generator=g) < density
    mask |= torch.eye(num_blocks, dtype=torch.bool)
    return mask.to(device)


def timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu_time(fn, warmup: int = 10, repeats: int = 7) -> float:
        for _ in range(warmup):  # measured: the gather path settles only after ~10 calls (allocator, caches)
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def dense_sdpa(device: str):
    if device != "cuda":
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return flash


FORWARD_SWEEP = [{"num_warps": w, "num_stages": st} for w in (4, 8) for st in (2, 3)]
# per backward pass: whole-block programs in slices, and half-block programs (tile 64)
BACKWARD_SWEEP = [
    {"tile": 128, "sub": sub, "num_warps": 8, "num_stages": st} for sub in (128, 64, 32) for st in (2, 3)
]
BACKWARD_SWEEP += [{"tile": 64, "sub": sub, "num_warps": w, "num_stages": st}
                   for sub in (128, 64, 32) for w in (4, 8) for st in (2, 3)]  # fmt: skip


def sweep_triton_launch(shape, device: str, dtype: torch.dtype) -> tuple[list[dict], dict[str, dict]]:
    """Time the Triton forward and each backward pass over their launch configurations on the shape's radial mask
    (CUDA only). The two backward passes are separate kernels, so each is varied with the other at its default
    and the fastest of each is taken. Returns the rows and {config key: fastest launch} for `launch_configs.json`."""
    import triton.testing

    from diffattn.kernels import block_sparse_triton as bst

    name, b, h, n, d = shape
    frames, per_frame, decay, sink = RADIAL[name]
    layout = BlockSparseLayout(radial_block_mask(frames, per_frame, decay_factor=decay, sink_frames=sink).to(device))
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
    bq, bk, scale = layout.block_q, layout.block_k, d**-0.5
    measure = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40)  # noqa: E731
    rows, best = [], {}

    def time_config(pass_name, launch, fn):
        try:
            t = measure(fn)
        except Exception as exc:  # e.g. out of shared memory at this config
            rows.append({"shape": name, "pass": pass_name, "launch": launch, "error": repr(exc)[:200]})
            return
        rows.append({"shape": name, "pass": pass_name, "launch": launch, "time_ms": round(t, 3)})
        print(json.dumps(rows[-1]), flush=True)
        key = bst._config_key(pass_name, bq, bk, d, q.element_size())
        if key not in best or t < best[key][1]:
            best[key] = (launch, t)

    fwd_args = (q, k, v, layout.kv_counts, layout.kv_indices, bq, bk, scale)
    for launch in FORWARD_SWEEP:
        time_config("forward", launch, lambda launch=launch: bst.triton_forward(*fwd_args, launch=launch))
    out, lse = bst.triton_forward(*fwd_args)
    grad = torch.randn_like(out)
    delta = (grad.float() * out.float()).sum(-1)
    bwd_args = (grad, q, k, v, lse, delta, layout.kv_counts, layout.kv_indices, layout.q_counts, layout.q_indices,
                bq, bk, scale)  # fmt: skip
    for pass_name in ("dkdv", "dq"):
        for launch in BACKWARD_SWEEP:
            time_config(
                pass_name,
                launch,
                lambda p=pass_name, launch=launch: bst.triton_backward(*bwd_args, launch={p: launch}),
            )
    # the two passes together: the default rule vs the fastest of each
    picked = {p: best[bst._config_key(p, bq, bk, d, q.element_size())][0] for p in ("dkdv", "dq")}
    for label, launch in (("backward-default", None), ("backward-fastest", picked)):
        t = measure(lambda launch=launch: bst.triton_backward(*bwd_args, launch=launch))
        rows.append({"shape": name, "pass": label, "launch": launch, "time_ms": round(t, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows, {key: launch for key, (launch, _) in best.items()}


def write_launch_configs(paths: list[Path], device_name: str, entries: dict[str, dict]) -> None:
    """Merge this GPU model's measured launch configurations into each launch_configs.json (the repository's and the
    imported package's), so the benchmark runs after the sweep -- and users of this GPU -- take them."""
    from diffattn.kernels import block_sparse_triton as bst

    for path in dict.fromkeys(paths):
        table = json.loads(path.read_text()) if path.exists() else {}
        table.setdefault(device_name, {}).update(entries)
        path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")
    bst._tuned_launch_table.cache_clear()


def run(shapes, device: str, dtype: torch.dtype, densities, with_backward: bool, backward_max_tokens=None):
    measure = timer(device)
    dense = dense_sdpa(device)
    sparse_backends = ["triton", "flex"] if device == "cuda" else ["gather", "flex"]
    rows = []
    for name, b, h, n, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
        flops = 4 * n * n * d * h * b
        backward = with_backward and (backward_max_tokens is None or n <= backward_max_tokens)
        passes = [("forward", 1.0)] + ([("forward+backward", 3.5)] if backward else [])
        for pass_name, flop_factor in passes:
            train = pass_name != "forward"
            for t in (q, k, v):
                t.requires_grad_(train)
            grad = torch.randn_like(q) if train else None

            def call(fn, grad=grad, train=train, inputs=(q, k, v)):
                def forward_only():
                    with torch.no_grad():
                        return fn()

                return (lambda: torch.autograd.grad(fn(), inputs, grad)) if train else forward_only

            t_dense = measure(call(lambda: dense(q, k, v)))
            rows.append(
                _row(name, b, h, n, d, dtype, pass_name, "dense-sdpa", 1.0, t_dense, t_dense, flops * flop_factor)
            )
            print(_fmt(rows[-1]), flush=True)
            t_default = None
            if device == "cuda":  # PyTorch's default SDPA backend too (cuDNN on Hopper: faster than flash)
                t_default = measure(call(lambda: F.scaled_dot_product_attention(q, k, v)))
                rows.append(
                    _row(name, b, h, n, d, dtype, pass_name, "dense-sdpa-default", 1.0, t_default, t_dense,
                         flops * flop_factor)
                )  # fmt: skip
                print(_fmt(rows[-1]), flush=True)
            block = BLOCK.get(name, 128)
            blocks = math.ceil(n / block)
            masks = [] if name in RADIAL_ONLY else [
                (f"random-{d:.2f}", random_block_mask(blocks, d, seed=blocks, device=device)) for d in densities
            ]  # fmt: skip
            if name in RADIAL:
                frames, per_frame, decay, sink = RADIAL[name]
                radial = radial_block_mask(frames, per_frame, block_size=block, decay_factor=decay, sink_frames=sink)
                masks.append((f"radial-{frames}x{per_frame}", radial.to(device)))
            for mask_name, mask in masks:
                layout = BlockSparseLayout(mask, block)
                layouts = dict.fromkeys(sparse_backends, layout)
                if "gather" in layouts and layout.gather_group_size() > 1:  # and the plan of one query block a call
                    layouts["gather-single-blocks"] = BlockSparseLayout(mask, block, gather_group_size=1)
                for backend, backend_layout in layouts.items():
                    if backend == "flex" and train and device != "cuda":
                        continue  # PyTorch has no FlexAttention backward on the CPU
                    kernel = backend.split("-")[0]
                    try:
                        fn = call(
                            lambda be=kernel, lay=backend_layout: block_sparse_attention(q, k, v, lay, backend=be)
                        )
                        t_sparse = measure(fn)
                    except Exception as exc:  # report, do not hide, a backend that fails at this shape
                        rows.append({"shape": name, "pass": pass_name, "backend": backend, "error": repr(exc)[:300]})
                        print(f"{name} {pass_name} {backend}: error {exc!r}"[:300], flush=True)
                        continue
                    rows.append(
                        _row(name, b, h, n, d, dtype, pass_name, backend, layout.density, t_sparse, t_dense,
                             flops * flop_factor) | {"mask": mask_name}
                        | ({"block": block} if block != 128 else {})
                        | ({"gather_group_size": backend_layout.gather_group_size()} if kernel == "gather" else {})
                        | ({} if t_default is None else
                           {"fraction_of_ideal_vs_default_sdpa": round(t_default / t_sparse * layout.density, 3)})
                    )  # fmt: skip
                    print(_fmt(rows[-1]), flush=True)
    return rows


def triton_launch_configs(device: str, dtype: torch.dtype) -> dict | None:
    """The launch configuration each Triton pass ran with at block 128, D=128 (the GPU shapes)."""
    if device != "cuda":
        return None
    from diffattn.kernels import block_sparse_triton as bst

    size = torch.empty((), dtype=dtype).element_size()
    return {p: bst.launch_config(p, 128, 128, 128, size, torch.device(device)) for p in bst.PASSES}


def _row(name, b, h, n, d, dtype, pass_name, backend, density, t_ms, t_dense_ms, dense_flops) -> dict:
    seconds = t_ms / 1e3
    return {
        "shape": name,
        "batch": b,
        "heads": h,
        "tokens": n,
        "head_dim": d,
        "dtype": str(dtype).replace("torch.", ""),
        "pass": pass_name,
        "backend": backend,
        "block_size": 128,
        "density": round(density, 4),
        "time_ms": round(t_ms, 3),
        "speedup_vs_dense": round(t_dense_ms / t_ms, 3),
        "dense_equivalent_tflops": round(dense_flops / seconds / 1e12, 3),
        "actual_tflops": round(dense_flops * density / seconds / 1e12, 3),
        "fraction_of_ideal": round(t_dense_ms / t_ms * density, 3),
    }


def _fmt(row: dict) -> str:
    return (
        f"{row['shape']:>14} {row['pass']:>16} {row['backend']:>10} {row.get('mask', ''):>16} density "
        f"{row['density']:.3f}  "
        f"{row['time_ms']:9.2f} ms  x{row['speedup_vs_dense']:6.2f}  ideal-frac {row['fraction_of_ideal']:.2f}  "
        f"{row['actual_tflops']:.2f} TFLOP/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape, for a smoke run")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--backward-max-tokens", type=int, default=None,
                        help="forward+backward only at shapes of at most this many tokens (time budget)")  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="CUDA: first time the Triton kernels' launch configs")
    parser.add_argument("--write-launch-configs", type=Path, default=None, metavar="JSON",
                        help="with --sweep: store the fastest configs for this GPU in JSON and in the imported "
                        "package's launch_configs.json (used from then on)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda":
        shapes, dtype = (QUICK_SHAPES if args.quick else GPU_SHAPES), torch.bfloat16
    else:
        shapes, dtype = (QUICK_SHAPES if args.quick else CPU_SHAPES), torch.float32
    sweep = None
    if args.sweep and device == "cuda":
        from diffattn.kernels import block_sparse_triton as bst

        sweep, fastest = sweep_triton_launch(shapes[0], device, dtype)
        if args.write_launch_configs is not None:
            write_launch_configs([args.write_launch_configs, bst.LAUNCH_CONFIGS_FILE], torch.cuda.get_device_name(),
                                 fastest)  # fmt: skip
    rows = run(shapes, device, dtype, DENSITIES, not args.no_backward, args.backward_max_tokens)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    fields = {
        "triton": triton_version,
        "notes": "random block masks (diagonal kept) and the radial mask of the shape's geometry, block 128 "
        "(shapes-wan-129f: its radial mask alone, block 16, as the length-extension LoRA runs it); "
        "dense = SDPA (flash backend on GPU; dense-sdpa-default: the default backend, and each sparse row's "
        "fraction_of_ideal_vs_default_sdpa against it); "
        "flex = FlexAttention compiled on the same BlockMask; CPU has no flex backward; gather runs "
        "gather_group_size consecutive query blocks a call against the union of their key blocks, "
        "gather-single-blocks the same mask one query block a call (the plan before groups)",
        "results": rows,
        "triton_launch_configs": triton_launch_configs(device, dtype),
        **({"triton_launch_sweep": sweep} if sweep is not None else {}),
    }
    write_report("block_sparse_attention", device, fields, quick=args.quick, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
