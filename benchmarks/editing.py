"""Cost of cross-attention editing: plain pipeline vs structured guidance vs A-STAR, side by side.

    python benchmarks/editing.py            # tiny-sd (CPU); on a GPU also the SD 1.5 config (random weights)
    python benchmarks/editing.py --quick

Per variant: seconds per image (median over repeats, after a warm-up) and peak memory (CUDA: max allocated; CPU:
the peak resident set of a fresh process per variant, so variants do not see each other's peaks). Also one
denoising step's time with and without structured guidance (the target: at most 10% more in default mode).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402


PROMPT = "a red cat and a blue chair"
VARIANTS = ("plain", "structured", "structured-conjunction", "astar", "attend_and_excite")


def run_variant(variant: str, model: str, steps: int, repeats: int, device: str) -> dict:
    import diffattn
    from diffattn.pipelines import AStarPipeline

    pipe = diffattn.load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    handle = None
    if variant.startswith("structured"):
        mode = "conjunction" if variant.endswith("conjunction") else "default"
        handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig(mode=mode))
    if variant in ("astar", "attend_and_excite"):
        pipe = AStarPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)

    def once():
        generator = torch.Generator().manual_seed(0)
        if isinstance(pipe, AStarPipeline):
            return pipe(PROMPT, loss=variant, num_inference_steps=steps, max_iter_to_alter=steps // 2,
                        generator=generator, output_type="pt")  # fmt: skip
        return pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="pt")

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    once()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if handle is not None:
        handle.remove()
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"variant": variant, "model": model, "steps": steps, "seconds_per_image": round(statistics.median(times), 4),
            "peak_memory_mb": round(peak_mb, 1)}  # fmt: skip


def step_overhead(model: str, device: str, repeats: int) -> dict:
    """One UNet call (batched CFG) with and without structured guidance's cross-attention processors."""
    import diffattn

    pipe = diffattn.load_pipeline(model, device=device)
    cond, uncond = pipe.encode_prompt(PROMPT, device, 1, True)
    embeds = torch.cat([uncond, cond])
    size = pipe.unet.config.sample_size
    latents = torch.randn(2, pipe.unet.config.in_channels, size, size, device=device)
    t = torch.tensor(500, device=device)

    def call():
        with torch.no_grad():
            pipe.unet(latents, t, encoder_hidden_states=embeds)

    def timed():
        call()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    plain = timed()
    handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig())
    pipe.encode_prompt(PROMPT, device, 1, True)  # the hook prepares the structured values once per prompt
    handle.state.cfg_batched = True
    structured = timed()
    handle.remove()
    return {"model": model, "step_plain_ms": round(plain * 1e3, 2), "step_structured_ms": round(structured * 1e3, 2),
            "step_overhead": round(structured / plain - 1, 4)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child process: one variant
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    steps, repeats = (4, 1) if args.quick else (10, 3)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, steps, repeats, args.device)))
        return 0
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--device", args.device]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    overhead = step_overhead(args.model, args.device, repeats=5 if args.quick else 20)
    print(json.dumps(overhead), flush=True)
    write_report("editing", args.device, {"prompt": PROMPT, "results": rows, "structured_step": overhead},
                 quick=args.quick, out=args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
