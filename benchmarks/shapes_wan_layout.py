"""Does a shapes-wan model draw one object or several copies? Frames judged on held-out prompts and seeds (CPU).

    python benchmarks/shapes_wan_layout.py --models runs/a/pipeline runs/b/pipeline --frames 1 --videos 64

The shipped weights often draw the captioned object as two or three same-coloured pieces 16-28 px apart. This
benchmark measures that layout directly, per model, on the same prompts and noise: in each frame, whether the
captioned object is found with its colour and shape (the video judge's test), and how many separate regions of the
captioned colour the frame holds (`judge.detect_objects`: 4-connected regions of at least 20 px; one object drawn
whole is one region). With `--frames 1` it judges images, which a model trained on single frames can be compared
on (a cheap test of a change in the transformer before a video run: it showed that 48-dim heads, whose rotary
embedding does not repeat within a frame as 24-dim heads' fastest frequency does every ~25 px, draw no fewer
copies; README, "Is the head width the cause of the copies?").

Reports, per model: the share of frames with the object found, the share with its colour anywhere (a region of
it, whatever its shape: what a detector of colour alone sees), the share with exactly one region of its colour,
the mean region count, with 95% intervals, and per pair of models the paired differences (same prompt and noise);
a picture of the first prompts' frames (`--picture-frame`, 0 by default), one row per model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from diffattn.judge import detect_objects, parse_clip_caption
from diffattn.loading import load_pipeline
from diffattn.presets import PRESETS
from diffattn.shapes_video_training import transformer_size


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from radial_quality import MODEL, held_out_prompts, interval, sample  # noqa: E402


KEYS = ("found", "colour", "one_region", "regions")


def frame_layout(frame: np.ndarray, color: str, shape: str) -> dict:
    """One frame uint8 [H, W, 3] against its caption's object: found (colour and shape), the regions of its
    colour, and the shape the largest of them reads as (None: no region of the colour)."""
    detections = [d for d in detect_objects(Image.fromarray(frame)) if d.color == color]  # largest first
    return {"found": any(d.shape == shape for d in detections), "regions": len(detections),
            "largest": detections[0].shape if detections else None}  # fmt: skip


def judge_layout(videos: list[np.ndarray], captions: list[str]) -> list[dict]:
    """Per video uint8 [F, H, W, 3] of a single-object caption: the means over its frames of `frame_layout`, and
    "drawn": the shape its colour's largest region reads as in most frames (None: the colour in none)."""
    rows = []
    for video, caption in zip(videos, captions):
        ((color, shape, _),) = parse_clip_caption(caption)
        frames = [frame_layout(frame, color, shape) for frame in video]
        drawn = Counter(f["largest"] for f in frames if f["largest"] is not None).most_common(1)
        rows.append({
            "found": statistics.fmean(f["found"] for f in frames),
            "colour": statistics.fmean(f["regions"] >= 1 for f in frames),
            "one_region": statistics.fmean(f["regions"] == 1 for f in frames),
            "regions": statistics.fmean(f["regions"] for f in frames),
            "drawn": drawn[0][0] if drawn else None,
        })  # fmt: skip
    return rows


def by_shape(rows: list[dict], captions: list[str], keys: tuple[str, ...]) -> dict[str, dict]:
    """Per captioned shape of single-object captions: its videos, the mean and interval of each of `keys` over
    them, and (where rows hold "drawn") how often each shape is what its colour's largest region reads as. What a
    share is made of: a model may keep circles and never draw a star."""
    groups: dict[str, list[dict]] = {}
    for row, caption in zip(rows, captions):
        ((_, shape, _),) = parse_clip_caption(caption)
        groups.setdefault(shape, []).append(row)
    out = {}
    for shape, group in sorted(groups.items()):
        out[shape] = {"videos": len(group), **{key: interval([r[key] for r in group]) for key in keys}}
        if all("drawn" in r for r in group):
            out[shape]["drawn"] = dict(Counter(str(r["drawn"]) for r in group).most_common())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="exported shapes-wan pipeline folders (or ids)")
    parser.add_argument("--frames", type=int, default=1, help="frames a sample (4k+1; 1: images)")
    parser.add_argument("--videos", type=int, default=64, help="held-out single-object prompts (64)")
    parser.add_argument("--first", type=int, default=0, help="index of the first held-out clip the prompts come from")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (the preset's)")
    parser.add_argument("--batch", type=int, default=16, help="samples per pipeline call")
    parser.add_argument("--out", type=Path, required=True, help="JSON path; the picture goes beside it (.png)")
    parser.add_argument("--picture-frame", type=int, default=0, help="the frame of each video the picture shows (0)")
    args = parser.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        parser.error(f"--frames {args.frames} is not allowed: expected 4k + 1 (the VAE's 4x in time)")
    if not 0 <= args.picture_frame < args.frames:
        parser.error(f"--picture-frame {args.picture_frame} is not allowed: expected 0 to {args.frames - 1}")
    preset = PRESETS[MODEL]
    steps = args.steps or preset.steps
    defaults = {**preset.call_defaults, "num_frames": args.frames}
    # the captions of the held-out clips the targets part uses (clips of the preset's length)
    prompts = held_out_prompts(args.videos, preset.call_defaults["num_frames"], first=args.first, single_only=True)
    results, videos = {}, {}
    for model in args.models:
        pipe = load_pipeline(model, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        videos[model] = sample(pipe, prompts, frames=args.frames, steps=steps, batch=args.batch, defaults=defaults)
        rows = judge_layout(videos[model], [p.caption for p in prompts])
        results[model] = {
            "heads": pipe.transformer.config.num_attention_heads,
            "head_dim": pipe.transformer.config.attention_head_dim,
            **transformer_size(pipe.transformer.config),
            "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
            **{key: interval([r[key] for r in rows]) for key in KEYS},
            "by_shape": by_shape(rows, [p.caption for p in prompts], ("found",)),
            "rows": rows,
        }
    paired = {}
    for i, a in enumerate(args.models):
        for b in args.models[i + 1 :]:
            paired[f"{a} - {b}"] = {
                key: interval([ra[key] - rb[key] for ra, rb in zip(results[a]["rows"], results[b]["rows"])])
                for key in KEYS
            }
    shown = min(12, len(prompts))
    grid = np.concatenate(
        [np.concatenate([videos[m][i][args.picture_frame] for i in range(shown)], axis=1) for m in args.models],
        axis=0,
    )
    picture = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(picture)
    fields = {
        "frames": args.frames,
        "steps": steps,
        "call": defaults,
        "prompts": [{"caption": p.caption, "seed": p.seed} for p in prompts],
        "models": results,
        "paired": paired,
        "picture": {
            "file": picture.name,
            "frame": args.picture_frame,
            "rows": args.models,
            "columns": [p.caption for p in prompts[:shown]],
        },  # fmt: skip
    }
    write_report("shapes_wan_layout", "cpu", fields, out=args.out)
    for model, result in results.items():
        print(f"{model}: found {result['found']['mean']:.1%}, colour {result['colour']['mean']:.1%}, "
              f"one region {result['one_region']['mean']:.1%}, "
              f"regions {result['regions']['mean']:.2f}")  # fmt: skip
        for shape, row in result["by_shape"].items():
            print(f"  {shape} ({row['videos']}): found {row['found']['mean']:.0%}, its colour's largest region "
                  f"reads as {row['drawn']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
