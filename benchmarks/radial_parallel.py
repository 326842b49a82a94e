"""Radial attention under Ulysses context parallelism: what is measured here and what it predicts for 1-8 GPUs.

    python benchmarks/radial_parallel.py                 # measure on this machine, model H100-class GPUs
    python benchmarks/radial_parallel.py --no-measure    # the model only

Measured on the machine at hand (CPU: a real 2-process gloo run under torchrun): one forward of the tiny-wan
transformer with radial attention, single process vs Ulysses over 2 processes, and the all-to-all's bandwidth at
the message sizes of that run. (With a GPU lent, `benchmarks/radial_e2e.py` measures the single-GPU figures the
model reads.)

Modelled, for Wan2.1-1.3B's geometry (30 layers, 12 heads x 128) at 720p (81 frames: 21 latent frames x 3,600
tokens) and at 4x length (321 frames: 81 latent frames), on 1/2/4/8 GPUs, per transformer forward:

- compute from the measured single-GPU forward of `radial_e2e` on an H100 (benchmarks/results): the time without
  self-attention grows with the tokens, dense self-attention with their square, radial self-attention with its
  mask density (computed for each geometry) at the kernel efficiency measured at 720p; Ulysses divides both by P
  (each GPU: 1/P of the tokens outside attention, 1/P of the heads inside);
- the all-to-alls: 4 per layer (q, k, v in; the output back), each GPU sending (P - 1)/P of its N/P x 1536 bf16
  values, at a stated link bandwidth (NVLink 4: 900 GB/s per GPU both ways, 450 one way; taken as 350 GB/s
  effective) plus 25 us a collective.

Where the all-to-all's share of a forward passes one half, it dominates: each row gives the link bandwidth below
which that happens (over NVLink it does not happen up to 8 GPUs; across nodes, at tens of GB/s a GPU, it can).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _report import RESULTS, write_report


LAYERS, HEADS, HEAD_DIM, BYTES = 30, 12, 128, 2
TOKENS_PER_FRAME_720P = 3600
LINK_GBPS, COLLECTIVE_US = 350.0, 25.0
GEOMETRIES = {"720p-81f": 21, "720p-321f (4x)": 81}


def model(reference: dict, degrees=(1, 2, 4, 8)) -> list[dict]:
    """The modelled forward times (ms) of dense and radial attention on P GPUs for each geometry."""
    from diffattn.methods.radial_mask import radial_block_mask, radial_density

    base = next(r for r in reference["results"] if r["geometry"] == "720p-81f")
    n0 = base["tokens"]
    other0 = base["without_self_attention_ms"]
    dense_attention0 = base["dense_ms"] - other0
    radial_attention0 = base["radial_ms"] - other0
    efficiency = base["density"] * dense_attention0 / radial_attention0  # of ideal, measured
    rows = []
    for name, frames in GEOMETRIES.items():
        n = frames * TOKENS_PER_FRAME_720P
        density = radial_density(radial_block_mask(frames, TOKENS_PER_FRAME_720P, decay_factor=0.2, sink_frames=1))
        other = other0 * n / n0
        dense_attention = dense_attention0 * (n / n0) ** 2
        radial_attention = density * dense_attention / efficiency
        for p in degrees:
            volume = (n / p) * HEADS * HEAD_DIM * BYTES * (p - 1) / p  # bytes each GPU sends per all-to-all
            comm = 0.0 if p == 1 else LAYERS * 4 * (volume / (LINK_GBPS * 1e9) * 1e3 + COLLECTIVE_US / 1e3)
            dense = (other + dense_attention) / p + comm
            radial = (other + radial_attention) / p + comm
            # the link bandwidth under which the all-to-alls take half of radial's forward (comm = compute)
            per_collective_ms = (other + radial_attention) / p / (LAYERS * 4) - COLLECTIVE_US / 1e3
            crossover = None if p == 1 or per_collective_ms <= 0 else volume / (per_collective_ms / 1e3) / 1e9
            rows.append({
                "geometry": name, "tokens": n, "gpus": p, "density": round(density, 4),
                "dense_ms": round(dense, 1), "radial_ms": round(radial, 1), "all_to_all_ms": round(comm, 1),
                "radial_speedup": round(dense / radial, 2), "all_to_all_share_radial": round(comm / radial, 3),
                "all_to_all_dominates": comm > 0.5 * radial,
                "dominates_below_gb_per_s": None if crossover is None else round(crossover, 1),
            })  # fmt: skip
    return rows


def measure_cpu() -> dict:
    """The 2-process gloo run of `tests/cp_radial_worker.py`'s model, timed (see measure_worker below)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__, "--worker"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-3000:])
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MEASURED "))
    return json.loads(line.split(" ", 1)[1])


def measure_worker() -> None:
    """One process of the measured run: tiny-wan's transformer forward, radial, single process vs Ulysses over all
    processes (1 thread each), and the all-to-all of one layer's q at that size."""
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    import diffattn
    from diffattn.parallel import enable_context_parallel

    if dist.get_rank() == 0:
        diffattn.preset_path("tiny-wan")
    dist.barrier()
    pipe = diffattn.load_pipeline("tiny-wan")
    transformer = pipe.transformer
    c = transformer.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, c.in_channels, 21, 32, 32, generator=g)  # 21 latent frames of 16x16 tokens
    text = torch.randn(2, 16, c.text_dim, generator=g)
    t = torch.tensor([500, 500])
    config = diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=64)

    def timed(repeats=3):
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            with torch.no_grad():
                transformer(latents, t, text, return_dict=False)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

    handle = diffattn.apply(transformer, config)
    single = timed()
    handle.remove()
    enable_context_parallel(pipe, dist.get_world_size())
    handle = diffattn.apply(transformer, config)
    parallel = timed()
    handle.remove()
    tokens = 21 * 16 * 16
    q = torch.randn(2, tokens // dist.get_world_size(), c.num_attention_heads * c.attention_head_dim)
    out = torch.empty_like(q)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(20):
        dist.all_to_all_single(out, q)
    seconds = (time.perf_counter() - start) / 20
    sent = q.numel() * q.element_size() * (dist.get_world_size() - 1) / dist.get_world_size()
    if dist.get_rank() == 0:
        report = {
            "model": "tiny-wan transformer (2 layers, 2 heads x 16), batch 2, 21 latent frames x 256 tokens",
            "processes": dist.get_world_size(), "threads_per_process": 1, "single_process_ms": round(single, 1),
            "ulysses_ms": round(parallel, 1), "speedup": round(single / parallel, 2),
            "all_to_all_bytes": int(sent), "all_to_all_ms": round(seconds * 1e3, 3),
            "all_to_all_gb_per_s": round(sent / seconds / 1e9, 3),
        }  # fmt: skip
        print("MEASURED " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-measure", action="store_true", help="the model only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure_worker()
        return
    reference = json.loads((RESULTS / "radial_e2e-nvidia-h100-80gb-hbm3.json").read_text())
    rows = model(reference)
    for row in rows:
        print(row)
    measured = None if args.no_measure else measure_cpu()
    if measured:
        print(measured)
    write_report("radial_parallel", "cpu", {
        "measured_here": measured,
        "modelled": {"reference": f"{reference['device']} radial_e2e ({reference['model']})",
                     "link_gb_per_s": LINK_GBPS, "collective_us": COLLECTIVE_US, "rows": rows},
    }, out=None if not args.no_measure else Path(os.devnull))  # fmt: skip


if __name__ == "__main__":
    main()
