"""diffattn's Gradio UI: `python app.py` serves http://127.0.0.1:7860.

Tabs: **Compare** (one prompt and seed, plain and the chosen methods side by side with their times and, for the
shapes model, what the judge sees; for video, dense and radial with the speedup and the mask), **Image** and
**Video** (one generation with only the controls that apply, the attention map of any token at any step, a zip of
the result), **Examples** (where each method helps on the shipped models). Every control becomes one
`diffattn.GenerationRequest` in `ui_request`, the one place the UI translates its fields; a request the library
refuses is refused here with the same message.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from diffattn.generation import (
    PIPELINES,
    GenerationResult,
    cached_pipeline,
    default_steps,
    generate,
    is_video_pipeline,
    radial_defaults,
)
from diffattn.judge import clip_verdict
from diffattn.limits import Limits
from diffattn.loading import parse_device
from diffattn.methods.agent_attention import AgentAttentionConfig
from diffattn.methods.attention_maps import render_token_map
from diffattn.methods.radial_attention import RadialAttentionConfig
from diffattn.methods.radial_mask import BLOCK_SIZES
from diffattn.methods.structured_guidance import StructuredGuidanceConfig
from diffattn.outputs import result_files
from diffattn.presets import DEFAULT_PRESET, DEFAULT_VIDEO_PRESET, PRESETS
from diffattn.request import GenerationRequest
from diffattn.video_metrics import psnr


@dataclass
class ServerSettings:
    """What whoever serves the UI decides: the size limits, the models visitors may use, the pipeline cache size,
    how long outputs stay in gradio's cache, and the device models run on (None: `default_device()`, a CUDA GPU
    when torch sees one)."""

    limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = ()  # besides the presets
    allow_any_model: bool = False  # any hub id or server path a visitor types (off: presets and `models` only)
    pipeline_cache: int = 2
    delete_cache: tuple[int, int] = (3600, 3600)  # gradio's delete_cache: (every N seconds, files older than M)
    device: str | None = None


SETTINGS = ServerSettings()
RADIAL = RadialAttentionConfig()  # the library's radial defaults (a preset may carry its own: radial_defaults)
AGENT = AgentAttentionConfig()
TOME = AgentAttentionConfig.tome()
IMAGE_PRESETS = [name for name, p in PRESETS.items() if p.kind == "image"]
VIDEO_PRESETS = [name for name, p in PRESETS.items() if p.kind == "video"]
PLAIN = "plain"
# The image methods a visitor can pick, as GenerationRequest fields (the one list the tabs and the API share).
IMAGE_METHODS = ("AgentSD", "ToMe", "structured guidance", "A-STAR", "Attend-and-Excite", "IR-Diffusion")
HELP = {
    "decay": "λ, the width of the spatial band between frames; it halves each time the frame distance doubles. "
    "Smaller is sparser and faster.",
    "dense_steps": "The first denoising steps run dense attention (they set the layout of the video).",
    "dense_layers": "The first transformer layers run dense attention.",
    "block": "Tile size of the block-sparse kernel, in tokens; the mask is built in these blocks.",
    "neighbors": "Frame pairs this close attend whole (1, the paper's rule); 0 lets the band shrink from the first "
    "neighbour on, for more sparsity.",
    "ratio": "Fraction of the image tokens merged away before self-attention (AgentSD / ToMe).",
    "subjects": "IR-Diffusion: one subject prompt per line, each naming a subject of the scene prompt.",
    "guidance": "Classifier-free guidance scale; 0 is used as given (no guidance).",
}
CSS = """
.pixelated img, .pixelated canvas, .pixelated video { image-rendering: pixelated; }
.pixelated .image-frame img, .pixelated .image-container img { width: 100%; height: 100%; object-fit: contain; }
#compare-gallery .thumbnail-item img { image-rendering: pixelated; }
#compare-table th, #compare-table td:not(:last-child) { white-space: nowrap; }
"""


def allowed_model(model: str) -> str:
    """The model if this server lets visitors use it; one message for anything else (whether or not such a path or
    id exists, so a visitor cannot probe the server's file system)."""
    model = (model or "").strip()
    if not model:
        raise gr.Error("Choose a preset or type a model id.")
    if model in PRESETS or model in SETTINGS.models or SETTINGS.allow_any_model:
        return model
    choices = ", ".join(list(PRESETS) + list(SETTINGS.models))
    raise gr.Error(f"Model {model[:200]!r} is not available on this server; choose one of: {choices}")


# ------------------------------------------------------------------------------------- UI fields -> one request


def _int_or_none(value: Any, label: str) -> int | None:
    """A number box's value: None when empty (the model's default), else the int it holds exactly. (The boxes have
    no gradio precision: precision=0 rounds 7.5 to 8 before this sees it.)"""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise gr.Error(f"{label} {value!r} is not allowed: expected a whole number")
    return int(value)


def method_fields(method: str, subjects: str = "", ratio: float | None = None) -> dict[str, Any]:
    """GenerationRequest fields of one image method (PLAIN: none)."""
    if method == PLAIN:
        return {}
    if method == "AgentSD":
        return {"agent": AGENT if ratio is None else AgentAttentionConfig(ratio=float(ratio))}
    if method == "ToMe":
        return {"agent": TOME if ratio is None else AgentAttentionConfig.tome(float(ratio))}
    if method == "structured guidance":
        return {"structured": StructuredGuidanceConfig()}
    if method == "A-STAR":
        return {"astar": "astar"}
    if method == "Attend-and-Excite":
        return {"astar": "attend_and_excite"}
    if method == "IR-Diffusion":
        lines = tuple(line.strip() for line in (subjects or "").splitlines() if line.strip())
        if not lines:
            raise gr.Error("IR-Diffusion needs its subjects: one subject prompt per line (e.g. 'a red circle').")
        return {"subjects": lines}
    raise gr.Error(f"method {method!r} is not allowed: expected one of {', '.join((PLAIN, *IMAGE_METHODS))}")


def radial_fields(
    radial: bool, decay: float, dense_steps: int, dense_layers: int, block: int, neighbors: int | None = None
) -> dict[str, Any]:
    if not radial:
        return {}
    try:
        config = RadialAttentionConfig(
            decay_factor=float(decay), dense_timesteps=_int_or_none(dense_steps, "Dense first steps"),
            dense_layers=_int_or_none(dense_layers, "Dense first "
                                                    "layers"), block_size=_int_or_none(block, "Block size"),
            dense_neighbor_frames=RADIAL.dense_neighbor_frames if neighbors is None
            else _int_or_none(neighbors, "Whole neighbour frames"),
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise gr.Error(str(exc)) from None
    return {"radial": config}


def _pipeline(model: str) -> Any:
    """The loaded pipeline of `model` on the server's device (kept in the bounded pipeline cache)."""
    return cached_pipeline(model, None, SETTINGS.device)


def _is_video(model: str) -> bool:
    """Whether a model makes videos: a preset says so; any other model is loaded to find out."""
    return PRESETS[model].kind == "video" if model in PRESETS else is_video_pipeline(_pipeline(model))


def ui_request(
    model: str,
    prompt: str,
    seed: Any,
    *,
    negative: str = "",
    steps: Any = None,
    guidance: Any = None,
    height: Any = None,
    width: Any = None,
    frames: Any = None,
    maps: bool = True,
    **method: Any,
) -> GenerationRequest:
    """The one translation of the UI's fields into a request: empty boxes mean the model's default, anything else
    is used exactly as given (guidance 0 is 0); what the library refuses is shown with its own message."""
    model = allowed_model(model)
    try:
        video = _is_video(model)
        return GenerationRequest(
            model=model,
            prompt=prompt or "",
            seed=_int_or_none(seed, "Seed") if seed not in (None, "") else 0,
            negative_prompt=negative or None,
            steps=_int_or_none(steps, "Steps"),
            guidance_scale=None if guidance in (None, "") else float(guidance),
            height=_int_or_none(height, "Height"),
            width=_int_or_none(width, "Width"),
            num_frames=_int_or_none(frames, "Frames") if video else None,
            attention_maps=bool(maps) and not video,
            **method,
        )
    except (ValueError, TypeError) as exc:
        raise gr.Error(str(exc)) from None


# ----------------------------------------------------------------------------------------------------- running


class Stopped(Exception):
    """The visitor pressed Stop; raised inside the denoiser between two of its calls."""


def _run(request: GenerationRequest, stop: threading.Event | None = None) -> GenerationResult:
    """Generate `request`; a set `stop` ends it at the next denoiser call (each denoiser gets a pre-hook)."""
    pipe = _pipeline(request.model)
    hooks = []
    if stop is not None:

        def check(module, args):
            if stop.is_set():
                raise Stopped()

        for name in ("unet", "transformer", "transformer_2"):
            denoiser = getattr(pipe, name, None)
            if denoiser is not None:
                hooks.append(denoiser.register_forward_pre_hook(check))
    try:
        return generate(request, pipe=pipe, limits=SETTINGS.limits)
    except Stopped:
        raise gr.Error("Stopped.") from None
    except (ValueError, TypeError, RuntimeError) as exc:
        raise gr.Error(str(exc)) from None
    finally:
        for hook in hooks:
            hook.remove()


def _run_folder() -> Path:
    """A new folder for one run's files inside gradio's cache (cleaned by its delete_cache), never shared."""
    root = Path(get_upload_folder()) / "diffattn-runs"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root))


