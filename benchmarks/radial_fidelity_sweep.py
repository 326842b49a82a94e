"""How close can a radial mask bring shapes-wan's videos to dense ones? PSNR and SSIM against the dense video from
the same noise, for radial attention at several decay factors (density rising toward the most the radial rule
keeps), at the preset's decay factor with more dense first steps, and for a mask that keeps every block (dense
attention computed through the same processors and kernel: the floor set by the arithmetic alone).

    python benchmarks/radial_fidelity_sweep.py --videos 32 --out benchmarks/results/radial_fidelity_sweep-cpu.json

Every variant runs the preset's radial settings with one field changed, on the same held-out prompts and noise as
`radial_quality.py --parts fidelity` (its first `--videos`), and is paired per video against the preset's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from diffattn.loading import load_pipeline
from diffattn.methods.radial_attention import RadialAttentionConfig
from diffattn.methods.radial_mask import radial_block_mask
from diffattn.video_metrics import psnr, ssim


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from radial_quality import (  # noqa: E402
    MODEL,
    PRESETS,
    held_out_prompts,
    interval,
    latent_geometry,
    timed_sample,
    wan_sink_frames,
    with_mask,
)


FULL = "every block"  # the variant whose mask keeps every block


def variants(preset: RadialAttentionConfig, decays: list[float], dense_steps: list[int]) -> dict[str, dict]:
    """Name -> the fields changed from the preset's radial settings ({} is the preset's own)."""
    out = {f"decay {d:g}": {"decay_factor": d} for d in decays}
    out.update({f"dense first steps {k}": {"dense_timesteps": k} for k in dense_steps})
    out[f"preset (decay {preset.decay_factor:g}, dense first steps {preset.dense_timesteps})"] = {}
    out[FULL] = {}
    return out


def variant_mask(config: RadialAttentionConfig, geometry: tuple[int, int], full: bool) -> torch.Tensor:
    """The block mask a variant runs: the radial rule's for its settings, or every block."""
    mask = radial_block_mask(*geometry, block_size=config.block_size, decay_factor=config.decay_factor,
                             sink_frames=wan_sink_frames(config),
                             dense_neighbor_frames=config.dense_neighbor_frames)  # fmt: skip
    return torch.ones_like(mask) if full else mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="shapes-wan or a folder of an exported shapes-wan pipeline")
    parser.add_argument("--videos", type=int, default=32, help="held-out videos a variant (32)")
    parser.add_argument(
        "--decays", type=float, nargs="+", default=[0.5, 1.0, 4.0], help="decay factors beside the preset's"
    )
    parser.add_argument("--dense-steps", type=int, nargs="+", default=[8, 10, 14],
                        help="dense first steps beside the preset's, at its decay factor")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (the preset's)")
    parser.add_argument("--batch", type=int, default=8, help="videos per pipeline call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    args = parser.parse_args(argv)
    preset = PRESETS[MODEL]
    steps = args.steps or preset.steps
    for k in args.dense_steps:
        if not 0 <= k < steps:
            parser.error(f"--dense-steps {k} is not allowed: expected 0 to {steps - 1} (a step must run sparse)")
    defaults = dict(preset.call_defaults)
    frames = defaults["num_frames"]
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    geometry = latent_geometry(pipe, frames, defaults["height"], defaults["width"])
    prompts = held_out_prompts(args.videos, frames)
    call = {"frames": frames, "steps": steps, "batch": args.batch, "defaults": defaults, "stored": None}
    dense, dense_time = timed_sample(pipe, prompts, **call)
    print(f"dense done ({dense_time['seconds']:.0f} s)", flush=True)
    rows, per_video = {}, {}
    for name, fields in variants(preset.radial, args.decays, args.dense_steps).items():
        config = dataclasses.replace(preset.radial, **fields)
        mask = variant_mask(config, geometry, full=name == FULL)
        handle = with_mask(pipe, config, mask, geometry)
        try:
            videos, timing = timed_sample(pipe, prompts, **call)
        finally:
            handle.remove()
        per_video[name] = [psnr(v, d) for v, d in zip(videos, dense)]
        rows[name] = {
            "changed": fields,
            "dense_timesteps": config.dense_timesteps,
            "decay_factor": config.decay_factor,
            "density": float(mask.float().mean()),
            "psnr": interval(per_video[name]),
            "ssim": interval([ssim(v, d) for v, d in zip(videos, dense)]),
            "sampling_seconds": timing["seconds"],
        }
        print(f"{name}: density {rows[name]['density']:.1%}, PSNR {rows[name]['psnr']['mean']:.2f} dB", flush=True)
    main_name = next(n for n in rows if n.startswith("preset"))
    for name, row in rows.items():
        if name != main_name:
            row["paired_psnr_vs_preset"] = interval([a - b for a, b in zip(per_video[name], per_video[main_name])])
    fields = {"model": args.model, "frames": frames, "steps": steps, "call": defaults,
              "latent_geometry": {"frames": geometry[0], "tokens_per_frame": geometry[1]},
              "radial": dataclasses.asdict(preset.radial), "prompts": len(prompts),
              "dense_sampling_seconds": dense_time["seconds"], "variants": rows}  # fmt: skip
    write_report("radial_fidelity_sweep", args.device, fields, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
