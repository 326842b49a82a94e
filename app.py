"""diffattn's Gradio UI: `python app.py` serves http://127.0.0.1:7860.

Generate an image or a video from a preset (offline) or a model id, see the progress, and, for Stable Diffusion
models, the cross-attention map of every prompt token, AgentSD, structured guidance, A-STAR, or IR-Diffusion (one
subject prompt per line: the references, their masks and the scene); video models can run radial attention, with
its mask shown.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from diffattn.generation import (
    PIPELINES,
    GenerationResult,
    cached_pipeline,
    default_steps,
    generate,
    is_video_pipeline,
)
from diffattn.limits import Limits
from diffattn.methods.agent_attention import AgentAttentionConfig
from diffattn.methods.radial_attention import RadialAttentionConfig
from diffattn.methods.radial_mask import BLOCK_SIZES
from diffattn.methods.structured_guidance import StructuredGuidanceConfig
from diffattn.outputs import result_files
from diffattn.presets import DEFAULT_PRESET, PRESETS


@dataclass
class ServerSettings:
    """What whoever serves the UI decides: the size limits, the models visitors may use, the pipeline cache size
    and how long outputs stay in gradio's cache."""

    limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = ()  # besides the presets
    allow_any_model: bool = False  # any hub id or server path a visitor types (off: presets and `models` only)
    pipeline_cache: int = 2
    delete_cache: tuple[int, int] = (3600, 3600)  # gradio's delete_cache: (every N seconds, files older than M)