def _video_file(result: GenerationResult, stem: str) -> str | None:
    """The MP4 of a video result, written into this run's own folder (images go to gradio as PIL images)."""
    for name, write in result_files(result, stem):
        if name.endswith(".mp4"):
            path = _run_folder() / name
            write(path)
            return str(path)
    return None


def _zip(results: list[tuple[str, GenerationResult]]) -> str:
    """One zip of results: every file `result_files` writes (PNG, MP4, maps, mask) and each request as JSON."""
    path = _run_folder() / "diffattn-result.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for stem, result in results:
            for name, write in result_files(result, stem):
                with tempfile.TemporaryDirectory() as scratch:
                    file = Path(scratch) / name
                    write(file)
                    archive.write(file, name)
            if result.request is not None:
                archive.writestr(f"{stem}-request.json", json.dumps(result.request.to_dict(), indent=2))
    return str(path)


def _sampler(model: str) -> str:
    return type(_pipeline(model).scheduler).__name__


def _describe(model: str, image) -> str | None:
    describe = PRESETS[model].describe if model in PRESETS else None
    return None if describe is None or image is None else describe(image)


def _request_line(request: GenerationRequest, result: GenerationResult, seconds: float) -> str:
    """The info line: the whole request in words, where `result` ran, and the time."""
    parts = [f"`{request.model}`", f"seed {request.seed}", f"{request.steps or default_steps(request.model)} steps"]
    defaults = PRESETS[request.model].call_defaults if request.model in PRESETS else {}
    guidance = request.guidance_scale if request.guidance_scale is not None else defaults.get("guidance_scale")
    if guidance is not None:
        parts.append(f"guidance {guidance:g}")
    height, width = request.height or defaults.get("height"), request.width or defaults.get("width")
    if height and width:
        parts.append(f"{width}x{height} px")
    frames = request.num_frames or defaults.get("num_frames")
    if frames and request.model in VIDEO_PRESETS:
        parts.append(f"{frames} frames")
    parts.append(f"sampler {_sampler(request.model)}")
    parts.append(f"{result.device} ({result.dtype})")
    return " · ".join(parts) + f" · **{seconds:.2f} s**"


