"""`diffattn demo`: run every preset offline and write an HTML report with outputs, attention maps and timings."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .generation import generate
from .judge import clip_verdict, detect_objects, score_scene, subjects_kept
from .methods.agent_attention import AgentAttentionConfig
from .methods.radial_attention import RadialAttentionConfig
from .methods.structured_guidance import StructuredGuidanceConfig
from .outputs import save_result
from .presets import GENERAL_PROMPT, PRESETS
from .scenes import SceneObject
from .video_metrics import psnr


logger = logging.getLogger(__name__)

# Radial comparison on the random presets: sparse from the second step, at each preset's compare_frames.
RADIAL_DEMO = RadialAttentionConfig(dense_layers=0, dense_timesteps=1, block_size=64)
AGENT_DEMO = AgentAttentionConfig()
AGENT_SIZE = {"tiny-sd": 256, "tiny-sdxl": 512}  # larger than the defaults, so merging has tokens to work on
# Editing methods on the trained model, where attribute binding is visible and the judge can score it.
EDITING_PRESET = "shapes-sd"
EDITING_PROMPT = "a red circle and a blue square"
EDITING_SEEDS = 4
SUBJECTS = ["a red circle", "a blue square"]  # IR-Diffusion's subjects of EDITING_PROMPT


def run_demo(out_dir: Path, *, steps: int | None = None, seed: int = 0, presets: list[str] | None = None) -> Path:
    """Generate with each preset into `out_dir` (a fresh run folder each time) and write `out_dir/index.html`.

    Earlier runs are kept: each run writes into `out_dir/run-<timestamp>/` and index.html points at the newest.
    `steps`: None takes each preset's own (20 for the trained shapes-sd, 4 for the random tiny ones).
    """
    out_dir = Path(out_dir)
    names = presets or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"presets={unknown} is not allowed: expected names from {', '.join(PRESETS)}")
    run_dir = out_dir / time.strftime("run-%Y%m%d-%H%M%S")
    suffix = 1
    while run_dir.exists():
        run_dir = out_dir / f"{time.strftime('run-%Y%m%d-%H%M%S')}-{suffix}"
        suffix += 1
    rows = []
    for name in tqdm(names, desc="diffattn demo"):
        load_start = time.perf_counter()
        result = generate(name, PRESETS[name].prompt, steps=steps, seed=seed)
        total = time.perf_counter() - load_start
        paths = save_result(result, run_dir, name)
        rows.append(
            {
                "preset": name,
                "kind": result.kind,
                "description": PRESETS[name].description,
                "prompt": result.prompt,
                "files": [str(p.relative_to(out_dir)) for p in paths],
                "generate_seconds": round(result.seconds, 3),
                "load_and_generate_seconds": round(total, 3),
                "call": {k: v for k, v in result.call_kwargs.items() if isinstance(v, (int, float, str))},
            }
        )
        logger.info("demo: %s in %.2fs", name, result.seconds)
    radial_rows = []
    for name in tqdm([n for n in names if PRESETS[n].kind == "video"], desc="diffattn demo: radial"):
        preset = PRESETS[name]
        frames = preset.compare_frames
        config = RADIAL_DEMO  # the random presets: sparse from the second step
        if preset.radial is not None:  # a trained preset's own settings, its dense quarter of the steps kept a quarter
            quarter = (steps or preset.steps) // 4
            config = dataclasses.replace(preset.radial, dense_timesteps=min(preset.radial.dense_timesteps, quarter))
        prompt = preset.prompt
        dense = generate(name, prompt, steps=steps, seed=seed, num_frames=frames)
        sparse = generate(name, prompt, steps=steps, seed=seed, num_frames=frames, radial=config)
        dense_files = save_result(dense, run_dir, f"{name}-long-dense")
        sparse_files = save_result(sparse, run_dir, f"{name}-long-radial")
        radial_rows.append(
            {
                "preset": name,
                "prompt": prompt,
                "num_frames": frames,
                "config": repr(config),
                "density": None if sparse.radial_density is None else round(sparse.radial_density, 4),
                "psnr_db": round(psnr(sparse.frames, dense.frames), 2),
                "judge": {"dense": clip_verdict(dense.frames, prompt), "radial": clip_verdict(sparse.frames, prompt)},
                "dense_seconds": round(dense.seconds, 3),
                "radial_seconds": round(sparse.seconds, 3),
                "dense_files": [str(p.relative_to(out_dir)) for p in dense_files],
                "radial_files": [str(p.relative_to(out_dir)) for p in sparse_files],
            }
        )
    agent_rows = []
    for name in [n for n in names if n in AGENT_SIZE]:
        size = AGENT_SIZE.get(name, 256)
        call = {"steps": steps, "seed": seed, "height": size, "width": size, "attention_maps": False}
        plain = generate(name, GENERAL_PROMPT, **call)
        merged = generate(name, GENERAL_PROMPT, **call, agent=AGENT_DEMO)
        plain_files = save_result(plain, run_dir, f"{name}-{size}-sdpa")
        agent_files = save_result(merged, run_dir, f"{name}-{size}-agent")
        agent_rows.append(
            {
                "preset": name,
                "pixels": size,
                "config": repr(AGENT_DEMO),
                "dense_seconds": round(plain.seconds, 3),
                "agent_seconds": round(merged.seconds, 3),
                "dense_files": [str(p.relative_to(out_dir)) for p in plain_files],
                "agent_files": [str(p.relative_to(out_dir)) for p in agent_files],
            }
        )
    editing_rows = []
    if EDITING_PRESET in names:
        variants = {
            "plain": {},
            "structured": {"structured": StructuredGuidanceConfig()},
            "a-star": {"astar": "astar"},
        }
        objects = [
            SceneObject("circle", "red", "large", (0, 0, 1, 1)),
            SceneObject("square", "blue", "large", (0, 0, 1, 1)),
        ]
        for label, extra in variants.items():
            cells = []
            for s in range(seed, seed + EDITING_SEEDS):
                result = generate(EDITING_PRESET, EDITING_PROMPT, steps=steps, seed=s, **extra)  # with heatmaps
                files = save_result(result, run_dir, f"{EDITING_PRESET}-editing-{label}-seed{s}")
                score = score_scene(objects, None, detect_objects(result.images[0]))
                cells.append(
                    {"seed": s, "seconds": round(result.seconds, 3), "binding": score.binding,
                     "files": [str(p.relative_to(out_dir)) for p in files]}
                )  # fmt: skip
            editing_rows.append({"method": label, "prompt": EDITING_PROMPT, "images": cells})
    subject_rows = []
    if EDITING_PRESET in names:
        for s in range(seed, seed + EDITING_SEEDS):
            result = generate(EDITING_PRESET, EDITING_PROMPT, steps=steps, seed=s, subjects=SUBJECTS)
            files = save_result(result, run_dir, f"{EDITING_PRESET}-ir-seed{s}")
            subject_rows.append(
                {"seed": s, "seconds": round(result.seconds, 3),
                 "kept_plain": subjects_kept(result.reference_images, result.plain_images[0]),
                 "kept_ir": subjects_kept(result.reference_images, result.images[0]),
                 "grid": next(str(p.relative_to(out_dir)) for p in files if p.name.endswith("-subjects.png"))}
            )  # fmt: skip
    meta = {
        "prompt": GENERAL_PROMPT,
        "steps": steps,
        "seed": seed,
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "results": rows,
        "radial": radial_rows,
        "agent": agent_rows,
        "editing": editing_rows,
        "subjects": {"prompt": EDITING_PROMPT, "subjects": SUBJECTS, "images": subject_rows} if subject_rows else None,
    }
    (run_dir / "report.json").write_text(json.dumps(meta, indent=2))
    index = out_dir / "index.html"
    index.write_text(_report_html(meta))
    return index


def _video(src: str, width: int) -> str:
    """A looping video shown large without blurring (shapes-wan draws 64x64)."""
    return (
        f'<video src="{src}" controls loop muted autoplay width="{width}" style="image-rendering:pixelated"></video>'
    )


def _media(path: str) -> str:
    src = html.escape(path)
    if path.endswith(".mp4"):
        return _video(src, 192)
    if path.endswith("-mask.png"):
        return f'<figure><img src="{src}" width="192"><figcaption>radial mask</figcaption></figure>'
    return f'<img src="{src}" width="{96 if "-frame" in path else 192}">'


def _pixelated(path: str, width: int = 192) -> str:
    """A small image shown large without blurring (shapes-sd draws 64x64)."""
    return f'<img src="{html.escape(path)}" width="{width}" style="image-rendering:pixelated">'


def _report_html(meta: dict) -> str:
    cards = []
    for row in meta["results"]:
        media = []
        for f in row["files"]:
            src = html.escape(f)
            if f.endswith(".mp4"):
                media.append(_video(src, 256))
            elif f.endswith(".png") and "-frame" in f:
                media.append(f'<img src="{src}" width="96" title="{src}">')
            elif not PRESETS[row["preset"]].build and "-attention" not in f:  # the trained 64 px model
                media.append(f"<figure>{_pixelated(f)}<figcaption>output</figcaption></figure>")
            else:
                label = "attention maps per prompt token" if "-attention" in f else "output"
                media.append(
                    f'<figure><img src="{src}" style="max-width:100%"><figcaption>{label}</figcaption></figure>'
                )
        cards.append(
            f"<section><h2>{html.escape(row['preset'])}</h2><p>{html.escape(row['description'])}. "
            f"Prompt: <i>{html.escape(row['prompt'])}</i></p>"
            f"<p>generate: <b>{row['generate_seconds']:.2f} s</b> "
            f"(with load: {row['load_and_generate_seconds']:.2f} s)"
            f" &middot; {html.escape(json.dumps(row['call']))}</p>{''.join(media)}</section>"
        )
    radial_cards = []
    for row in meta.get("radial", []):
        cells = []
        for label, files, secs, verdict in (
            ("dense", row["dense_files"], row["dense_seconds"], row["judge"]["dense"]),
            (f"radial (density {row['density']}, PSNR {row['psnr_db']:.1f} dB against dense)", row["radial_files"],
             row["radial_seconds"], row["judge"]["radial"]),
        ):  # fmt: skip
            media = "".join(_media(f) for f in files)
            judged = f"<br>judge: {html.escape(verdict)}" if verdict else ""
            cells.append(f"<td><b>{label}</b>: {secs:.2f} s{judged}<br>{media}</td>")
        radial_cards.append(
            f"<tr><td>{html.escape(row['preset'])}<br>"
            f"{row['num_frames']} frames<br><i>{html.escape(row['prompt'])}</i>"
            f"<br><small>{html.escape(row['config'])}</small></td>{''.join(cells)}</tr>"
        )
    radial_html = ""
    if radial_cards:
        radial_html = (
            "<section><h2>Radial attention: dense vs radial, same seed</h2>"
            "<p>shapes-wan is trained (its videos can be read: the judge says what it finds); the tiny presets have "
            "random weights. PSNR compares the radial video with the dense one frame by frame. The mask picture: "
            f"white blocks are computed, red lines are frame boundaries.</p><table>{''.join(radial_cards)}</table>"
            "</section>"
        )
    agent_cards = [
        f"<tr><td>{html.escape(row['preset'])}<br>{row['pixels']} px</td>"
        f"<td><b>SDPA</b>: {row['dense_seconds']:.2f} s<br>{''.join(_media(f) for f in row['dense_files'])}</td>"
        f"<td><b>AgentSD</b>: {row['agent_seconds']:.2f} "
        f"s<br>{''.join(_media(f) for f in row['agent_files'])}</td></tr>"
        for row in meta.get("agent", [])
    ]
    if agent_cards:
        radial_html += (
            "<section><h2>Agent attention (AgentSD): SDPA vs merged tokens with agents, same seed</h2>"
            f"<p>{html.escape(meta['agent'][0]['config'])}</p><table>{''.join(agent_cards)}</table></section>"
        )
    editing = meta.get("editing", [])
    if editing:
        rows_html = "".join(
            f"<tr><td><b>{html.escape(row['method'])}</b></td>"
            + "".join(
                f"<td>{_pixelated(cell['files'][0])}<br>"
                + "".join(f'<img src="{html.escape(f)}" style="max-width:380px"><br>' for f in cell["files"][1:])
                + f"{cell['seconds']:.2f} s &middot; judge: "
                f"{cell['binding']:.0%} bound</td>"
                for cell in row["images"]
            )
            + "</tr>"
            for row in editing
        )
        radial_html += (
            f"<section><h2>Cross-attention editing on {EDITING_PRESET}: plain, structured guidance, A-STAR</h2>"
            f"<p>Prompt: <i>{html.escape(editing[0]['prompt'])}</i>, seeds {editing[0]['images'][0]['seed']} to "
            f"{editing[0]['images'][-1]['seed']}. 'bound' is the judge's share of the prompt's objects found with "
            "the right colour on the right shape (diffattn.judge); benchmarks/compositional.py measures it over "
            "hundreds of prompts. Under each image, its cross-attention maps per prompt token (none for structured "
            f"guidance, which owns those layers).</p><table>{rows_html}</table></section>"
        )
    subjects = meta.get("subjects")
    if subjects:
        rows_html = "".join(
            f'<tr><td>seed {row["seed"]}</td><td><img src="{html.escape(row["grid"])}" style="max-width:800px"></td>'
            f"<td>{row['seconds']:.2f} s<br>subjects kept: plain {row['kept_plain']:.0%}, IR "
            f"{row['kept_ir']:.0%}</td></tr>"
            for row in subjects["images"]
        )
        radial_html += (
            f"<section><h2>IR-Diffusion on {EDITING_PRESET}: the same subjects in a scene</h2>"
            f"<p>Scene: <i>{html.escape(subjects['prompt'])}</i>; subjects: "
            f"{', '.join('<i>' + html.escape(p) + '</i>' for p in subjects['subjects'])}. Each row: the references "
            "with their masks, the scene with plain attention from the same noise (and the scene masks, from "
            "diffattn.judge.subject_mask), and the scene with isolation and reposition attention. 'kept': the share "
            "of references whose shape and colour the scene shows (the judge).</p>"
            f"<table>{rows_html}</table></section>"
        )
    table = "".join(
        f"<tr><td>{html.escape(r['preset'])}</td><td>{r['kind']}</td><td>{r['generate_seconds']:.2f}</td></tr>"
        for r in meta["results"]
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>diffattn demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}section{{border-top:1px solid #ccc;
padding:1em 0}}figure{{display:inline-block;margin:0 1em 0 0}}td,th{{padding:2px 12px}}</style></head><body>
<h1>diffattn demo</h1>
<p>{meta["steps"] or "each preset's"} steps &middot; seed {meta["seed"]}
&middot; {meta["device"]}, torch {meta["torch"]}, {meta["threads"]} threads.
<b>shapes-sd</b> is a real model diffattn trained on coloured-shape scenes, so its pictures (and the editing
methods' effect on them) are meaningful. The <b>tiny-*</b> presets carry seeded random weights (no downloads
here), so their pictures are noise; what they show is that each pipeline, its attention layers and diffattn's hooks
run end to end.</p>
<table><tr><th>preset</th><th>kind</th><th>seconds</th></tr>{table}</table>
{"".join(cards)}
{radial_html}
</body></html>
"""
