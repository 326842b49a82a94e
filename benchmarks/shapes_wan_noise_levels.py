"""At which noise levels does a shapes-wan model lose its objects? Rendered clips denoised from each level.

    python benchmarks/shapes_wan_noise_levels.py --models shapes-wan --videos 32 --start-steps 0 6 10 15 19 \
        --out F.json
    python benchmarks/shapes_wan_noise_levels.py --models shapes-wan runs/a/pipeline --device cuda --videos 96 ...

Per held-out single-object prompt, its rendered clip is encoded by the model's VAE (posterior mode, normalised as
WanPipeline's latents are), mixed with the prompt's seeded noise at the sampler's noise level of step k
(x = (1 - sigma_k) z + sigma_k eps, the flow-matching path the model trained on) and denoised from step k on with the
preset's sampler (its steps, shift and guidance; the update WanPipeline makes), then decoded and judged as the
targets part of `radial_quality.py` judges a video (kept, right direction, presence) and by
`shapes_wan_motion_geometry.py` (stretch along the motion), and by the caption's colour alone: the way its track
moves (over the judge's first 8 frames and over the whole video) and the share of frames holding it
(`shapes_wan_layout.py`), what a detector of colour and motion reads. Step 0 starts from noise alone: what the preset
generates. A later start hands the model the clip's layout at that noise level, so the figures say which part of
sampling loses the objects: the early, noisy steps that decide where an object is in each frame, or the late ones
that draw it. "On its track": the share of frames with a region of the captioned colour whose centre lies in the
clip's ground-truth box (did the model keep the layout it was handed?). Every model after the first is also compared
with the first, video by video (the same prompts, clips and noise): paired differences with 95% intervals. With
`--paired-with F.json MODEL`, every model is compared so with that model's rows in a JSON this benchmark wrote
before (its prompts, frames, steps and call must be this run's), instead of sampling the reference again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffattn.judge import detect_objects, parse_clip_caption, track_direction
from diffattn.loading import load_pipeline
from diffattn.presets import PRESETS
from diffattn.scenes import HELD_OUT_CLIP_SEED, render_clip
from diffattn.training import encode_video, latent_normalisation


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from radial_quality import MODEL, held_out_prompts, interval, judge_videos  # noqa: E402
from shapes_wan_layout import by_shape, judge_layout  # noqa: E402
from shapes_wan_motion_geometry import AXES, video_geometry  # noqa: E402


# per-video figures compared between models; "colour_direction" and "colour" read the caption's colour alone (its
# track's way, the share of frames holding it), as a detector of colour and motion would
PAIRED = ("kept", "direction", "presence", "on_track", "colour_direction", "colour", "colour_direction_whole")


def encode_clip(pipe, frames: list[Image.Image]) -> torch.Tensor:
    """A clip's frames (PIL, RGB) -> normalised latents [1, C, F', H', W'] (posterior mode, as train-lora encodes
    its clips), float32 as WanPipeline keeps its latents."""
    video = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).float() / 127.5 - 1  # [F, H, W, 3]
    with torch.no_grad():
        return encode_video(pipe, video.permute(3, 0, 1, 2)[None])[None].float()


def decode(pipe, latents: torch.Tensor) -> list[np.ndarray]:
    """Normalised latents [B, C, F', H', W'] -> uint8 videos [F, H, W, 3], decoded as WanPipeline decodes."""
    vae = pipe.vae
    mean, std = latent_normalisation(vae)
    with torch.no_grad():
        video = vae.decode(latents.to(vae.dtype) * std + mean).sample
    frames = pipe.video_processor.postprocess_video(video.float(), output_type="np")
    return [(np.clip(np.asarray(v), 0, 1) * 255).round().astype(np.uint8) for v in frames]


def noised(pipe, latents: torch.Tensor, noise: torch.Tensor, start_step: int, steps: int) -> torch.Tensor:
    """The latents at the sampler's noise level of `start_step` of `steps`: (1 - sigma) latents + sigma noise."""
    pipe.scheduler.set_timesteps(steps)
    sigma = pipe.scheduler.sigmas[start_step]
    return (1 - sigma) * latents + sigma * noise


def denoise_from(pipe, latents: torch.Tensor, captions: list[str], *, start_step: int, steps: int, guidance: float,
                 max_sequence_length: int) -> torch.Tensor:  # fmt: skip
    """WanPipeline's denoising loop (classifier-free guidance, the scheduler's update) run from `start_step` of
    `steps` on noisy normalised latents [B, C, F', H', W']; returns the final latents, same layout."""
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(captions, [""] * len(captions), do_classifier_free_guidance=True,
                                                max_sequence_length=max_sequence_length)  # fmt: skip
        pipe.scheduler.set_timesteps(steps, device=pipe.transformer.device)
        pipe.scheduler.set_begin_index(start_step)
        x = latents
        for t in pipe.scheduler.timesteps[start_step:]:
            timestep, model_input = t.expand(x.shape[0]), x.to(pipe.transformer.dtype)
            cond = pipe.transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=positive,
                                    return_dict=False)[0]  # fmt: skip
            uncond = pipe.transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=negative,
                                      return_dict=False)[0]  # fmt: skip
            x = pipe.scheduler.step(uncond + guidance * (cond - uncond), t, x, return_dict=False)[0]
    return x


