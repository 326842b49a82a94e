"""Are shapes-wan's sampler settings what misses its targets? The targets judged at other settings (CPU).

    python benchmarks/shapes_wan_sampler.py --videos 48 --guidance 2 8 12 --steps 40 --shift 1 6 10
    python benchmarks/shapes_wan_sampler.py --videos 64 --shift 6 --first 3000000    # a setting confirmed elsewhere
    python benchmarks/shapes_wan_sampler.py --videos 32 --solver euler-stochastic unipc
    python benchmarks/shapes_wan_sampler.py --videos 96 --max-sequence-length 226 512   # WanPipeline's defaults

The targets part of `radial_quality.py` judges dense videos at the preset's settings (20 flow-matching steps, guidance
5, the scheduler's shift 3, Euler's flow-matching update). This benchmark samples the same held-out single-object
prompts from the same noise at the preset's settings and at each other setting given, one setting changed at a time
(solvers: `euler-stochastic`, diffusers' flow-matching Euler with `stochastic_sampling`, each step re-noising its clean
estimate with fresh noise drawn from torch's global generator, seeded once a setting; `unipc`, the UniPC multistep
solver with flow prediction at the same shift, the scheduler Wan's own pipelines ship with), and judges every video as
the targets part does (`radial_quality.judge_video`): the object kept (found with its colour and shape in at least 90%
of frames), the right motion direction, the mean share of frames it is found in; and, as `shapes_wan_layout.py` counts
it, the share of frames holding a region of its colour whatever the shape (what a detector of colour alone sees).
Reports each setting's means with 95% intervals, its paired differences against the preset's settings (same prompt and
noise), and its sampling time. The default prompts are the targets part's (held-out clips from index 0); a setting
chosen on them is confirmed on others (`--first`), as choosing among several settings on one set of prompts favours the
one that was luckiest there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from diffattn.loading import load_pipeline
from diffattn.presets import PRESETS


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from radial_quality import (  # noqa: E402
    MODEL,
    TARGETS,
    held_out_prompts,
    interval,
    judge_videos,
    sample,
    training_counters,
)
from shapes_wan_layout import judge_layout  # noqa: E402


KEYS = ("kept", "direction", "colour_direction", "present", "colour")
SOLVERS = ("euler", "euler-stochastic", "unipc")  # euler: the preset's


def make_scheduler(config, setting: dict):
    """The scheduler of a setting: `config` (the preset's FlowMatchEulerDiscreteScheduler) at the setting's shift,
    with the setting's solver."""
    if setting["solver"] == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=setting["shift"],
            num_train_timesteps=config["num_train_timesteps"],
        )
    return FlowMatchEulerDiscreteScheduler.from_config(
        config, shift=setting["shift"], stochastic_sampling=setting["solver"] == "euler-stochastic"
    )


def settings_to_run(args, preset) -> list[dict]:
    """The preset's settings first, then one change each: {"name", "guidance_scale", "steps", "shift", "solver",
    "max_sequence_length"}."""
    base = {"guidance_scale": preset.call_defaults["guidance_scale"], "steps": preset.steps, "shift": args.base_shift,
            "solver": "euler", "max_sequence_length": preset.call_defaults["max_sequence_length"]}  # fmt: skip
    runs = [{"name": "preset", **base}]
    settings = (
        ("guidance_scale", args.guidance),
        ("steps", args.steps),
        ("shift", args.shift),
        ("solver", args.solver),
        ("max_sequence_length", args.max_sequence_length),
    )
    for key, values in settings:
        runs += [{**base, key: value, "name": f"{key} {value if isinstance(value, str) else f'{value:g}'}"}
                 for value in values if value != base[key]]  # fmt: skip
    return runs


def judged(videos, prompts) -> list[dict]:
    """Per video: kept, direction (its track's and its colour's), present (the targets judge) and colour (share of
    frames with its colour)."""
    rows = judge_videos(videos, prompts)
    layout = judge_layout(videos, [p.caption for p in prompts])
    return [{"kept": float(r["kept"]), "direction": float(r["direction"]),
             "colour_direction": float(r["color_direction"]), "present": r["present"], "colour": lay["colour"]}
            for r, lay in zip(rows, layout)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="shapes-wan or a folder of an exported shapes-wan pipeline")
    parser.add_argument("--videos", type=int, default=32, help="held-out single-object prompts (32)")
    parser.add_argument(
        "--first",
        type=int,
        default=0,
        help="index of the first held-out clip the prompts come from (0: the targets part's)",
    )
    parser.add_argument("--guidance", type=float, nargs="*", default=[], help="guidance scales to try")
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="step counts to try")
    parser.add_argument("--shift", type=float, nargs="*", default=[], help="flow-matching shifts to try")
    parser.add_argument("--solver", nargs="*", default=[], choices=SOLVERS, help="solvers to try")
    parser.add_argument("--max-sequence-length", type=int, nargs="*", default=[],
                        help="caption lengths to try (the prompt's tokens padded with zeros to this many; the preset "
                             "calls with 32, WanPipeline's own default is 512)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=4, help="videos per pipeline call")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    preset = PRESETS[MODEL]
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    scheduler_config = pipe.scheduler.config
    args.base_shift = scheduler_config["shift"]
    frames = preset.call_defaults["num_frames"]
    prompts = held_out_prompts(args.videos, frames, first=args.first, single_only=True)
    results, rows_of = {}, {}
    for setting in settings_to_run(args, preset):
        pipe.scheduler = make_scheduler(scheduler_config, setting)
        torch.manual_seed(0)  # the stochastic solver's fresh noise (WanPipeline does not hand its generator on)
        call = {**preset.call_defaults, "guidance_scale": setting["guidance_scale"],
                "max_sequence_length": setting["max_sequence_length"]}  # fmt: skip
        start = time.perf_counter()
        videos = sample(pipe, prompts, frames=frames, steps=setting["steps"], batch=args.batch, defaults=call)
        seconds = time.perf_counter() - start
        rows = rows_of[setting["name"]] = judged(videos, prompts)
        results[setting["name"]] = {
            "settings": {k: setting[k] for k in ("guidance_scale", "steps", "shift", "solver", "max_sequence_length")},
            "sampling_seconds": seconds,
            **{key: interval([r[key] for r in rows]) for key in KEYS},
            "paired_vs_preset": {
                key: interval([r[key] - p[key] for r, p in zip(rows, rows_of["preset"])]) for key in KEYS
            },
        }
        print(setting["name"], {key: round(results[setting["name"]][key]["mean"], 3) for key in KEYS}, flush=True)
    write_report("shapes_wan_sampler", "cpu", {
        "model": args.model, "weights": training_counters(args.model), "frames": frames, "videos": len(prompts),
        "first_clip": args.first,
        "targets": dict(TARGETS), "settings": results,
    }, out=args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
