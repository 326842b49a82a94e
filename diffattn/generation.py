"""One generation as the CLI, the demo and the UI run it: load (cached), call the pipeline, time it, save it.

Faces layer: this module may use everything below it (pipelines, methods, the core).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .control import apply
from .guidance import GuidanceInterval, as_guidance_interval
from .judge import subject_mask
from .limits import Limits
from .loading import load_pipeline
from .methods.agent_attention import AgentAttentionConfig
from .methods.attention_maps import AttentionMapConfig, prompt_token_labels, render_attention_grid
from .methods.ir_diffusion import IRDiffusionConfig
from .methods.ir_masks import render_subject_grid
from .methods.radial_attention import RadialAttentionConfig
from .methods.radial_mask import plot_radial_mask
from .methods.structured_guidance import StructuredGuidanceConfig
from .outputs import save_result, video_export_available  # noqa: F401 - re-exported for the faces
from .presets import PRESETS
from .request import GenerationRequest
from .validation import check_int_range


logger = logging.getLogger(__name__)

# Models whose pictures a segmenter can read, for IR-Diffusion's subject masks (others: masks from attention).
SUBJECT_SEGMENTERS = {"shapes-sd": subject_mask}


class PipelineCache:
    """Loaded pipelines by (model, dtype, device), least recently used evicted past `size` (the UI's server sets it;
    a pipeline is large, so an unbounded cache would grow with every model a visitor names)."""

    def __init__(self, size: int = 2):
        self.resize(size)
        self.entries: OrderedDict[tuple[str, str | None, str | None], Any] = OrderedDict()

    def resize(self, size: int) -> None:
        self.size = check_int_range("pipeline cache size", size, 1)
        while len(getattr(self, "entries", ())) > self.size:
            self.entries.popitem(last=False)

    def get(self, model: str, torch_dtype: str | None = None, device: str | None = None) -> Any:
        key = (model, torch_dtype, device)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        pipe = load_pipeline(model, torch_dtype=torch_dtype, device=device)
        self.entries[key] = pipe
        while len(self.entries) > self.size:
            evicted, _ = self.entries.popitem(last=False)
            logger.info("pipeline cache: evicted %s", evicted)
        return pipe


PIPELINES = PipelineCache()


def cached_pipeline(model: str, torch_dtype: str | None = None, device: str | None = None) -> Any:
    """`load_pipeline` once per (model, dtype, device) in this process (the UI and demo reuse pipelines), kept in
    the bounded `PIPELINES` cache."""
    return PIPELINES.get(model, torch_dtype, device)


def is_video_pipeline(pipe: Any) -> bool:
    """Video pipelines take `num_frames` (Wan, HunyuanVideo, CogVideoX, LTX, Mochi, ...)."""
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def has_sd_unet(pipe: Any) -> bool:
    unet = getattr(pipe, "unet", None)
    return unet is not None and type(unet).__name__ == "UNet2DConditionModel" and hasattr(pipe, "tokenizer")


@dataclass
class GenerationResult:
    """Images (image models) or frames of one video (video models), with timing and optional attention maps."""

    model: str
    prompt: str
    seed: int
    kind: str  # "image" or "video"
    images: list[Image.Image] = field(default_factory=list)
    frames: list[Image.Image] = field(default_factory=list)
    seconds: float = 0.0
    attention_grid: Image.Image | None = None
    radial_mask: Image.Image | None = None
    radial_density: float | None = None
    reference_images: list[Image.Image] = field(default_factory=list)  # IR-Diffusion: one per subject
    subject_grid: Image.Image | None = None  # IR-Diffusion: references, masks, plain and IR scene
    plain_images: list[Image.Image] = field(default_factory=list)  # IR-Diffusion: the scene with plain attention
    call_kwargs: dict[str, Any] = field(default_factory=dict)


def default_steps(model: str) -> int:
    """Denoising steps when a call names none: the preset's (4 for the random tiny ones, 20 for shapes-sd), 30 for
    other models (a diffusers-like default for real checkpoints)."""
    return PRESETS[model].steps if model in PRESETS else 30


def generation_defaults(model: str) -> dict[str, Any]:
    """Call arguments a model is meant to run with: the preset's, or none for other models."""
    return dict(PRESETS[model].call_defaults) if model in PRESETS else {}