def colour_track(video: np.ndarray, color: str, boxes) -> tuple[float, str | None]:
    """(share of frames with a region of `color` whose centre lies in that frame's ground-truth box, the way the
    largest region of `color` moves over the whole video: first to last frame it is found in)."""
    hits, centers = 0, []
    for frame, (x0, y0, x1, y1) in zip(video, boxes):
        regions = [d for d in detect_objects(Image.fromarray(frame)) if d.color == color]
        hits += any(x0 <= cx < x1 and y0 <= cy < y1 for cx, cy in (r.center for r in regions))
        centers.append(regions[0].center if regions else None)  # detections come largest first
    return hits / len(video), track_direction(centers, frames=len(video))


def paired(videos: list[dict], reference: list[dict]) -> dict:
    """Per-video differences of each PAIRED figure, `videos` minus `reference` (rows of the same prompts and noise),
    with 95% intervals."""
    if len(videos) != len(reference):
        raise ValueError(f"{len(videos)} videos cannot be paired with {len(reference)} reference rows")
    return {key: interval([ours[key] - theirs[key] for ours, theirs in zip(videos, reference)]) for key in PAIRED}


def stored_rows(path: Path, model: str, fields: dict) -> dict[str, dict]:
    """The rows per start step of `model` in a JSON this benchmark wrote, refused unless it judged the same prompts,
    frames, steps and call as `fields` describe."""
    stored = json.loads(Path(path).read_text())
    if stored.get("benchmark") != "shapes_wan_noise_levels":
        raise ValueError(f"--paired-with {path}: not a shapes_wan_noise_levels JSON")
    for key, value in fields.items():
        if stored.get(key) != value:
            raise ValueError(f"--paired-with {path}: its {key} is {stored.get(key)!r}, this run's {value!r}")
    if model not in stored["models"]:
        raise ValueError(f"--paired-with {path} {model}: no such model there (it holds {sorted(stored['models'])})")
    return stored["models"][model]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="exported shapes-wan pipeline folders (or ids)")
    parser.add_argument("--videos", type=int, default=32, help="held-out single-object prompts (32)")
    parser.add_argument("--start-steps", type=int, nargs="+", default=[0, 6, 10, 15, 19],
                        help="sampler steps to start from (0: noise alone, as the preset samples)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="videos denoised together")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a lent GPU: the weights' saved dtype)")
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    parser.add_argument("--paired-with", nargs=2, metavar=("JSON", "MODEL"), default=None,
                        help="pair every model with MODEL's rows in a JSON this benchmark wrote before (same prompts "
                        "and call) instead of with the first model")  # fmt: skip
    args = parser.parse_args(argv)
    preset = PRESETS[MODEL]
    defaults = dict(preset.call_defaults)
    frames, steps = defaults["num_frames"], preset.steps
    for step in args.start_steps:
        if not 0 <= step < steps:
            parser.error(
                f"--start-steps {step} is not allowed: expected 0 to {steps - 1} (the preset's {steps} steps)"
            )
    prompts = held_out_prompts(args.videos, frames, single_only=True)
    clips = [render_clip(HELD_OUT_CLIP_SEED + p.seed, frames) for p in prompts]
    captions = [p.caption for p in prompts]
    fields = {"frames": frames, "steps": steps, "call": defaults,
              "prompts": [{"caption": p.caption, "seed": p.seed} for p in prompts]}  # fmt: skip
    reference = stored_rows(Path(args.paired_with[0]), args.paired_with[1], fields) if args.paired_with else None
    results = {}
    for model in args.models:
        pipe = load_pipeline(model, device=args.device)
        clean = torch.cat([encode_clip(pipe, clip.frames) for clip in clips])
        noise = torch.cat([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(p.seed))[None]
                           for p in prompts]).to(clean)  # fmt: skip
        results[model] = {}
        for step in args.start_steps:
            videos = []
            for start in range(0, len(prompts), args.batch):
                part = slice(start, start + args.batch)
                x = noised(pipe, clean[part], noise[part], step, steps)
                x = denoise_from(pipe, x, captions[part], start_step=step, steps=steps,
                                 guidance=defaults["guidance_scale"],
                                 max_sequence_length=defaults["max_sequence_length"])  # fmt: skip
                videos += decode(pipe, x)
            rows = judge_videos(videos, prompts)
            layout = judge_layout(videos, captions)
            tracks, whole = [], []
            for video, clip in zip(videos, clips):
                ((color, _, direction),) = parse_clip_caption(clip.caption)
                share, way = colour_track(video, color, clip.objects[0].boxes)
                tracks.append(share)
                whole.append(float(way == direction))
            pipe.scheduler.set_timesteps(steps)
            result = {
                "sigma": float(pipe.scheduler.sigmas[step]),
                "kept": interval([float(r["kept"]) for r in rows]),
                "direction": interval([float(r["direction"]) for r in rows]),
                "presence": interval([r["present"] for r in rows]),
                "on_track": interval(tracks),
                "colour_direction": interval([float(r["color_direction"]) for r in rows]),
                "colour": interval([lay["colour"] for lay in layout]),
                "colour_direction_whole": interval(whole),
                **video_geometry(videos, captions),
            }
            result["videos"] = [
                {
                    "kept": float(r["kept"]),
                    "direction": float(r["direction"]),
                    "presence": r["present"],
                    "on_track": track,
                    "colour_direction": float(r["color_direction"]),
                    "colour": lay["colour"],
                    "colour_direction_whole": right,
                    "drawn": lay["drawn"],
                }
                for r, track, lay, right in zip(rows, tracks, layout, whole)
            ]
            result["by_shape"] = by_shape(result["videos"], captions, ("kept", "presence"))
            if reference is not None and str(step) in reference:
                result["paired_with"] = {"json": args.paired_with[0], "model": args.paired_with[1],
                                         **paired(result["videos"], reference[str(step)]["videos"])}  # fmt: skip
            first = results[args.models[0]].get(str(step))
            if reference is None and first is not None:  # same prompts, clips and noise: paired against the first
                result["paired_vs_first"] = paired(result["videos"], first["videos"])
            results[model][str(step)] = result
            stretch = [result[a]["stretch_along_motion"] for a in AXES]
            print(
                f"{model} from step {step} (sigma {result['sigma']:.2f}): kept {result['kept']['mean']:.1%}, "
                f"direction {result['direction']['mean']:.1%}, presence {result['presence']['mean']:.1%}, "
                f"on its track {result['on_track']['mean']:.1%}, "
                f"colour's way {result['colour_direction']['mean']:.1%} "
                f"({result['colour_direction_whole']['mean']:.1%} over the whole video), "
                f"colour in frame {result['colour']['mean']:.1%}, stretch "
                + ", ".join(f"{a} {s['mean']:.2f}x" if s else a for a, s in zip(AXES, stretch)),
                flush=True,
            )
            for shape, row in result["by_shape"].items():
                print(f"  {shape} ({row['videos']}): kept {row['kept']['mean']:.0%}, present "
                      f"{row['presence']['mean']:.0%}, its colour's largest region reads as "
                      f"{row['drawn']}")  # fmt: skip
            versus = result.get("paired_with") or result.get("paired_vs_first")
            if versus:
                print("  paired: " + ", ".join(f"{key} {versus[key]['mean']:+.1%} [{versus[key]['low']:+.1%}, "
                                               f"{versus[key]['high']:+.1%}]" for key in PAIRED))  # fmt: skip
        del pipe
    fields.update(start_steps=args.start_steps, models=results)
    write_report("shapes_wan_noise_levels", args.device, fields, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