def _method_name(request: GenerationRequest) -> str:
    if request.subjects:
        return "IR-Diffusion"
    if request.astar is not None:
        return "A-STAR" if request.astar == "astar" else "Attend-and-Excite"
    if request.structured is not None:
        return "structured guidance"
    if request.agent is not None:
        return "ToMe" if request.agent.agent_ratio is None else "AgentSD"
    if request.radial is not None:
        return "radial attention"
    return PLAIN


# ----------------------------------------------------------------------------------------------------- compare


def run_compare(model, prompt, seed, steps, methods, subjects, frames=None, stop=None,
                progress=gr.Progress(track_tqdm=True)):  # fmt: skip
    """Plain and each chosen method on one prompt and seed. Returns (gallery items, video dense, video radial,
    radial mask, table markdown, zip)."""
    model = allowed_model(model)
    video = _is_video(model)
    if video:
        variants = [PLAIN, "radial attention"]
        extra = [{}, {"radial": _compare_radial(model)}]
    else:
        variants = [PLAIN, *[m for m in IMAGE_METHODS if m in (methods or [])]]
        extra = [method_fields(m, subjects) for m in variants]
    requests = [ui_request(model, prompt, seed, steps=steps, frames=frames, **fields) for fields in extra]
    results = []
    for i, (name, request) in enumerate(zip(variants, requests)):
        progress(i / len(requests), desc=f"{name} ({i + 1}/{len(requests)})")
        result = _run(request, stop)
        results.append((name, result, result.seconds))  # the generation's own time, not the model's loading
    plain_seconds = results[0][2]
    rows = ["| method | time | vs plain | judge sees |", "|---|---|---|---|"]
    gallery = []
    for name, result, seconds in results:
        image = result.images[0] if result.images else (result.frames[0] if result.frames else None)
        # the judge: which shapes and colours an image holds; for a video, the captioned objects' presence and motion
        verdict = clip_verdict(result.frames, prompt or "") if video else _describe(model, image)
        caption = f"{name} · {seconds:.2f} s" + (f" · judge: {verdict}" if verdict else "")
        if image is not None:
            gallery.append((image, caption))
        phases = "".join(f"<br>{p} {t:.2f} s" for p, t in result.phase_seconds.items())
        rows.append(f"| {name} | {seconds:.2f} s{phases} | {plain_seconds / seconds:.2f}x | {verdict or '–'} |")
    table = "\n".join(rows)
    table += (
        "\n\n"
        + _request_line(requests[0], results[0][1], plain_seconds)
        + _notes(*[result for _, result, _ in results])
    )
    dense_video = radial_video = mask = None
    if video:
        dense, radial = results[0][1], results[1][1]
        dense_video = _video_file(dense, f"{Path(model).name}-dense")
        radial_video = _video_file(radial, f"{Path(model).name}-radial")
        mask = radial.radial_mask
        density = radial.radial_density
        config = requests[1].radial
        table += (
            f"\n\nradial settings: decay factor {config.decay_factor:g}, dense first steps {config.dense_timesteps}, "
            f"dense first layers {config.dense_layers}, block {config.block_size}"
        )
        if density is not None:  # else no step ran sparse: the radial run's note says so, below the table
            table += (
                f"\n\nradial attention: mask density **{density:.1%}**, speedup "
                f"**{plain_seconds / results[1][2]:.2f}x** (one run each), PSNR against dense "
                f"**{psnr(radial.frames, dense.frames):.1f} dB** (same noise)"
            )
    archive = _zip([(f"{i:02d}-{name.replace(' ', '-')}", r) for i, (name, r, _) in enumerate(results)])
    return (
        gr.update(value=gallery, visible=not video),
        gr.update(value=dense_video, visible=video),
        gr.update(value=radial_video, visible=video),
        gr.update(value=mask, visible=video),
        table,
        archive,
    )


# -------------------------------------------------------------------------------------------- image and video