def generate(
    model: str | GenerationRequest, prompt: str | None = None, *, seed: int = 0, **options: Any
) -> GenerationResult:
    """Generate one image or video; for SD-family models also the cross-attention heatmap grid.

    With `radial`, radial attention is applied for this call (video models) and the result carries the mask
    picture and its density. With `agent`, AgentSD / token merging is applied (Stable Diffusion UNets). With
    `astar` ("astar", "attend_and_excite" or "both"), the call runs `AStarPipeline` on the same components.
    `guidance_interval` (start, stop): guide only those fractions of the steps (`GuidanceInterval`); None guides
    every step. With `subjects` (one prompt per subject, each naming a subject of `prompt`), the call runs
    `IRDiffusionPipeline` (config `ir`, default upstream's): the result holds the scene, each subject's reference and
    a picture of them with their masks; `masks` says where the masks come from ("auto": the model's segmenter in
    SUBJECT_SEGMENTERS if it has one, else attention). Other options: see `generate_batch`.

    `generate(request, torch_dtype=..., device=..., pipe=..., limits=...)` runs a `GenerationRequest`.
    """
    if isinstance(model, GenerationRequest):
        if prompt is not None or set(options) - {"torch_dtype", "device", "pipe", "limits"}:
            raise TypeError("generate(request) takes only torch_dtype, device, pipe and limits beside the request")
        request = model
        return generate_batch(request.model, [request.prompt], [request.seed], **request.options(), **options)[0]
    if not isinstance(prompt, str):
        raise TypeError(f"generate(model, prompt) needs a prompt string, got {prompt!r}")
    return generate_batch(model, [prompt], [seed], **options)[0]


