"""What a shapes-wan autoencoder alone keeps of a clip: held-out rendered clips encoded, decoded and judged (CPU).

    python benchmarks/shapes_wan_autoencoder.py --models shapes-wan runs/old/pipeline --frames 33 129 --clips 120

No transformer is involved: each held-out clip (`scenes.HELD_OUT_CLIP_SEED` on) goes through the model's VAE
(posterior mode, then the decoder) and the video judge reads the result against the clip's ground truth, so what is
lost here is lost in every generated video too, whatever the transformer draws. Reports, per model and frame count:
the share of objects the judge keeps (colour and shape in at least 90% of frames) and sees move the captioned way,
the share of frames with each object found, per frame index (the decoder carries a cache from chunk to chunk, so
errors that compound show as a fall over the frames), with 95% intervals; and a picture of the first clips, every
4th frame: the rendered frames, then one row per model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffattn.judge import detect_objects, judge_clip
from diffattn.loading import load_pipeline
from diffattn.scenes import HELD_OUT_CLIP_SEED, render_clip


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from radial_quality import interval  # noqa: E402


def round_trips(vae, clips: list[list[Image.Image]]) -> list[np.ndarray]:
    """Clips of one length through the autoencoder together (one batch: about 3x faster per clip on a CPU than one
    at a time): each clip's frames (PIL, RGB) -> uint8 [F, H, W, 3] as WanPipeline decodes."""
    videos = torch.stack([torch.from_numpy(np.stack([np.asarray(f) for f in frames])) for frames in clips])
    videos = videos.float().permute(0, 4, 1, 2, 3) / 127.5 - 1  # [B, 3, F, H, W]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(videos).latent_dist.mode()).sample
    return list(((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy())


def round_trip(vae, frames: list[Image.Image]) -> np.ndarray:
    """A clip through the autoencoder: frames (PIL, RGB) -> uint8 [F, H, W, 3] as WanPipeline decodes."""
    return round_trips(vae, [frames])[0]


def judge_round_trips(vae, clips: int, frames: int) -> tuple[list[dict], list[np.ndarray]]:
    """One row per object of `clips` held-out clips of `frames` frames: kept, moves the captioned way, found per
    frame; and the first 3 clips' rendered and decoded frames."""
    rows, shown = [], []
    for seed in range(HELD_OUT_CLIP_SEED, HELD_OUT_CLIP_SEED + clips):
        clip = render_clip(seed, frames)
        decoded = round_trip(vae, clip.frames)
        images = [Image.fromarray(f) for f in decoded]
        detections = [detect_objects(image) for image in images]
        for verdict, obj in zip(judge_clip(images, clip.caption), clip.objects):
            rows.append({
                "kept": verdict.kept and (verdict.color, verdict.shape) == (obj.color, obj.shape),
                "direction": verdict.moves_right,
                "found": [any(d.color == obj.color and d.shape == obj.shape for d in found) for found in detections],
            })  # fmt: skip
        if len(shown) < 3:
            shown.append((np.stack([np.asarray(f) for f in clip.frames]), decoded))
    return rows, shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="shapes-wan pipeline folders (or preset ids)")
    parser.add_argument("--frames", type=int, nargs="+", default=[33], help="clip lengths (4k+1; 33)")
    parser.add_argument("--clips", type=int, default=120, help="held-out clips a length (120)")
    parser.add_argument("--out", type=Path, required=True, help="JSON path; the picture goes beside it (.png)")
    args = parser.parse_args(argv)
    for frames in args.frames:
        if frames < 1 or (frames - 1) % 4:
            parser.error(f"--frames {frames} is not allowed: expected 4k + 1 (the VAE's 4x in time)")
    if args.clips < 1:
        parser.error(f"--clips {args.clips} is not allowed: expected at least 1")
    results: dict[str, dict] = {}
    picture_rows = []
    for frames in args.frames:
        results[str(frames)] = {}
        shown_by_model = {}
        for model in args.models:
            vae = load_pipeline(model, device="cpu").vae
            rows, shown_by_model[model] = judge_round_trips(vae, args.clips, frames)
            per_frame = [statistics.fmean(r["found"][t] for r in rows) for t in range(frames)]
            results[str(frames)][model] = {
                "objects": len(rows),
                "kept": interval([float(r["kept"]) for r in rows]),
                "direction": interval([float(r["direction"]) for r in rows]),
                "kept_and_direction": sum(r["kept"] and r["direction"] for r in rows),
                "found": interval([statistics.fmean(r["found"]) for r in rows]),
                "found_per_frame": [round(v, 4) for v in per_frame],
            }
            print(f"{frames} frames, {model}: kept and moving the captioned way "
                  f"{results[str(frames)][model]['kept_and_direction']} of {len(rows)} objects, found in "
                  f"{results[str(frames)][model]['found']['mean']:.1%} of frames")  # fmt: skip
        if frames == args.frames[0]:  # per clip: its rendered frames, then each model's decoding of them
            for i, (rendered, _) in enumerate(shown_by_model[args.models[0]]):
                picture_rows.append(np.concatenate(list(rendered[::4]), axis=1))
                picture_rows += [np.concatenate(list(shown_by_model[m][i][1][::4]), axis=1) for m in args.models]
    grid = np.concatenate(picture_rows, axis=0)
    picture = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(picture)
    fields = {
        "clips": args.clips,
        "first_seed": HELD_OUT_CLIP_SEED,
        "models": args.models,
        "results": results,
        "picture": {
            "file": picture.name,
            "frames": args.frames[0],
            "every": 4,
            "rows": "per clip: rendered, then " + ", ".join(args.models),
        },
    }
    write_report("shapes_wan_autoencoder", "cpu", fields, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