def run_image(model, prompt, negative, seed, steps, guidance, height, width, method, ratio, subjects, stop=None,
              progress=gr.Progress(track_tqdm=True)):  # fmt: skip
    """One image with one method. Returns (image, attention explorer state, token choices, step slider, map, info,
    zip)."""
    uses_ratio = method in ("AgentSD", "ToMe")
    fields = method_fields(method, subjects, ratio if uses_ratio else None)
    request = ui_request(model, prompt, seed, negative=negative, steps=steps, guidance=guidance, height=height,
                         width=width, **fields)  # fmt: skip
    progress(0, desc=_method_name(request))
    result = _run(request, stop)
    seconds = result.seconds  # the generation's own time, not the model's loading
    image = result.images[0]
    # the attention explorer only where the method recorded maps (the editing methods own the attention layers)
    explorer = None
    tokens = gr.update(choices=[], value=None, visible=False)
    steps_slider = gr.update(maximum=1, value=0, visible=False)
    token_map = gr.update(value=None, visible=False)
    if result.attention_maps is not None:
        labels = [f"{i + 1}: {label}" for i, label in enumerate(result.attention_labels)]
        explorer = {"maps": result.attention_maps, "labels": labels, "image": image}
        count = result.attention_maps.shape[0]
        tokens = gr.update(choices=labels, value=labels[0], visible=True)
        steps_slider = gr.update(minimum=0, maximum=count, value=0, step=1, visible=True)
        token_map = gr.update(value=render_explorer(explorer, labels[0], 0), visible=True)
    info = f"**{_method_name(request)}** · " + _request_line(request, result, seconds)
    if result.attention_maps is None:
        info += " · no attention maps recorded with this method and model"
    if result.subject_grid is not None:
        info += f" · IR-Diffusion with {len(result.reference_images)} subject references"
    if result.phase_seconds:
        info += " · " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.phase_seconds.items())
    verdict = _describe(request.model, image)
    if verdict:
        info += f" · judge sees: {verdict}"
    info += _notes(result)
    return image, explorer, tokens, steps_slider, token_map, result.subject_grid, info, _zip([("image", result)])


def _notes(*results) -> str:
    """What the model did not take as asked (a prompt cut to its text length, a radial run that stayed dense), for
    the end of an info line: each note of `results` once, in order."""
    notes = dict.fromkeys(note for result in results for note in result.notes)
    return "".join(f" · **note:** {note}" for note in notes)


def render_explorer(explorer: dict | None, token: str | None, step: int | float):
    """One token's attention map: averaged over all steps (step 0) or at step `step` (1-based)."""
    if not explorer or token not in explorer["labels"]:
        return None
    index = explorer["labels"].index(token)
    maps = explorer["maps"]
    step = int(step or 0)
    chosen = maps[:, index].mean(0) if step == 0 else maps[min(step, maps.shape[0]) - 1, index]
    label = f"'{token.split(': ', 1)[1]}', " + ("mean over steps" if step == 0 else f"step {step} of {maps.shape[0]}")
    return render_token_map(chosen, explorer["image"], label)


def run_video(model, prompt, seed, steps, frames, height, width, radial, decay, dense_steps, dense_layers, block,
              neighbors=None, stop=None, progress=gr.Progress(track_tqdm=True)):  # fmt: skip
    """One video, with or without radial attention. Returns (video, mask, info, zip)."""
    fields = radial_fields(radial, decay, dense_steps, dense_layers, block, neighbors)
    request = ui_request(model, prompt, seed, steps=steps, height=height, width=width, frames=frames, **fields)
    progress(0, desc=_method_name(request))
    result = _run(request, stop)
    seconds = result.seconds  # the generation's own time, not the model's loading
    info = f"**{_method_name(request)}** · " + _request_line(request, result, seconds)
    if result.radial_density is not None:  # else no step ran sparse: the result's note says so
        info += f" · mask density **{result.radial_density:.1%}**"
    verdict = clip_verdict(result.frames, prompt or "")
    if verdict is not None:
        info += f"\n\njudge: {verdict}"
    info += _notes(result)
    video = _video_file(result, f"{Path(request.model).name}-seed{request.seed}")
    return video, result.radial_mask, info, _zip([("video", result)])


