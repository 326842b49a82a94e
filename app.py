"""diffattn's Gradio UI: `python app.py` serves http://127.0.0.1:7860.

Generate an image or a video from a preset (offline) or a model id, see the progress, and, for Stable Diffusion
models, the cross-attention map of every prompt token, AgentSD, structured guidance, A-STAR, or IR-Diffusion (one
subject prompt per line: the references, their masks and the scene); video models can run radial attention, with
its mask shown.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import gradio as gr

from diffattn.generation import GenerationResult, default_steps, generate, save_result
from diffattn.methods.agent_attention import AgentAttentionConfig
from diffattn.methods.radial_attention import RadialAttentionConfig
from diffattn.methods.structured_guidance import StructuredGuidanceConfig
from diffattn.presets import DEFAULT_PRESET, PRESETS


OUTPUT_DIR = Path(tempfile.gettempdir()) / "diffattn-ui"


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
    decay_factor: float = 1.0,
    dense_timesteps: int = 12,
    dense_layers: int = 1,
    block_size: int = 128,
    agent: bool = False,
    editing: str = "none",
    subjects: str = "",
    progress=gr.Progress(track_tqdm=True),
):
    """The UI's one event: returns (image, video, attention grid, radial mask, IR-Diffusion picture, info markdown)."""
    model = (model or "").strip()
    if not model:
        raise gr.Error("Choose a preset or type a model id.")
    try:
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
            guidance_scale=float(guidance_scale) if guidance_scale else None,
            height=int(height) if height else None,
            width=int(width) if width else None,
            num_frames=int(num_frames) if num_frames else None,
            radial=radial_config,
            agent=AgentAttentionConfig() if agent else None,
            structured=StructuredGuidanceConfig() if editing == "structured guidance" else None,
            astar="astar" if editing == "A-STAR" else None,
            subjects=[line.strip() for line in (subjects or "").splitlines() if line.strip()] or None,
        )
    except (ValueError, RuntimeError) as exc:
        raise gr.Error(str(exc)) from None
    paths = save_result(result, OUTPUT_DIR, f"{Path(model).name}-seed{int(seed)}")
    video = next((str(p) for p in paths if p.suffix == ".mp4"), None)
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


def build_demo() -> gr.Blocks:
    first = PRESETS[DEFAULT_PRESET].call_defaults
    with gr.Blocks(title="diffattn") as demo:
        gr.Markdown(
            "# diffattn\nAttention control for diffusers. `shapes-sd` is a small model trained by diffattn on "
            "coloured-shape scenes (prompts like *a red circle and a blue square*); the `tiny-*` presets run offline "
            "with random weights; "
            "type a hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`) to use a real model."
        )
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(
                    choices=list(PRESETS), value=DEFAULT_PRESET, allow_custom_value=True, label="Model"
                )
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
                    decay = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Decay factor (band width)")
                    dense_steps = gr.Slider(0, 50, value=1, step=1, label="Dense first steps")
                    dense_layers = gr.Slider(0, 8, value=0, step=1, label="Dense first layers")
                    block = gr.Radio([64, 128], value=64, label="Block size")
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
                image = gr.Image(label="Image", type="pil")
                video = gr.Video(label="Video")
                maps = gr.Image(label="Cross-attention maps per prompt token", type="pil")
                mask = gr.Image(label="Radial mask (white: computed blocks)", type="pil")
                subject_view = gr.Image(label="IR-Diffusion: references with masks, plain scene, IR scene", type="pil")
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
    args = parser.parse_args()
    build_demo().queue(default_concurrency_limit=1, max_size=16).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