def generate_batch(
    model: str,
    prompts: list[str],
    seeds: list[int],
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    torch_dtype: str | None = None,
    device: str | None = None,
    attention_maps: bool = True,
    radial: RadialAttentionConfig | None = None,
    agent: AgentAttentionConfig | None = None,
    structured: StructuredGuidanceConfig | None = None,
    astar: str | None = None,
    guidance_interval: GuidanceInterval | tuple[float, float] | None = None,
    subjects: list[str] | None = None,
    ir: IRDiffusionConfig | None = None,
    masks: str = "auto",
    pipe: Any | None = None,
    limits: Limits | None = None,
) -> list[GenerationResult]:
    """`generate` for several prompts in one pipeline call (one seed each: prompt i's noise comes from its own
    generator, as alone); a result per prompt, each with the call's time divided evenly. A-STAR and IR-Diffusion
    (their own pipelines), and structured guidance, take one prompt per call.

    Every option is validated as a `GenerationRequest` and checked against `limits` (default `Limits.from_env()`)
    before the pipeline is loaded; nothing is silently changed or dropped.
    """
    if not isinstance(prompts, (list, tuple)) or not isinstance(seeds, (list, tuple)) or len(prompts) != len(seeds):
        raise ValueError(f"generate_batch needs a list of prompts and one seed per prompt, got {prompts!r}, {seeds!r}")
    if not prompts:
        raise ValueError("prompts=[] is not allowed: expected at least one prompt")
    options = {
        "negative_prompt": negative_prompt, "steps": steps, "guidance_scale": guidance_scale,
        "guidance_interval": _interval_pair(guidance_interval), "height": height, "width": width,
        "num_frames": num_frames, "attention_maps": attention_maps, "radial": radial, "agent": agent,
        "structured": structured, "astar": astar, "ir": ir, "masks": masks,
        "subjects": tuple(subjects) if isinstance(subjects, list) else subjects,
    }  # fmt: skip
    requests = [GenerationRequest(model=model, prompt=p, seed=s, **options) for p, s in zip(prompts, seeds)]
    check_request_limits(requests[0], limits, batch=len(prompts))
    single = len(prompts) == 1
    if not single and (astar is not None or subjects or structured is not None):
        raise ValueError("A-STAR, IR-Diffusion (subjects) and structured guidance take one prompt per call")
    prompt, seed = prompts[0], seeds[0]
    steps = default_steps(model) if steps is None else steps
    pipe = pipe if pipe is not None else cached_pipeline(model, torch_dtype, device)
    kwargs = generation_defaults(model)
    overrides = {"guidance_scale": guidance_scale, "height": height, "width": width, "num_frames": num_frames}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    interval = as_guidance_interval(guidance_interval)
    if interval is not None:
        if not has_sd_unet(pipe):  # the step callback sets the scale the SD-family pipelines read at every step
            raise ValueError(f"guidance_interval is for Stable Diffusion pipelines; {model!r} is not one")
        kwargs.setdefault("guidance_scale", inspect.signature(pipe.__call__).parameters["guidance_scale"].default)
    video = is_video_pipeline(pipe)
    if not video:
        if num_frames is not None:
            raise ValueError(f"num_frames={num_frames} is for video models; {model!r} is an image model")
        kwargs.pop("num_frames", None)
    if negative_prompt:  # diffusers wants a list beside a list of prompts
        kwargs["negative_prompt"] = negative_prompt if single else [negative_prompt] * len(prompts)
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    generator = generators[0]
    if subjects:
        return [_generate_ir(model, pipe, prompt, list(subjects), ir, masks, steps, seed, generator, kwargs)]
    if astar is not None:
        return [_generate_astar(model, pipe, prompt, astar, steps, seed, generator, kwargs, interval)]
    configs = []
    # Structured guidance owns the cross-attention layers the map recorder would need; maps are skipped with it.
    if attention_maps and has_sd_unet(pipe) and structured is None:
        configs.append(AttentionMapConfig())
    if radial is not None:
        if not video:
            raise ValueError(f"radial attention is for video models; {model!r} is an image model")
        configs.append(radial)
    if agent is not None:
        if not has_sd_unet(pipe):
            raise ValueError(f"agent attention is for Stable Diffusion UNets; {model!r} is not one")
        configs.append(agent)
    if structured is not None:
        if not has_sd_unet(pipe):
            raise ValueError(f"structured guidance is for Stable Diffusion UNets; {model!r} is not one")
        configs.append(structured)
    handle = apply(pipe, *configs) if configs else None
    mask_image = density = None
    try:
        start = time.perf_counter()
        call = kwargs if interval is None else {**kwargs, **interval.pipeline_kwargs(kwargs["guidance_scale"], steps)}
        output = pipe(
            prompt if single else list(prompts), num_inference_steps=steps, generator=generator if single else generators,
            output_type="pil", **call,
        )  # fmt: skip
        seconds = (time.perf_counter() - start) / len(prompts)
        grids = [None] * len(prompts)
        if handle is not None and isinstance(configs[0], AttentionMapConfig) and not video:
            maps = handle.maps(conditional_only=True)  # [steps, batch, tokens, h, w]
            grids = [_attention_grid(pipe, maps[:, i : i + 1], p, output.images[i]) for i, p in enumerate(prompts)]
        if radial is not None:
            mask_image, density = _radial_mask_picture(handle)
    finally:
        if handle is not None:
            handle.remove()
    results = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        result = GenerationResult(
            model, p, s, "video" if video else "image", seconds=seconds, call_kwargs=_recorded(kwargs, interval)
        )
        result.radial_mask = mask_image
        result.radial_density = density
        if video:
            result.frames = [_to_pil(f) for f in output.frames[i]]
        else:
            result.images = [output.images[i]]
        result.attention_grid = grids[i]
        results.append(result)
    logger.info("generated %d %s(s) with %s in %.2fs each", len(results), results[0].kind, model, seconds)
    return results


def _interval_pair(value: GuidanceInterval | tuple[float, float] | None) -> Any:
    return (value.start, value.stop) if isinstance(value, GuidanceInterval) else value


def check_request_limits(request: GenerationRequest, limits: Limits | None = None, batch: int = 1) -> None:
    """Raise ValueError when `request`, with the preset's defaults filling what it leaves to them, is over `limits`
    (default `Limits.from_env()`). Costs nothing: called before any pipeline is loaded."""
    merged = generation_defaults(request.model)
    merged.update(
        {k: getattr(request, k) for k in ("height", "width", "num_frames") if getattr(request, k) is not None}
    )
    (limits or Limits.from_env()).check(
        height=merged.get("height"), width=merged.get("width"), num_frames=merged.get("num_frames"),
        steps=default_steps(request.model) if request.steps is None else request.steps, batch=batch,
    )  # fmt: skip


