"""Are a shapes-wan model's objects smeared along their motion, and where do its copies lie? (CPU)

    python benchmarks/shapes_wan_motion_geometry.py --models shapes-wan runs/a/pipeline --videos 32 --out F.json

Per model, on held-out single-object prompts and seeds (the targets part's first `--videos`, the same noise), dense
33-frame videos at the preset's settings, judged twice: by the video judge (kept, right direction, presence: the
targets part's figures) and by the geometry of the captioned colour's regions in every 4th frame: the largest
region's extent along the caption's motion axis over its extent across it (rendered clips give 1.0: the shapes have
square boxes), and, in frames with two or more regions of the colour, whether the two largest lie apart along the
motion axis or across it. The rendered clips of the same prompts are measured as the reference. Ratios are averaged
as log2 (a 2x stretch and a 2x squash cancel) and reported as factors with 95% intervals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from diffattn.judge import detect_objects, parse_clip_caption
from diffattn.loading import load_pipeline
from diffattn.presets import PRESETS
from diffattn.scenes import HELD_OUT_CLIP_SEED, render_clip


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from radial_quality import MODEL, held_out_prompts, interval, judge_video, sample  # noqa: E402


AXES = ("horizontal", "vertical")
EVERY = 4  # frames measured: 0, 4, 8, ...


def motion_axis(caption: str) -> str:
    ((_, _, direction),) = parse_clip_caption(caption)
    return "horizontal" if direction in ("left", "right") else "vertical"


def frame_geometry(frame: np.ndarray, color: str, axis: str) -> dict | None:
    """One frame uint8 [H, W, 3]: log2 of the largest `color` region's box extent along `axis` over across it, and
    (with two regions or more) whether the two largest lie apart along `axis` (None: no region of the colour)."""
    regions = [d for d in detect_objects(Image.fromarray(frame)) if d.color == color]
    if not regions:
        return None
    x0, y0, x1, y1 = regions[0].box
    along, across = (x1 - x0, y1 - y0) if axis == "horizontal" else (y1 - y0, x1 - x0)
    apart_along = None
    if len(regions) >= 2:
        (ax, ay), (bx, by) = regions[0].center, regions[1].center
        dx, dy = abs(bx - ax), abs(by - ay)
        apart_along = (dx > dy) if axis == "horizontal" else (dy > dx)
    return {"log2_stretch": float(np.log2(along / across)), "apart_along": apart_along}


def video_geometry(videos: list[np.ndarray], captions: list[str]) -> dict:
    """Videos uint8 [F, H, W, 3] of single-object captions: per motion axis, the stretch along the motion (a
    factor, mean of log2) and the share of two-region frames whose regions lie apart along the motion."""
    stretch = {axis: [] for axis in AXES}
    apart = {axis: [] for axis in AXES}
    for video, caption in zip(videos, captions):
        ((color, _, _),) = parse_clip_caption(caption)
        axis = motion_axis(caption)
        for frame in video[::EVERY]:
            measured = frame_geometry(frame, color, axis)
            if measured is None:
                continue
            stretch[axis].append(measured["log2_stretch"])
            if measured["apart_along"] is not None:
                apart[axis].append(float(measured["apart_along"]))
    out = {}
    for axis in AXES:
        log2 = interval(stretch[axis]) if stretch[axis] else None
        out[axis] = {
            "frames": len(stretch[axis]),
            "stretch_along_motion": None if log2 is None else {k: 2 ** log2[k] for k in ("mean", "low", "high")},
            "two_region_frames": len(apart[axis]),
            "apart_along_motion": interval(apart[axis]) if apart[axis] else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="exported shapes-wan pipeline folders (or ids)")
    parser.add_argument("--videos", type=int, default=32, help="held-out single-object prompts (32)")
    parser.add_argument("--batch", type=int, default=8, help="videos per pipeline call")
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    args = parser.parse_args(argv)
    preset = PRESETS[MODEL]
    defaults = dict(preset.call_defaults)
    frames = defaults["num_frames"]
    prompts = held_out_prompts(args.videos, frames, single_only=True)
    captions = [p.caption for p in prompts]
    rendered = [np.stack([np.asarray(f) for f in render_clip(HELD_OUT_CLIP_SEED + p.seed, frames).frames])
                for p in prompts]  # fmt: skip
    results = {"rendered clips": video_geometry(rendered, captions)}
    for model in args.models:
        pipe = load_pipeline(model, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        videos = sample(pipe, prompts, frames=frames, steps=preset.steps, batch=args.batch, defaults=defaults)
        rows = [judge_video(video, caption) for video, caption in zip(videos, captions)]
        results[model] = {
            "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
            "kept": interval([float(r["kept"]) for r in rows]),
            "direction": interval([float(r["direction"]) for r in rows]),
            "presence": interval([r["present"] for r in rows]),
            **video_geometry(videos, captions),
        }
        del pipe
    fields = {"frames": frames, "steps": preset.steps, "call": defaults, "every": EVERY,
              "prompts": [{"caption": p.caption, "seed": p.seed} for p in prompts], "models": results}  # fmt: skip
    write_report("shapes_wan_motion_geometry", "cpu", fields, out=args.out)
    for model, result in results.items():
        line = [f"{model}:"]
        if "kept" in result:
            line.append(f"kept {result['kept']['mean']:.1%}, direction {result['direction']['mean']:.1%}, "
                        f"presence {result['presence']['mean']:.1%};")  # fmt: skip
        for axis in AXES:
            stretch, apart = result[axis]["stretch_along_motion"], result[axis]["apart_along_motion"]
            line.append(f"{axis} movers stretched {stretch['mean']:.2f}x along the motion" if stretch else axis)
            if apart:
                line.append(f"(copies apart along it in {apart['mean']:.0%} of {result[axis]['two_region_frames']})")
        print(" ".join(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
