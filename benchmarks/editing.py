"""Cost of cross-attention editing: plain pipeline vs structured guidance vs A-STAR, side by side.

    python benchmarks/editing.py            # tiny-sd (CPU); on a GPU also the SD 1.5 config (random weights, fp16)
    python benchmarks/editing.py --quick
    python benchmarks/editing.py --model sd15-config   # only that model

Per variant: seconds per image (median over repeats, after a warm-up) and peak memory (CUDA: max allocated; CPU:
the peak resident set of a fresh process per variant, so variants do not see each other's peaks). Also one
denoising step's time with and without structured guidance, measured inside pipeline calls (the target: at most 10%
more in default mode).
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
from _report import median_ms, write_report  # noqa: E402


PROMPT = "a red cat and a blue chair"
SD15 = "sd15-config"  # SD 1.5's architecture with random weights (benchmarks/_sd15.py), 512x512
VARIANTS = ("plain", "structured", "structured-conjunction", "astar", "attend_and_excite")


def load(model: str, device: str):
    import diffattn

    if model == SD15:
        from _sd15 import sd15_pipeline

        return sd15_pipeline(device, torch.float16 if device == "cuda" else torch.float32)
    return diffattn.load_pipeline(model, device=device)


def run_variant(variant: str, model: str, steps: int, repeats: int, device: str) -> dict:
    import diffattn
    from diffattn.pipelines import AStarPipeline

    pipe = load(model, device)
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
    first = once()  # the warm-up; its losses are reported
    seconds = median_ms(once, device, 0, repeats) / 1e3
    if handle is not None:
        handle.remove()
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    row = {"variant": variant, "model": model, "steps": steps, "dtype": str(pipe.unet.dtype).replace("torch.", ""),
           "seconds_per_image": round(seconds, 4), "peak_memory_mb": round(peak_mb, 1)}  # fmt: skip
    if isinstance(pipe, AStarPipeline):  # random weights can overflow; a non-finite loss ends refinement early
        values = [x for step in first.losses for x in step]
        row.update(updates=len(values), losses_finite=all(x == x and abs(x) != float("inf") for x in values))
    return row


def step_overhead(model: str, device: str, repeats: int, steps: int = 10, size: int | None = None) -> dict:
    """One denoising step (batched CFG) with and without structured guidance, inside real pipeline calls: the time
    of a (1 + steps)-step call minus a 1-step call, over `steps`, so the prompt encodings (one more per phrase with
    structured guidance) cancel out. Plain and structured calls alternate, so drift hits both alike."""
    import diffattn

    pipe = load(model, device)
    pipe.set_progress_bar_config(disable=True)

    def call(num_steps: int) -> tuple[float, torch.Tensor]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        latents = pipe(PROMPT, num_inference_steps=num_steps, generator=torch.Generator().manual_seed(0),
                       height=size, width=size, output_type="latent").images  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, latents

    samples: dict[str, list[float]] = {"plain": [], "structured": []}
    finals: dict[str, torch.Tensor] = {}
    for repeat in range(repeats + 1):  # the first round warms up both variants
        for variant in samples:
            handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig()) if variant == "structured" else None
            long, finals[variant] = call(1 + steps)
            short, _ = call(1)
            if handle is not None:
                handle.remove()
            if repeat:
                samples[variant].append((long - short) / steps)
    plain, structured = (statistics.median(samples[v]) for v in ("plain", "structured"))
    return {"model": model, "pixels": size or pipe.unet.config.sample_size * pipe.vae_scale_factor,
            "step_plain_ms": round(plain * 1e3, 2), "step_structured_ms": round(structured * 1e3, 2),
            "step_overhead": round(structured / plain - 1, 4), "repeats": repeats,
            # the structured path really ran: it changes the result
            "structured_changes_output": not torch.equal(finals["plain"], finals["structured"])}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child process: one variant
    parser.add_argument("--model", default=None, help=f"tiny-sd or {SD15} (default: tiny-sd; on CUDA both)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT",
                        help=f"which of {', '.join(VARIANTS)} (default: all)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    steps, repeats = (4, 1) if args.quick else (10, 3)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, steps, repeats, args.device)))
        return 0
    models = [args.model] if args.model else (["tiny-sd", SD15] if args.device == "cuda" else ["tiny-sd"])
    rows, overheads = [], []
    for model in models:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--variant", variant, "--model", model, "--device", args.device]
            if args.quick:
                cmd.append("--quick")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"variant": variant, "model": model, "error": proc.stderr.strip().splitlines()[-1][:300]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        overheads.append(step_overhead(model, args.device, repeats=2 if args.quick else 7))
        print(json.dumps(overheads[-1]), flush=True)
    if args.device == "cpu" and not args.quick and args.model is None:
        # tiny-sd's step is a few ms of small ops (noisy); SD 1.5's widths at 256 px give the CPU a real step
        overheads.append(step_overhead(SD15, args.device, repeats=3, steps=3, size=256))
        print(json.dumps(overheads[-1]), flush=True)
    write_report("editing", args.device, {"prompt": PROMPT, "results": rows, "structured_step": overheads},
                 quick=args.quick, out=args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