def run_generation(
    model: str,
    prompt: str,
    negative_prompt: str,
    steps: int,
    seed: int,
    guidance_scale: float,
    height: int,
    width: int,
    num_frames: int,
    radial: bool = False,
    decay_factor: float = RADIAL.decay_factor,
    dense_timesteps: int = RADIAL.dense_timesteps,
    dense_layers: int = RADIAL.dense_layers,
    block_size: int = RADIAL.block_size,
    agent: bool = False,
    editing: str = "none",
    subjects: str = "",
):
    """The API endpoint (`/generate`, for gradio_client): returns (image, video, attention grid, radial mask,
    IR-Diffusion picture, info markdown)."""
    fields: dict[str, Any] = radial_fields(radial, decay_factor, dense_timesteps, dense_layers, block_size)
    if agent:
        fields.update(method_fields("AgentSD"))
    if editing not in ("none", "structured guidance", "A-STAR"):
        raise gr.Error(f"editing={editing!r} is not allowed: expected 'none', 'structured guidance' or 'A-STAR'")
    if editing != "none":
        fields.update(method_fields(editing))
    if (subjects or "").strip():
        fields.update(method_fields("IR-Diffusion", subjects))
    request = ui_request(model, prompt, seed, negative=negative_prompt, steps=steps, guidance=guidance_scale,
                         height=height, width=width, frames=num_frames, **fields)  # fmt: skip
    result = _run(request)
    seconds = result.seconds  # the generation's own time, not the model's loading
    video = _video_file(result, f"{Path(request.model).name}-seed{request.seed}")
    image = result.images[0] if result.images else (result.frames[0] if video is None and result.frames else None)
    info = f"**{result.kind}** from `{request.model}` in **{seconds:.2f} s** · " + _request_line(
        request, result, seconds
    )
    if result.radial_density is not None:  # else no step ran sparse: the result's note says so
        info += f" · radial attention, mask density **{result.radial_density:.1%}**"
    if result.subject_grid is not None:
        info += f" · IR-Diffusion with {len(result.reference_images)} subject references"
    info += _notes(result)
    return image, video, result.attention_grid, result.radial_mask, result.subject_grid, info


# ---------------------------------------------------------------------------------------------------- the page


def _preset_defaults(*keys: str):
    """A model-change handler filling the steps box and the boxes of `keys` with a preset's own values; any other
    model gets empty boxes, which mean its own defaults."""

    def fill(model: str):
        defaults = PRESETS[model].call_defaults if model in PRESETS else {}
        steps = gr.update(value=default_steps(model) if model in PRESETS else None)
        return (steps, *(gr.update(value=defaults.get(key)) for key in keys))

    return fill


STARTING_PROMPTS = frozenset(preset.prompt for preset in PRESETS.values())


def _prompt_for(model: str, prompt: str | None):
    """The prompt box after a model change: a preset's own prompt where the box is empty or still holds the prompt
    some preset started with (a video caption means nothing to an image model, and back); what a visitor typed
    stays."""
    if model in PRESETS and (not (prompt or "").strip() or prompt in STARTING_PROMPTS):
        return gr.update(value=PRESETS[model].prompt)
    return gr.update()


def _compare_defaults(model: str, prompt: str | None):
    """Steps of the model; the frames box only for video models, with the preset's comparison frames (enough latent
    frames for the radial mask to be sparse); the prompt (`_prompt_for`); the image methods and their subjects only
    for image models (a video model compares dense with radial)."""
    video = model in VIDEO_PRESETS
    frames = PRESETS[model].compare_frames if video else None
    return (
        gr.update(value=default_steps(model) if model in PRESETS else None),
        gr.update(value=frames, visible=video),
        _prompt_for(model, prompt),
        gr.update(visible=not video),
        gr.update(visible=not video),
    )


def _compare_radial(model: str) -> RadialAttentionConfig:
    """Radial settings of the Compare tab: the model's own (a preset's), else the library's with one dense step and
    the smallest block, so a short clip is still sparse."""
    if model in PRESETS and PRESETS[model].radial is not None:
        return radial_defaults(model)
    return RadialAttentionConfig(dense_timesteps=1, block_size=min(BLOCK_SIZES))


def _radial_controls(model: str):
    """Video tab: the radial sliders at the model's radial defaults."""
    config = radial_defaults(model)
    return (gr.update(value=config.decay_factor), gr.update(value=config.dense_timesteps),
            gr.update(value=config.dense_layers), gr.update(value=config.block_size),
            gr.update(value=config.dense_neighbor_frames))  # fmt: skip


def _random_seed() -> int:
    return random.randrange(0, 2**31)


def _busy():
    return gr.update(interactive=False), gr.update(interactive=True)


def _idle():
    return gr.update(interactive=True), gr.update(interactive=False)


def _stop(stop: threading.Event) -> None:
    stop.set()


def _arm(stop: threading.Event):
    stop.clear()
    return _busy()


def _guarded(fn, outputs: list, note: Any):
    """`fn` for one job's event: on success its outputs and idle buttons; on a refusal or a stop, the message in a
    toast and in the `note` markdown, the other outputs left as they were, and idle buttons. (A raised error would
    end the event chain and leave Generate disabled.)"""

    def run(*args, progress=gr.Progress(track_tqdm=True)):
        try:
            values = fn(*args, progress=progress)
        except gr.Error as exc:
            gr.Warning(str(exc.message))
            values = [f"**Not run:** {exc.message}" if out is note else gr.skip() for out in outputs]
        return (*values, *_idle())

    return run


def _job(run_button, stop_button, stop_state, fn, inputs, outputs, api_name, note):
    """Generate disabled and Stop enabled while `fn` runs; Stop ends it at the next denoiser call."""
    event = run_button.click(_arm, stop_state, [run_button, stop_button], queue=False)
    event.then(_guarded(fn, outputs, note), [*inputs, stop_state], [*outputs, run_button, stop_button],
               api_name=api_name, concurrency_id="gpu")  # fmt: skip
    stop_button.click(_stop, stop_state, None, queue=False)


