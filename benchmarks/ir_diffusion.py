"""IR-Diffusion on the trained shapes-sd preset: do the subjects of a scene keep their references' appearance?

    python benchmarks/ir_diffusion.py                   # 60 two-subject scenes, every variant (CPU ~8 min)
    python benchmarks/ir_diffusion.py --scenes 10 --quick

Scene i: two subjects with different colours and shapes ("a red circle", "a blue square"), the scene prompt
"a red circle and a blue square", seed i. One `IRDiffusionPipeline` call renders the references, the plain scene
(the rehearsal: the same batch and noise with plain attention) and the IR-Diffusion scene; masks come from the
judge's segmenter (`diffattn.judge.subject_mask`) on the rehearsal. The ablations reuse those masks:
isolation only (no reposition, no mutual cross-attention) and reposition only (no isolation).

Metrics per scene (`diffattn.judge`): subjects kept (share of references whose shape and colour the scene shows)
and attribute binding (the scene prompt's objects found with the right colour on the right shape), with 95%
intervals and the paired difference to the plain scene. Time: the IR pass against the plain pipeline on the same
batch of references + scene (median over the first scenes), both in this run. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from diffattn.generation import cached_pipeline, generation_defaults
from diffattn.judge import detect_objects, score_scene, subject_mask, subjects_kept
from diffattn.methods.ir_diffusion import IRDiffusionConfig
from diffattn.pipelines import IRDiffusionPipeline
from diffattn.scenes import COLORS, SHAPES, SceneObject


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from compositional import mean_ci, paired_difference  # noqa: E402


MODEL = "shapes-sd"
ABLATIONS = {
    "isolation_only": IRDiffusionConfig(reposition=False, mutual_cross_attention=0.0),
    "reposition_only": IRDiffusionConfig(isolation=False),
}


def two_subject_scenes(count: int, seed: int = 0) -> list[tuple[str, list[str], list[SceneObject]]]:
    """(scene prompt, subject prompts, objects) with two different colours and two different shapes each."""
    rng = random.Random(seed)
    scenes = []
    for _ in range(count):
        colours, shapes = rng.sample(sorted(COLORS), 2), rng.sample(SHAPES, 2)
        subjects = [f"a {c} {s}" for c, s in zip(colours, shapes)]
        objects = [SceneObject(s, c, "large", (0, 0, 1, 1)) for c, s in zip(colours, shapes)]
        scenes.append((" and ".join(subjects), subjects, objects))
    return scenes


def binding(objects, image) -> float:
    return score_scene(objects, None, detect_objects(image)).binding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timed-scenes", type=int, default=5, help="scenes whose passes are timed")
    parser.add_argument("--quick", action="store_true", help="2 scenes, 2 steps: checks the script end to end")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.scenes, args.steps, args.timed_scenes = 2, 2, 1
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = IRDiffusionPipeline(**cached_pipeline(MODEL).components)
    pipe.set_progress_bar_config(disable=True)
    plain = StableDiffusionPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    call = {k: v for k, v in generation_defaults(MODEL).items() if k in ("height", "width", "guidance_scale")}
    scores: dict[str, dict[str, list[float]]] = {v: {"kept": [], "binding": []} for v in ("plain", "ir", *ABLATIONS)}
    times: dict[str, list[float]] = {"plain_batch": [], "ir_pass": []}
    for i, (prompt, subjects, objects) in enumerate(tqdm(two_subject_scenes(args.scenes), desc="IR-Diffusion")):
        out = pipe(prompt, subjects, segmenter=subject_mask, num_inference_steps=args.steps,
                   generator=torch.Generator().manual_seed(i), **call)  # fmt: skip
        refs = out.reference_images
        for variant, image in (("plain", out.rehearsal_images[0]), ("ir", out.images[0])):
            scores[variant]["kept"].append(subjects_kept(refs, image))
            scores[variant]["binding"].append(binding(objects, image))
        masks = {"reference_masks": out.reference_masks, "target_masks": out.target_masks}
        for variant, config in ABLATIONS.items():
            image = pipe(prompt, subjects, config=config, num_inference_steps=args.steps,
                         generator=torch.Generator().manual_seed(i), **masks, **call).images[0]  # fmt: skip
            scores[variant]["kept"].append(subjects_kept(refs, image))
            scores[variant]["binding"].append(binding(objects, image))
        if i < args.timed_scenes:  # the final pass alone, against the plain pipeline on the same batch
            start = time.perf_counter()
            pipe(prompt, subjects, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(i),
                 **masks, **call)  # fmt: skip
            times["ir_pass"].append(time.perf_counter() - start)
            start = time.perf_counter()
            plain(
                [*subjects, prompt], num_inference_steps=args.steps, generator=torch.Generator().manual_seed(i), **call
            )
            times["plain_batch"].append(time.perf_counter() - start)
    results = {
        variant: {
            "subjects_kept": mean_ci(values["kept"]),
            "attribute_binding": mean_ci(values["binding"]),
            **(
                {}
                if variant == "plain"
                else {
                    "kept_vs_plain": paired_difference(values["kept"], scores["plain"]["kept"]),
                    "binding_vs_plain": paired_difference(values["binding"], scores["plain"]["binding"]),
                }
            ),
        }
        for variant, values in scores.items()
    }
    plain_s, ir_s = statistics.median(times["plain_batch"]), statistics.median(times["ir_pass"])
    timing = {"plain_batch_seconds": round(plain_s, 4), "ir_pass_seconds": round(ir_s, 4),
              "ir_over_plain": round(ir_s / plain_s, 3), "timed_scenes": len(times["ir_pass"]),
              "batch": "2 references + 1 scene, batched CFG (6 UNet rows)"}  # fmt: skip
    for variant, row in results.items():
        print(f"{variant:16s} kept {row['subjects_kept']['mean']:.3f} binding {row['attribute_binding']['mean']:.3f}")
    print(f"IR pass {ir_s:.2f} s vs plain batch {plain_s:.2f} s ({ir_s / plain_s:.2f}x)")
    write_report(
        "ir_diffusion",
        "cpu",
        {"model": MODEL, "scenes": args.scenes, "steps": args.steps, "call": call, "config": repr(IRDiffusionConfig()),
         "masks": "diffattn.judge.subject_mask on the rehearsal", "results": results, "timing": timing},
        quick=args.quick,
        out=args.out,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
