"""Does a shapes-wan model draw the caption's shape word? Images from the same noise, one word changed (CPU).

    python benchmarks/shapes_wan_shape_swap.py --models shapes-wan runs/a/pipeline --seeds 4 --out OUT.json

For every seed (held-out noise) and colour, one image per shape from the same noise: "a <colour> <shape> moving
right" with only the shape word changed, then, for the same seed and shape, the colour word changed. If the
transformer ignored the shape word, the images of one seed and colour would have the same silhouette; how far it
moves when the shape word changes, beside how far it moves when the colour word does, says how much the shape word
steers the drawing. The judge (`judge.detect_objects`) then reads each image's largest region of the caption's
colour: the share of each captioned shape read as each shape (a confusion table; "none": no region of the colour),
which says what a model draws instead of a star.

Reports per model: the silhouette overlap (intersection over union of the pixels that are not background) of
images whose captions differ in the shape word only, and in the colour word only, with 95% intervals over seeds and
pairs; the confusion table; a picture, one row per seed, one column per colour and shape (the first
`--picture-colours` colours).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from diffattn.judge import foreground_mask
from diffattn.loading import load_pipeline
from diffattn.presets import PRESETS
from diffattn.scenes import COLORS, SHAPES


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from radial_quality import MODEL, Prompt, interval, sample  # noqa: E402
from shapes_wan_layout import frame_layout  # noqa: E402


# noise seeds of their own, apart from the held-out clips' (radial_quality.held_out_prompts counts from 0)
SEED_BASE = 5_000_000


def swap_keys(seeds: int, colours: list[str]) -> list[tuple[int, str, str]]:
    """(seed index, colour, shape) of every image, in the order `swap_prompts` gives their prompts."""
    return [(seed, colour, shape) for seed in range(seeds) for colour in colours for shape in SHAPES]


def swap_prompts(seeds: int, colours: list[str]) -> list[Prompt]:
    """One prompt per `swap_keys` entry, each seed's noise shared by its colours and shapes."""
    keys = swap_keys(seeds, colours)
    return [Prompt(caption=f"a {c} {shape} moving right", seed=SEED_BASE + s) for s, c, shape in keys]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two uint8 [H, W, 3] images' silhouettes, the pixels the judge does not take for
    background (1.0 when both are empty)."""
    sa, sb = foreground_mask(a), foreground_mask(b)
    union = np.logical_or(sa, sb).sum()
    return float(np.logical_and(sa, sb).sum() / union) if union else 1.0


def swap_overlaps(images: dict[tuple[int, str, str], np.ndarray], seeds: int, colours: list[str]) -> dict:
    """Silhouette overlap of images [H, W, 3] keyed (seed, colour, shape): every pair that differs in the shape word
    only, and every pair that differs in the colour word only."""
    shape_pairs = [
        overlap(images[s, c, a], images[s, c, b])
        for s in range(seeds)
        for c in colours
        for a, b in itertools.combinations(SHAPES, 2)
    ]
    colour_pairs = [
        overlap(images[s, a, shape], images[s, b, shape])
        for s in range(seeds)
        for shape in SHAPES
        for a, b in itertools.combinations(colours, 2)
    ]
    return {"shape_word": interval(shape_pairs), "colour_word": interval(colour_pairs)}


def confusion(images: dict[tuple[int, str, str], np.ndarray]) -> dict[str, dict[str, int]]:
    """Per captioned shape, how many of its images the judge reads as each shape (or "none")."""
    table: dict[str, Counter] = {shape: Counter() for shape in SHAPES}
    for (_, colour, shape), image in images.items():
        table[shape][frame_layout(image, colour, shape)["largest"] or "none"] += 1
    return {shape: dict(counts.most_common()) for shape, counts in table.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="exported shapes-wan pipeline folders (or ids)")
    parser.add_argument("--seeds", type=int, default=4, help="noise seeds; each draws every colour and shape (4)")
    parser.add_argument("--colours", nargs="+", default=list(COLORS), choices=list(COLORS), help="colour words")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (the preset's)")
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--picture-colours", type=int, default=2, help="colours a seed shows in the picture (2)")
    parser.add_argument("--out", type=Path, required=True, help="JSON path; the picture goes beside it (.png)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds} is not allowed: expected at least 1")
    if len(args.colours) < 2 or len(set(args.colours)) != len(args.colours):
        parser.error(f"--colours {args.colours} is not allowed: expected at least two different colours")
    preset = PRESETS[MODEL]
    steps = args.steps or preset.steps
    defaults = {**preset.call_defaults, "num_frames": 1}
    prompts = swap_prompts(args.seeds, args.colours)
    keys = swap_keys(args.seeds, args.colours)
    results, rows = {}, []
    for model in args.models:
        pipe = load_pipeline(model, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        videos = sample(pipe, prompts, frames=1, steps=steps, batch=args.batch, defaults=defaults)
        images = {key: video[0] for key, video in zip(keys, videos)}
        results[model] = {**swap_overlaps(images, args.seeds, args.colours), "read_as": confusion(images)}
        shown = args.colours[: args.picture_colours]
        rows.append(np.concatenate(
            [np.concatenate([images[s, c, shape] for c in shown for shape in SHAPES], axis=1)
             for s in range(args.seeds)], axis=0))  # fmt: skip
    grid = np.concatenate(rows, axis=0)
    picture = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(picture)
    fields = {
        "steps": steps,
        "call": defaults,
        "seeds": [SEED_BASE + s for s in range(args.seeds)],
        "colours": args.colours,
        "shapes": list(SHAPES),
        "models": results,
        "picture": {"file": picture.name, "blocks": args.models, "rows": "seeds",
                    "columns": [f"{c} {shape}" for c in args.colours[: args.picture_colours] for shape in SHAPES]},
    }  # fmt: skip
    write_report("shapes_wan_shape_swap", "cpu", fields, out=args.out)
    for model, result in results.items():
        print(f"{model}: silhouette overlap, shape word changed {result['shape_word']['mean']:.2f}, "
              f"colour word changed {result['colour_word']['mean']:.2f}")  # fmt: skip
        for shape, counts in result["read_as"].items():
            print(f"  {shape}: read as {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