def _seed_row():
    with gr.Row():
        seed = gr.Number(value=0, label="Seed", scale=4)
        dice = gr.Button("Random seed", scale=1, min_width=60)
    dice.click(_random_seed, None, seed, queue=False)
    return seed


EXAMPLES = [
    # (model, prompt, seed, methods, subjects, frames, what it shows)
    ("shapes-sd", "a red circle and a blue square", 0, ["IR-Diffusion"], "a red circle\na blue square", None,
     "IR-Diffusion keeps both subjects: plain draws one red square, IR-Diffusion a red circle and a blue square"),
    ("tiny-sd", "a red car and a white sheep", 0, ["AgentSD", "ToMe"], "", None,
     "AgentSD and ToMe: the time column (random weights: the pictures are noise)"),
    ("shapes-wan", "a red circle moving right", 0, [], "", 33,
     "radial attention on a trained video model: dense and radial side by side, the PSNR between them, the mask, "
     "its density and the judge's reading of both videos"),
    ("tiny-wan", "a boat at sea", 0, [], "", 33,
     "radial attention on 33 frames of a Wan-shaped model with random weights: the mask, its density, the speedup"),
    ("shapes-sd", "a green star and a yellow triangle", 3, ["structured guidance", "A-STAR", "Attend-and-Excite"], "",
     None, "the latent and cross-attention editors; on this small model they change little (README: compositional "
     "benchmark)"),
]  # fmt: skip