SETTINGS = ServerSettings()
RADIAL = RadialAttentionConfig()  # the UI's radial defaults are the library's


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
    progress=gr.Progress(track_tqdm=True),
):
    """The UI's one event: returns (image, video, attention grid, radial mask, IR-Diffusion picture, info markdown)."""
    model = allowed_model(model)
    try:
        video_model = is_video_pipeline(cached_pipeline(model))
        radial_config = None
        if radial:
            radial_config = RadialAttentionConfig(
                decay_factor=float(decay_factor),
                dense_timesteps=int(dense_timesteps),
                dense_layers=int(dense_layers),
                block_size=int(block_size),
            )
        result: GenerationResult = generate(
            model,
            prompt,
            negative_prompt=negative_prompt or None,
            steps=int(steps),
            seed=int(seed),
            guidance_scale=None if guidance_scale is None else float(guidance_scale),
            height=int(height) if height else None,
            width=int(width) if width else None,
            num_frames=int(num_frames) if num_frames and video_model else None,
            radial=radial_config,
            agent=AgentAttentionConfig() if agent else None,
            structured=StructuredGuidanceConfig() if editing == "structured guidance" else None,
            astar="astar" if editing == "A-STAR" else None,
            subjects=[line.strip() for line in (subjects or "").splitlines() if line.strip()] or None,
            limits=SETTINGS.limits,
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        raise gr.Error(str(exc)) from None
    video = _video_file(result, f"{Path(model).name}-seed{int(seed)}")
    image = result.images[0] if result.images else (result.frames[0] if video is None and result.frames else None)
    info = f"**{result.kind}** from `{model}` in **{result.seconds:.2f} s** ({int(steps)} steps, seed {int(seed)})"
    if result.radial_density is not None:
        info += f" · radial attention, mask density **{result.radial_density:.1%}**"
    elif radial:
        info += " · radial attention applied, but every step ran dense (dense timesteps >= steps)"
    if result.subject_grid is not None:
        info += f" · IR-Diffusion with {len(result.reference_images)} subject references"
    return image, video, result.attention_grid, result.radial_mask, result.subject_grid, info


def _on_model_change(model: str):
    """Fill size fields with the preset's defaults when a preset is picked."""
    defaults = PRESETS[model].call_defaults if model in PRESETS else {}
    return (
        gr.update(value=default_steps(model)),
        gr.update(value=defaults.get("height", 512)),
        gr.update(value=defaults.get("width", 512)),
        gr.update(value=defaults.get("num_frames", 9)),
        gr.update(value=defaults.get("guidance_scale", 7.5)),
    )


def build_demo(settings: ServerSettings | None = None) -> gr.Blocks:
    """The UI. `settings`: the server's limits, allowed models, cache sizes (default: `ServerSettings()`)."""
    global SETTINGS
    SETTINGS = settings or ServerSettings()
    PIPELINES.resize(SETTINGS.pipeline_cache)
    first = PRESETS[DEFAULT_PRESET].call_defaults
    with gr.Blocks(title="diffattn", delete_cache=SETTINGS.delete_cache) as demo:
        gr.Markdown(
            "# diffattn\nAttention control for diffusers. `shapes-sd` is a small model trained by diffattn on "
            "coloured-shape scenes (prompts like *a red circle and a blue square*); the `tiny-*` presets run offline "
            "with random weights; "
            "type a hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`) to use a real model."
        )
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(
                    choices=list(PRESETS) + list(SETTINGS.models), value=DEFAULT_PRESET,
                    allow_custom_value=SETTINGS.allow_any_model, label="Model",
                )  # fmt: skip
                prompt = gr.Textbox(
                    value=PRESETS[DEFAULT_PRESET].demo_prompt or "a photo of a red cat", label="Prompt", lines=2
                )
                negative = gr.Textbox(value="", label="Negative prompt")
                steps = gr.Slider(1, 100, value=default_steps(DEFAULT_PRESET), step=1, label="Steps")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                with gr.Accordion("Advanced", open=False):
                    guidance = gr.Number(value=first.get("guidance_scale", 7.5), label="Guidance scale")
                    height = gr.Number(value=first.get("height", 512), precision=0, label="Height")
                    width = gr.Number(value=first.get("width", 512), precision=0, label="Width")
                    frames = gr.Number(value=9, precision=0, label="Frames (video models)")
                with gr.Accordion("Radial attention (video models)", open=False):
                    radial = gr.Checkbox(value=False, label="Use radial attention")
                    decay = gr.Slider(
                        0.05, 2.0, value=RADIAL.decay_factor, step=0.05, label="Decay factor (band width)"
                    )
                    dense_steps = gr.Slider(0, 50, value=RADIAL.dense_timesteps, step=1, label="Dense first steps")
                    dense_layers = gr.Slider(0, 8, value=RADIAL.dense_layers, step=1, label="Dense first layers")
                    block = gr.Radio(list(BLOCK_SIZES), value=RADIAL.block_size, label="Block size")
                with gr.Accordion("Stable Diffusion methods", open=False):
                    agent = gr.Checkbox(value=False, label="AgentSD: token merging + agent attention")
                    editing = gr.Radio(
                        ["none", "structured guidance", "A-STAR"], value="none", label="Cross-attention editing"
                    )
                    subjects = gr.Textbox(
                        value="", lines=2, label="IR-Diffusion subjects: one prompt per line, e.g. 'a red circle'"
                    )
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="Image", type="pil", format="png")
                video = gr.Video(label="Video")
                maps = gr.Image(label="Cross-attention maps per prompt token", type="pil", format="png")
                mask = gr.Image(label="Radial mask (white: computed blocks)", type="pil", format="png")
                subject_view = gr.Image(
                    label="IR-Diffusion: references with masks, plain scene, IR scene", type="pil", format="png"
                )
                info = gr.Markdown()
        model.change(_on_model_change, inputs=model, outputs=[steps, height, width, frames, guidance])
        button.click(
            run_generation,
            inputs=[
                model,
                prompt,
                negative,
                steps,
                seed,
                guidance,
                height,
                width,
                frames,
                radial,
                decay,
                dense_steps,
                dense_layers,
                block,
                agent,
                editing,
                subjects,
            ],
            outputs=[image, video, maps, mask, subject_view, info],
            api_name="generate",
            concurrency_id="gpu",
        )
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="diffattn web UI")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument(
        "--limits",
        nargs="+",
        default=None,
        metavar="NAME=INT",
        help="size limits of a visitor's request (names: diffattn.Limits; default: its defaults)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ID_OR_PATH",
        help="a model visitors may use besides the presets (repeatable)",
    )
    parser.add_argument(
        "--allow-any-model",
        action="store_true",
        help="let visitors load any hub id or path on this server (off by default)",
    )
    parser.add_argument("--pipeline-cache", type=int, default=2, help="pipelines kept loaded (default: 2)")
    args = parser.parse_args()
    try:
        limits = Limits() if args.limits is None else Limits.parse(args.limits)
        settings = ServerSettings(limits, tuple(args.model), args.allow_any_model, args.pipeline_cache)
    except ValueError as exc:
        parser.error(str(exc))
    demo = build_demo(settings)
    demo.queue(default_concurrency_limit=1, max_size=16).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