def _same_components(pipe: Any, model: str, method: str, sd_class: type, xl_class: type) -> Any:
    """A method's own pipeline class (SD 1.x/2.x or SDXL flavour) built on `pipe`'s components (no copy, no load)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        method_pipe = xl_class(**pipe.components)
    elif isinstance(pipe, StableDiffusionPipeline):
        method_pipe = sd_class(**pipe.components)
    else:
        raise ValueError(f"{method} runs on Stable Diffusion 1.x/2.x/XL pipelines; {model!r} is {type(pipe).__name__}")
    method_pipe.set_progress_bar_config(leave=False)
    return method_pipe


def _generate_astar(model, pipe, prompt, loss, steps, seed, generator, kwargs, interval) -> GenerationResult:
    from .pipelines import AStarPipeline, AStarXLPipeline

    astar_pipe = _same_components(pipe, model, "A-STAR", AStarPipeline, AStarXLPipeline)
    call = {k: v for k, v in kwargs.items() if k in ("height", "width", "guidance_scale", "negative_prompt")}
    start = time.perf_counter()
    output = astar_pipe(
        prompt, loss=loss, num_inference_steps=steps, max_iter_to_alter=max(1, steps // 2), generator=generator,
        guidance_interval=interval, **call,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    recorded = _recorded(call, interval)
    result = GenerationResult(
        model, prompt, seed, "image", images=list(output.images), seconds=seconds, call_kwargs=recorded
    )
    result.attention_grid = _attention_grid(pipe, output.maps, prompt, output.images[0])
    return result


def _generate_ir(model, pipe, prompt, subjects, config, masks, steps, seed, generator, kwargs) -> GenerationResult:
    from .pipelines import IRDiffusionPipeline, IRDiffusionXLPipeline

    segmenter = SUBJECT_SEGMENTERS.get(model) if masks != "attention" else None
    if masks == "segmenter" and segmenter is None:
        raise ValueError(
            f"masks='segmenter': no segmenter for {model!r} (models with one: {', '.join(SUBJECT_SEGMENTERS)})"
        )
    ir_pipe = _same_components(pipe, model, "IR-Diffusion", IRDiffusionPipeline, IRDiffusionXLPipeline)
    call = {k: v for k, v in kwargs.items() if k in ("height", "width", "guidance_scale", "negative_prompt")}
    start = time.perf_counter()
    output = ir_pipe(
        prompt, subjects, config=config, segmenter=segmenter, num_inference_steps=steps, generator=generator, **call
    )
    seconds = time.perf_counter() - start
    result = GenerationResult(
        model, prompt, seed, "image", images=list(output.images), seconds=seconds, call_kwargs=call
    )
    result.reference_images = list(output.reference_images)
    plain = output.rehearsal_images[0] if output.rehearsal_images is not None else None
    result.plain_images = [] if plain is None else [plain]
    result.subject_grid = render_subject_grid(
        result.reference_images, output.reference_masks, output.images[0], output.target_masks, plain
    )
    return result


def _recorded(call: dict[str, Any], interval: GuidanceInterval | None) -> dict[str, Any]:
    """The call's arguments as a result records them: the guidance interval as its (start, stop), not a callback."""
    return call if interval is None else {**call, "guidance_interval": (interval.start, interval.stop)}


def _radial_mask_picture(handle) -> tuple[Image.Image | None, float | None]:
    """The radial mask of the last geometry built for the first denoiser that ran sparse (None if every step was
    dense). With two denoisers (Wan 2.2) each has its own cache; their masks are the same for one geometry."""
    method = handle.method(RadialAttentionConfig)
    for cache in method.caches.values():
        if cache.layouts:
            (frames, per_frame, _), layout = next(reversed(cache.layouts.items()))
            image = plot_radial_mask(layout.block_mask, tokens_per_frame=per_frame, block_size=layout.block_q)
            return image, layout.density
    return None, None


def _to_pil(frame: Any) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame
    array = np.asarray(frame)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _attention_grid(pipe: Any, maps: torch.Tensor, prompt: str, image: Image.Image) -> Image.Image:
    """Heatmaps of the prompt's own tokens (start token to end token) for the first image, averaged over steps."""
    labels = prompt_token_labels(pipe.tokenizer, prompt)
    end = next((i for i, t in enumerate(labels) if i > 0 and t == pipe.tokenizer.eos_token), len(labels) - 1)
    keep = list(range(1, max(end, 2)))
    return render_attention_grid(maps[:, 0].mean(0)[keep], image, [labels[i] for i in keep])