def build_demo(settings: ServerSettings | None = None) -> gr.Blocks:
    """The UI. `settings`: the server's limits, allowed models, cache sizes (default: `ServerSettings()`)."""
    global SETTINGS
    SETTINGS = settings or ServerSettings()
    PIPELINES.resize(SETTINGS.pipeline_cache)
    first = PRESETS[DEFAULT_PRESET]
    models = list(PRESETS) + list(SETTINGS.models)
    custom = SETTINGS.allow_any_model
    with gr.Blocks(title="diffattn", delete_cache=SETTINGS.delete_cache) as demo:
        gr.Markdown(
            "# diffattn\nSee what an attention method does to your prompt. `shapes-sd` is a small model trained by "
            "diffattn on coloured-shape scenes (*a red circle and a blue square*); the judge below each image says "
            "which shapes and colours it finds. `shapes-wan` is a small video model trained by diffattn on moving "
            "shapes (*a red circle moving right*): Compare shows its dense and radial videos side by side. The "
            "`tiny-*` presets have random weights (noise-like pictures, real timings)."
        )
        with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
            with gr.Row():
                with gr.Column(scale=2):
                    c_model = gr.Dropdown(models, value=DEFAULT_PRESET, allow_custom_value=custom, label="Model",
                                          elem_id="compare-model")  # fmt: skip
                    c_prompt = gr.Textbox(value=first.prompt, label="Prompt", lines=2, elem_id="compare-prompt")
                    c_seed = _seed_row()
                    with gr.Row():
                        c_steps = gr.Number(value=first.steps, label="Steps")
                        c_frames = gr.Number(value=None, label="Frames", visible=False)
                    c_methods = gr.CheckboxGroup(
                        list(IMAGE_METHODS), value=["IR-Diffusion", "structured guidance"],
                        label="Methods beside plain (image models; video models compare dense with radial)",
                        elem_id="compare-methods",
                    )  # fmt: skip
                    c_subjects = gr.Textbox(
                        value="a red circle\na blue square", lines=2, label="IR-Diffusion subjects",
                        info=HELP["subjects"], elem_id="compare-subjects",
                    )  # fmt: skip
                    with gr.Row():
                        c_run = gr.Button("Compare", variant="primary", elem_id="compare-run")
                        c_stop = gr.Button("Stop", interactive=False, elem_id="compare-stop")
                with gr.Column(scale=3):
                    c_gallery = gr.Gallery(
                        label="Plain and each method (same prompt, same seed)", columns=4, height=330,
                        object_fit="contain", format="png", elem_id="compare-gallery", elem_classes="pixelated",
                    )  # fmt: skip
                    with gr.Row():
                        c_dense = gr.Video(label="Dense attention", visible=False, elem_id="compare-dense",
                                           elem_classes="pixelated")  # fmt: skip
                        c_radial = gr.Video(label="Radial attention", visible=False, elem_id="compare-radial",
                                            elem_classes="pixelated")  # fmt: skip
                    c_table = gr.Markdown(elem_id="compare-table")
                    c_mask = gr.Image(label="Radial mask (white: computed blocks)", visible=False, type="pil",
                                      format="png", elem_classes="pixelated")  # fmt: skip
                    c_zip = gr.File(label="Download (PNG/MP4, maps, mask, requests)", elem_id="compare-zip")
            c_state = gr.State(threading.Event)
            _job(c_run, c_stop, c_state, run_compare,
                 [c_model, c_prompt, c_seed, c_steps, c_methods, c_subjects, c_frames],
                 [c_gallery, c_dense, c_radial, c_mask, c_table, c_zip], "compare", c_table)  # fmt: skip
            c_model.change(_compare_defaults, [c_model, c_prompt],
                           [c_steps, c_frames, c_prompt, c_methods, c_subjects])  # fmt: skip

        with gr.Tab("Image", id="image", elem_id="tab-image"):
            with gr.Row():
                with gr.Column(scale=2):
                    i_model = gr.Dropdown(
                        IMAGE_PRESETS + list(SETTINGS.models), value=DEFAULT_PRESET, allow_custom_value=custom,
                        label="Model",
                    )  # fmt: skip
                    i_prompt = gr.Textbox(value=first.prompt, label="Prompt", lines=2)
                    i_negative = gr.Textbox(value="", label="Negative prompt")
                    i_seed = _seed_row()
                    i_method = gr.Radio([PLAIN, *IMAGE_METHODS], value=PLAIN, label="Method", elem_id="image-method")
                    i_ratio = gr.Slider(0.0, 0.9, value=AGENT.ratio, step=0.05, label="Merge ratio",
                                        info=HELP["ratio"], visible=False)  # fmt: skip
                    i_subjects = gr.Textbox(value="a red circle\na blue square", lines=2, label="Subjects",
                                            info=HELP["subjects"], visible=False)  # fmt: skip
                    with gr.Accordion("Size, steps, guidance", open=False):
                        i_steps = gr.Number(value=first.steps, label="Steps", elem_id="image-steps")
                        i_guidance = gr.Number(value=first.call_defaults.get("guidance_scale"), label="Guidance",
                                               info=HELP["guidance"])  # fmt: skip
                        i_height = gr.Number(value=first.call_defaults.get("height"), label="Height",
                                             elem_id="image-height")  # fmt: skip
                        i_width = gr.Number(value=first.call_defaults.get("width"), label="Width",
                                            elem_id="image-width")  # fmt: skip
                    with gr.Row():
                        i_run = gr.Button("Generate", variant="primary", elem_id="image-run")
                        i_stop = gr.Button("Stop", interactive=False, elem_id="image-stop")
                with gr.Column(scale=3):
                    i_image = gr.Image(label="Image", type="pil", format="png", height=384,
                                       elem_classes="pixelated", elem_id="image-out")  # fmt: skip
                    i_info = gr.Markdown(elem_id="image-info")
                    with gr.Row():
                        i_token = gr.Dropdown([], label="Attention map of token", scale=2)
                        i_step = gr.Slider(0, 1, value=0, step=1, label="Step (0: mean over steps)", scale=2)
                    i_map = gr.Image(label="Cross-attention map", type="pil", format="png", height=440,
                                     elem_classes="pixelated")  # fmt: skip
                    i_subject_view = gr.Image(label="IR-Diffusion: references with masks, plain scene, IR scene",
                                              type="pil", format="png")  # fmt: skip
                    i_zip = gr.File(label="Download (PNG, maps, request)")
            i_state = gr.State(threading.Event)
            i_explorer = gr.State(None)
            _job(i_run, i_stop, i_state, run_image,
                 [i_model, i_prompt, i_negative, i_seed, i_steps, i_guidance, i_height, i_width, i_method, i_ratio,
                  i_subjects],
                 [i_image, i_explorer, i_token, i_step, i_map, i_subject_view, i_info, i_zip], "image",
                 i_info)  # fmt: skip
            i_token.change(render_explorer, [i_explorer, i_token, i_step], i_map, queue=False)
            i_step.release(render_explorer, [i_explorer, i_token, i_step], i_map, queue=False)
            i_method.change(
                lambda m: (
                    gr.update(visible=m in ("AgentSD", "ToMe"), value=TOME.ratio if m == "ToMe" else AGENT.ratio),
                    gr.update(visible=m == "IR-Diffusion"),
                ),
                i_method,
                [i_ratio, i_subjects],
            )
            i_model.change(_preset_defaults("height", "width", "guidance_scale"), i_model,
                           [i_steps, i_height, i_width, i_guidance])  # fmt: skip
            i_model.change(_prompt_for, [i_model, i_prompt], i_prompt)

        with gr.Tab("Video", id="video", elem_id="tab-video"):
            video_first = DEFAULT_VIDEO_PRESET
            video_radial = radial_defaults(video_first)
            with gr.Row():
                with gr.Column(scale=2):
                    v_model = gr.Dropdown(VIDEO_PRESETS + list(SETTINGS.models), value=video_first,
                                          allow_custom_value=custom, label="Model")  # fmt: skip
                    v_prompt = gr.Textbox(value=PRESETS[video_first].prompt, label="Prompt", lines=2)
                    v_seed = _seed_row()
                    v_steps = gr.Number(value=default_steps(video_first), label="Steps")
                    v_frames = gr.Number(value=PRESETS[video_first].call_defaults.get("num_frames"),
                                         label="Frames")  # fmt: skip
                    with gr.Accordion("Size", open=False):
                        v_height = gr.Number(value=PRESETS[video_first].call_defaults.get("height"),
                                             label="Height")  # fmt: skip
                        v_width = gr.Number(value=PRESETS[video_first].call_defaults.get("width"),
                                            label="Width")  # fmt: skip
                    v_radial = gr.Checkbox(value=True, label="Radial attention")
                    v_decay = gr.Slider(0.05, 2.0, value=video_radial.decay_factor, step=0.05, label="Decay factor",
                                        info=HELP["decay"])  # fmt: skip
                    v_dense_steps = gr.Slider(
                        0,
                        50,
                        value=video_radial.dense_timesteps,
                        step=1,
                        label="Dense first steps",
                        info=HELP["dense_steps"],
                    )
                    v_dense_layers = gr.Slider(
                        0,
                        8,
                        value=video_radial.dense_layers,
                        step=1,
                        label="Dense first layers",
                        info=HELP["dense_layers"],
                    )
                    v_block = gr.Radio(list(BLOCK_SIZES), value=video_radial.block_size, label="Block size",
                                       info=HELP["block"])  # fmt: skip
                    v_neighbors = gr.Slider(0, 4, value=video_radial.dense_neighbor_frames, step=1,
                                            label="Whole neighbour frames", info=HELP["neighbors"])  # fmt: skip
                    with gr.Row():
                        v_run = gr.Button("Generate", variant="primary", elem_id="video-run")
                        v_stop = gr.Button("Stop", interactive=False, elem_id="video-stop")
                with gr.Column(scale=3):
                    v_video = gr.Video(label="Video", elem_id="video-out", elem_classes="pixelated")
                    v_mask = gr.Image(label="Radial mask (white: computed blocks)", type="pil", format="png",
                                      elem_classes="pixelated")  # fmt: skip
                    v_info = gr.Markdown(elem_id="video-info")
                    v_zip = gr.File(label="Download (MP4, mask, request)")
            v_state = gr.State(threading.Event)
            _job(v_run, v_stop, v_state, run_video,
                 [v_model, v_prompt, v_seed, v_steps, v_frames, v_height, v_width, v_radial, v_decay, v_dense_steps,
                  v_dense_layers, v_block, v_neighbors],
                 [v_video, v_mask, v_info, v_zip], "video", v_info)  # fmt: skip
            v_model.change(_preset_defaults("num_frames", "height", "width"), v_model,
                           [v_steps, v_frames, v_height, v_width])  # fmt: skip
            v_model.change(_radial_controls, v_model, [v_decay, v_dense_steps, v_dense_layers, v_block, v_neighbors])
            v_model.change(_prompt_for, [v_model, v_prompt], v_prompt)

        with gr.Tab("Examples", id="examples", elem_id="tab-examples"):
            gr.Markdown(
                "Click an example, then **Compare** on the first tab.\n\n"
                + "\n".join(f"- `{e[0]}`, *{e[1]}*: {e[6]}" for e in EXAMPLES)
            )
            gr.Examples([list(e[:6]) for e in EXAMPLES], [c_model, c_prompt, c_seed, c_methods, c_subjects, c_frames],
                        label="Where each method helps")  # fmt: skip

        # The API of earlier versions, for scripts (gradio_client): one call, every option.
        with gr.Row(visible=False):
            api_inputs = [gr.Textbox(), gr.Textbox(), gr.Textbox(), gr.Number(), gr.Number(), gr.Number(),
                          gr.Number(), gr.Number(), gr.Number(), gr.Checkbox(), gr.Number(), gr.Number(),
                          gr.Number(), gr.Number(), gr.Checkbox(), gr.Textbox(), gr.Textbox()]  # fmt: skip
            api_outputs = [
                gr.Image(type="pil", format="png"),
                gr.Video(),
                gr.Image(type="pil", format="png"),
                gr.Image(type="pil", format="png"),
                gr.Image(type="pil", format="png"),
                gr.Markdown(),
            ]
            api_button = gr.Button()
        api_button.click(run_generation, api_inputs, api_outputs, api_name="generate", concurrency_id="gpu")
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="diffattn web UI")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--limits", nargs="+", default=None, metavar="NAME=INT",
                        help="size limits of a visitor's request (names: diffattn.Limits; default: its "
                             "defaults)")  # fmt: skip
    parser.add_argument("--model", action="append", default=[], metavar="ID_OR_PATH",
                        help="a model visitors may use besides the presets (repeatable)")  # fmt: skip
    parser.add_argument("--allow-any-model", action="store_true",
                        help="let visitors load any hub id or path on this server (off by default)")  # fmt: skip
    parser.add_argument("--pipeline-cache", type=int, default=2, help="pipelines kept loaded (default: 2)")
    parser.add_argument("--queue", type=int, default=16, help="requests waiting at most (default: 16)")
    parser.add_argument("--device", default=None,
                        help="torch device the models run on, e.g. cuda:1 or cpu (default: cuda if available, else "
                             "cpu)")  # fmt: skip
    args = parser.parse_args()
    try:
        limits = Limits() if args.limits is None else Limits.parse(args.limits)
        device = None if args.device is None else parse_device(args.device)
        settings = ServerSettings(limits, tuple(args.model), args.allow_any_model, args.pipeline_cache,
                                  device=device)  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    serve(build_demo(settings), queue=args.queue, server_name=args.host, server_port=args.port)


def serve(demo: gr.Blocks, queue: int = 16, **launch: Any) -> None:
    """Queue (one job at a time, at most `queue` waiting) and launch with the page's style."""
    demo.queue(default_concurrency_limit=1, max_size=queue).launch(css=CSS, **launch)


if __name__ == "__main__":
    main()
