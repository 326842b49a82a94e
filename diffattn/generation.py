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
from .limits import Limits
from .loading import default_device, load_pipeline, parse_device
from .methods.attention_maps import AttentionMapConfig, prompt_token_labels, render_attention_grid
from .methods.ir_masks import render_subject_grid
from .methods.radial_attention import RadialAttentionConfig
from .methods.radial_mask import plot_radial_mask
from .methods.structured_guidance import StructuredGuidanceConfig
from .presets import PRESETS
from .request import GenerationRequest
from .text import noun_phrases, plain_words
from .validation import check_int_range


logger = logging.getLogger(__name__)


class PipelineCache:
    """Loaded pipelines by (model, dtype, device), least recently used evicted past `size` (the UI's server sets it;
    a pipeline is large, so an unbounded cache would grow with every model a visitor names)."""

    def __init__(self, size: int = 2):
        self.entries: OrderedDict[tuple[str, str | None, str | None], Any] = OrderedDict()
        self.resize(size)

    def resize(self, size: int) -> None:
        self.size = check_int_range("pipeline cache size", size, 1)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def get(self, model: str, torch_dtype: str | None = None, device: str | None = None) -> Any:
        """The pipeline of `model` in `torch_dtype` on `device` (None: `default_device()`, a GPU when there is one)."""
        device = default_device() if device is None else parse_device(device)
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


# A video pipeline's autoencoder compression, as diffusers names it: Wan, HunyuanVideo, CogVideoX / LTX / Mochi
_COMPRESSION_ATTRIBUTES = {
    "temporal": ("vae_scale_factor_temporal", "vae_temporal_compression_ratio", "vae_temporal_scale_factor"),
    "spatial": ("vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_spatial_scale_factor"),
}


def _autoencoder_compression(pipe: Any, axis: str) -> int:
    """The pipeline's autoencoder compression along `axis` ("temporal" or "spatial"); 1 when it names none."""
    for name in _COMPRESSION_ATTRIBUTES[axis]:
        value = getattr(pipe, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def frames_per_latent_frame(pipe: Any) -> int:
    """How many frames a video pipeline's autoencoder folds into one latent frame (Wan, HunyuanVideo, CogVideoX: 4;
    LTX: 8; Mochi: 6): the frame counts it makes are 1 + a multiple of it. 1 when the pipeline names none."""
    return _autoencoder_compression(pipe, "temporal")


def check_frame_count(num_frames: int, pipe: Any, model: str) -> None:
    """Raise ValueError for a frame count the pipeline would change: Wan's rounds it to the nearest 1 + 4k (with
    a log line), the others floor it to their latent frames, so 30 frames asked would silently be 29 made."""
    step = frames_per_latent_frame(pipe)
    if (num_frames - 1) % step:
        below = (num_frames - 1) // step * step + 1
        raise ValueError(
            f"num_frames={num_frames} is not allowed for {model!r}: its autoencoder keeps the first frame and folds "
            f"every {step} after it into one latent frame, so a video has 1 + a multiple of {step} frames "
            f"({below} or {below + step})"
        )


def pixels_per_video_token(pipe: Any) -> int:
    """The side in pixels of one video token: the autoencoder's spatial compression times the transformer's spatial
    patch (Wan 2.1, HunyuanVideo, CogVideoX, Mochi: 8 x 2; LTX-Video: 32 x 1). 1 when the pipeline names neither."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    patch = config.get("patch_size", 1) if config is not None else 1
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch  # Wan: (time, height, width)
    return _autoencoder_compression(pipe, "spatial") * (patch if isinstance(patch, int) and patch > 0 else 1)


def check_video_size(height: int | None, width: int | None, pipe: Any, model: str) -> None:
    """Raise ValueError for a video height or width that is not a whole number of tokens (CogVideoX and Mochi
    would fail deep inside the transformer with a shape error)."""
    side = pixels_per_video_token(pipe)
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % side:
            raise ValueError(
                f"{name}={value} is not allowed for {model!r}: expected a multiple of {side} pixels (one video "
                f"token; {value // side * side} or {value // side * side + side})"
            )


def unread_prompt_tail(pipe: Any, prompt: str, call_kwargs: dict[str, Any]) -> tuple[int, int, str] | None:
    """(prompt tokens, tokens the model reads, the end it cuts off) when `prompt` is longer than the pipeline's text
    encoder takes (CLIP: its 77; T5/UMT5/Llama pipelines: `max_sequence_length`), else None. Both count the
    tokenizer's special tokens; the pipeline keeps the first `limit - 1` prompt tokens and its end token."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return None
    parameters = inspect.signature(pipe.__call__).parameters
    if "max_sequence_length" in parameters:
        limit = call_kwargs.get("max_sequence_length", parameters["max_sequence_length"].default)
    else:
        limit = tokenizer.model_max_length
    if not isinstance(limit, int) or limit < 2:
        return None
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    if len(ids) <= limit:
        return None
    return len(ids), limit, tokenizer.decode(ids[limit - 1 :], skip_special_tokens=True).strip()


def _note(results: list[GenerationResult], note: str) -> None:
    """What the model did not take as asked: in each result's notes (the UI's info line, a job's record) and, once,
    in the log as a warning (the CLI shows it)."""
    for result in results:
        result.notes.append(note)
    logger.warning(note)


def _note_unread_prompts(results: list[GenerationResult], pipe: Any, call_kwargs: dict[str, Any]) -> None:
    """Say, in the result and the log, when a prompt was cut to the model's text length (diffusers cuts it, for
    most models without a word)."""
    for result in results:
        unread = unread_prompt_tail(pipe, result.prompt, call_kwargs)
        if unread is not None:
            tokens, limit, tail = unread
            _note([result], f"the prompt is {tokens} tokens and {result.model!r} reads {limit}: "
                            f"the end, {tail!r}, was not seen")  # fmt: skip


def check_step_count(steps: int, pipe: Any, model: str) -> None:
    """Raise ValueError for a step count the pipeline cannot run (Mochi's linear-then-quadratic sigma schedule
    divides by half the steps: one step is a ZeroDivisionError inside diffusers)."""
    if type(pipe).__name__ == "MochiPipeline" and steps < 2:
        raise ValueError(
            f"steps={steps} is not allowed for {model!r}: Mochi's sigma schedule (linear, then quadratic) needs "
            "at least 2 steps"
        )


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
    request: GenerationRequest | None = None  # what made it
    attention_maps: torch.Tensor | None = None  # [steps, tokens, h, w]: the prompt's tokens (start to end token)
    attention_labels: list[str] = field(default_factory=list)  # one per token of attention_maps
    phase_seconds: dict[str, float] = field(default_factory=dict)  # IR-Diffusion: rehearsal, references and scene
    notes: list[str] = field(default_factory=list)  # what the model did not take as asked (a prompt cut short)
    # where it ran ("cpu", "cuda:0") and in which dtype ("float32"): the same seed makes other pixels elsewhere
    device: str = ""
    dtype: str = ""


def default_steps(model: str) -> int:
    """Denoising steps when a call names none: the preset's (4 for the random tiny ones, 20 for shapes-sd), 30 for
    other models (a diffusers-like default for real checkpoints)."""
    return PRESETS[model].steps if model in PRESETS else 30


def subject_segmenter(model: str):
    """The segmenter(image, subject) -> mask of a model whose pictures one can read (the preset's), else None."""
    return PRESETS[model].segmenter if model in PRESETS else None


def radial_defaults(model: str) -> RadialAttentionConfig:
    """The radial settings a model runs with when a face names none: the preset's (shapes-wan: 16-token blocks,
    its frames being 256 tokens), else the library's."""
    preset = PRESETS.get(model)
    return preset.radial if preset is not None and preset.radial is not None else RadialAttentionConfig()


def generation_defaults(model: str) -> dict[str, Any]:
    """Call arguments a model is meant to run with: the preset's, or none for other models."""
    return dict(PRESETS[model].call_defaults) if model in PRESETS else {}


def generate(
    request: GenerationRequest | str,
    prompt: str | None = None,
    *,
    seed: int = 0,
    torch_dtype: str | None = None,
    device: str | None = None,
    pipe: Any | None = None,
    limits: Limits | None = None,
    **fields: Any,
) -> GenerationResult:
    """Generate one image or video: `generate(request)` with a `GenerationRequest`, or `generate(model, prompt,
    seed=..., **fields)` with its fields (steps, guidance_scale, height, width, num_frames, radial, agent,
    structured, astar, subjects, ir, masks, guidance_interval, attention_maps, negative_prompt).

    The one router every face uses: `subjects` runs `IRDiffusionPipeline` (the result holds the scene, each
    subject's reference and a picture of them with their masks), `astar` runs `AStarPipeline`, anything else the
    model's own pipeline with the methods applied for this call (radial attention: the result carries the mask
    picture and its density; SD-family models: the cross-attention heatmap grid unless `attention_maps=False`).
    The request is validated and checked against `limits` (default `Limits.from_env()`) before anything loads.
    Without `pipe`, the model is loaded once per (model, dtype, device) and kept (`cached_pipeline`); `device` None
    is `default_device()`: a CUDA GPU when torch sees one, else the CPU.
    """
    if isinstance(request, GenerationRequest):
        if prompt is not None or fields:
            raise TypeError("generate(request) takes only torch_dtype, device, pipe and limits beside the request")
    else:
        if not isinstance(prompt, str):
            raise TypeError(f"generate(model, prompt) needs a prompt string, got {prompt!r}")
        request = GenerationRequest(model=request, prompt=prompt, seed=seed, **fields)
    return generate_batch([request], torch_dtype=torch_dtype, device=device, pipe=pipe, limits=limits)[0]


def generate_batch(
    requests: list[GenerationRequest],
    *,
    torch_dtype: str | None = None,
    device: str | None = None,
    pipe: Any | None = None,
    limits: Limits | None = None,
) -> list[GenerationResult]:
    """Requests that differ only in prompt and seed, in one pipeline call (request i's noise comes from its own
    generator, as alone); a result per request, each with the call's time divided evenly. A-STAR, IR-Diffusion
    (their own pipelines) and structured guidance take one request per call."""
    if not isinstance(requests, (list, tuple)) or not requests:
        raise TypeError(f"generate_batch takes a non-empty list of GenerationRequests, got {requests!r}")
    for request in requests:
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"generate_batch takes GenerationRequests, got {type(request).__name__}")
    first = requests[0]
    if any(r.settings() != first.settings() for r in requests[1:]):
        raise ValueError("generate_batch takes requests that differ only in prompt and seed")
    check_request_limits(first, limits, batch=len(requests))
    if len(requests) > 1 and (first.astar is not None or first.subjects or first.structured is not None):
        raise ValueError("A-STAR, IR-Diffusion (subjects) and structured guidance take one prompt per call")
    pipe = pipe if pipe is not None else cached_pipeline(first.model, torch_dtype, device)
    call = _pipeline_arguments(first, pipe, len(requests))
    if first.subjects:
        results = [_generate_ir(first, pipe, call)]
    elif first.astar is not None:
        results = [_generate_astar(first, pipe, call)]
    else:
        results = _generate_plain(requests, pipe, call)
    _note_unread_prompts(results, pipe, call.kwargs)
    for result in results:
        result.device, result.dtype = str(pipe.device), str(pipe.dtype).removeprefix("torch.")
    return results


@dataclass
class _Call:
    """What a request becomes for its pipeline: the call arguments, the step count, the interval, the kind."""

    kwargs: dict[str, Any]
    steps: int
    interval: GuidanceInterval | None
    video: bool


def _pipeline_arguments(request: GenerationRequest, pipe: Any, batch: int) -> _Call:
    """The pipeline call arguments of a request: the preset's defaults, then what the request sets. Raises for a
    setting the pipeline cannot take (frames for an image model, a guidance interval outside SD)."""
    model = request.model
    kwargs = generation_defaults(model)
    given = {k: getattr(request, k) for k in ("guidance_scale", "height", "width", "num_frames")}
    kwargs.update({k: v for k, v in given.items() if v is not None})
    interval = as_guidance_interval(request.guidance_interval)
    if interval is not None:
        if not has_sd_unet(pipe):  # the step callback sets the scale the SD-family pipelines read at every step
            raise ValueError(f"guidance_interval is for Stable Diffusion pipelines; {model!r} is not one")
        kwargs.setdefault("guidance_scale", inspect.signature(pipe.__call__).parameters["guidance_scale"].default)
    video = is_video_pipeline(pipe)
    if not video:
        if request.num_frames is not None:
            raise ValueError(f"num_frames={request.num_frames} is for video models; {model!r} is an image model")
        kwargs.pop("num_frames", None)
    else:
        if kwargs.get("num_frames") is not None:
            check_frame_count(kwargs["num_frames"], pipe, model)
        check_video_size(kwargs.get("height"), kwargs.get("width"), pipe, model)
    if request.negative_prompt:  # diffusers wants a list beside a list of prompts
        kwargs["negative_prompt"] = request.negative_prompt if batch == 1 else [request.negative_prompt] * batch
    steps = default_steps(model) if request.steps is None else request.steps
    check_step_count(steps, pipe, model)
    return _Call(kwargs, steps, interval, video)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _generate_plain(requests: list[GenerationRequest], pipe: Any, call: _Call) -> list[GenerationResult]:
    """The model's own pipeline, with the request's methods applied for this call."""
    first = requests[0]
    model, video = first.model, call.video
    configs = []
    # Structured guidance owns the cross-attention layers the map recorder would need; maps are skipped with it.
    if first.attention_maps and has_sd_unet(pipe) and first.structured is None:
        configs.append(AttentionMapConfig())
    if first.radial is not None:
        if not video:
            raise ValueError(f"radial attention is for video models; {model!r} is an image model")
        configs.append(first.radial)
    for name, config in (("agent attention", first.agent), ("structured guidance", first.structured)):
        if config is not None:
            if not has_sd_unet(pipe):
                raise ValueError(f"{name} is for Stable Diffusion UNets; {model!r} is not one")
            configs.append(config)
    single = len(requests) == 1
    prompts = [r.prompt for r in requests]
    generators = [_generator(r.seed) for r in requests]
    handle = apply(pipe, *configs) if configs else None
    mask_image = density = None
    try:
        start = time.perf_counter()
        kwargs = call.kwargs
        if call.interval is not None:
            kwargs = {**kwargs, **call.interval.pipeline_kwargs(kwargs["guidance_scale"], call.steps)}
        output = pipe(
            prompts[0] if single else prompts, num_inference_steps=call.steps,
            generator=generators[0] if single else generators, output_type="np", **kwargs,
        )  # fmt: skip
        seconds = (time.perf_counter() - start) / len(requests)
        maps = None
        if handle is not None and isinstance(configs[0], AttentionMapConfig) and not video:
            maps = handle.maps(conditional_only=True)  # [steps, batch, tokens, h, w]
        if first.radial is not None:
            mask_image, density = _radial_mask_picture(handle)
    finally:
        if handle is not None:
            handle.remove()
    results = []
    for i, request in enumerate(requests):
        result = GenerationResult(
            model, request.prompt, request.seed, "video" if video else "image", seconds=seconds,
            call_kwargs=_recorded(call.kwargs, call.interval), request=request,
        )  # fmt: skip
        result.radial_mask = mask_image
        result.radial_density = density
        if video:
            result.frames = _checked_images(output.frames[i], request, pipe)
        else:
            result.images = _checked_images(output.images[i : i + 1], request, pipe)
        if maps is not None:
            _attach_attention(result, pipe, maps[:, i : i + 1], request.prompt)
        results.append(result)
    if first.radial is not None:
        _note_dense_radial(results, first.radial, call.steps, density)
    if first.structured is not None:
        _note_structured_without_phrases(results, first.structured)
    logger.info("generated %d %s(s) with %s in %.2fs each", len(results), results[0].kind, model, seconds)
    return results


def _note_dense_radial(results: list[GenerationResult], config: RadialAttentionConfig, steps: int,
                       density: float | None) -> None:  # fmt: skip
    """Say, in the result and the log, when a radial request computed dense attention throughout: no step ran
    sparse (`density` None: the dense steps cover the run), or the mask at this size keeps every block."""
    if density is None:
        note = (f"radial attention ran no step sparse: dense_timesteps={config.dense_timesteps} and "
                f"dense_last_timesteps={config.dense_last_timesteps} cover all {steps} steps, so the video is "
                "dense attention's (run more steps, or fewer dense ones: the paper keeps about the first quarter "
                "dense)")  # fmt: skip
    elif density >= 1.0:
        note = ("the radial mask at this size keeps every block (density 100%), so the video is dense "
                "attention's (more frames or pixels, a smaller decay_factor or block_size, or fewer sink frames "
                "make it sparse)")  # fmt: skip
    else:
        return
    _note(results, note)


def _note_structured_without_phrases(results: list[GenerationResult], config: StructuredGuidanceConfig) -> None:
    """Say, in the result and the log, when structured guidance had nothing to bind: no noun phrase but the whole
    prompt, so its values are (up to punctuation) the prompt's own and the image is plain cross-attention's."""
    for result in results:
        phrases = list(config.phrases) if config.phrases is not None else noun_phrases(result.prompt)
        if any(plain_words(phrase) != plain_words(result.prompt) for phrase in phrases):
            continue
        _note([result], f"structured guidance found no noun phrase in the prompt but the whole prompt ({phrases}), "
                        "so the image is plain cross-attention's (it binds attributes to two or more phrases, e.g. "
                        "'a red circle and a blue square')")  # fmt: skip


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


def _generate_astar(request: GenerationRequest, pipe: Any, call: _Call) -> GenerationResult:
    from .pipelines import AStarPipeline, AStarXLPipeline

    astar_pipe = _same_components(pipe, request.model, "A-STAR", AStarPipeline, AStarXLPipeline)
    kwargs = {k: v for k, v in call.kwargs.items() if k in ("height", "width", "guidance_scale", "negative_prompt")}
    start = time.perf_counter()
    output = astar_pipe(
        request.prompt, loss=request.astar, num_inference_steps=call.steps,
        max_iter_to_alter=max(1, call.steps // 2), generator=_generator(request.seed),
        guidance_interval=call.interval, output_type="np", **kwargs,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    result = GenerationResult(
        request.model, request.prompt, request.seed, "image", images=_checked_images(output.images, request, pipe),
        seconds=seconds,
        call_kwargs=_recorded(kwargs, call.interval), request=request,
    )  # fmt: skip
    _attach_attention(result, pipe, output.maps, request.prompt)
    return result


def _generate_ir(request: GenerationRequest, pipe: Any, call: _Call) -> GenerationResult:
    from .pipelines import IRDiffusionPipeline, IRDiffusionXLPipeline

    model, masks = request.model, request.masks
    segmenter = subject_segmenter(model) if masks != "attention" else None
    if masks == "segmenter" and segmenter is None:
        with_one = ", ".join(name for name in PRESETS if subject_segmenter(name) is not None)
        raise ValueError(f"masks='segmenter': no segmenter for {model!r} (models with one: {with_one})")
    ir_pipe = _same_components(pipe, model, "IR-Diffusion", IRDiffusionPipeline, IRDiffusionXLPipeline)
    kwargs = {k: v for k, v in call.kwargs.items() if k in ("height", "width", "guidance_scale", "negative_prompt")}
    start = time.perf_counter()
    output = ir_pipe(
        request.prompt, list(request.subjects), config=request.ir, segmenter=segmenter, num_inference_steps=call.steps,
        generator=_generator(request.seed), output_type="np", **kwargs,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    result = GenerationResult(
        model, request.prompt, request.seed, "image", images=_checked_images(output.images, request, pipe),
        seconds=seconds, call_kwargs=kwargs, request=request,
    )  # fmt: skip
    result.phase_seconds = dict(output.phase_seconds or {})
    result.reference_images = _checked_images(output.reference_images, request, pipe)
    rehearsal = output.rehearsal_images
    result.plain_images = [] if rehearsal is None else _checked_images(rehearsal[:1], request, pipe)
    plain = result.plain_images[0] if result.plain_images else None
    result.subject_grid = render_subject_grid(
        result.reference_images, output.reference_masks, result.images[0], output.target_masks, plain
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


class NonFiniteOutputError(RuntimeError):
    """The pipeline returned NaN or infinite pixels (typically an overflow in float16): refused rather than saved
    as black or garbage pixels."""


def _checked_images(images: Any, request: GenerationRequest, pipe: Any) -> list[Image.Image]:
    """A pipeline's images or frames for one request (output_type="np": float [N, H, W, 3] in [0, 1]; PIL images
    pass as they are) as PIL images, refused when any value is not finite."""
    arrays = [np.asarray(image) for image in images]
    bad = sum(np.count_nonzero(~np.isfinite(a)) for a in arrays if np.issubdtype(a.dtype, np.floating))
    if bad:
        raise NonFiniteOutputError(
            f"{request.model!r} produced non-finite values (NaN or inf) for seed {request.seed} in {bad} of "
            f"{sum(a.size for a in arrays)} pixel values, running in {getattr(pipe, 'dtype', None)}: an overflow, "
            "most often of float16; run it in bfloat16 or float32 (torch_dtype / --dtype)"
        )
    return [_to_pil(image) for image in images]


def _to_pil(frame: Any) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame
    array = np.asarray(frame)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _attach_attention(result: GenerationResult, pipe: Any, maps: torch.Tensor, prompt: str) -> None:
    """The prompt's own tokens' maps (start token to end token) of one image: `result.attention_maps` [steps,
    tokens, h, w] with `result.attention_labels`, and the heatmap grid averaged over steps."""
    labels = prompt_token_labels(pipe.tokenizer, prompt)
    end = next((i for i, t in enumerate(labels) if i > 0 and t == pipe.tokenizer.eos_token), len(labels) - 1)
    keep = list(range(1, max(end, 2)))
    result.attention_maps = maps[:, 0][:, keep].clone()
    result.attention_labels = [labels[i] for i in keep]
    image = (result.images or [None])[0]
    result.attention_grid = render_attention_grid(result.attention_maps.mean(0), image, result.attention_labels)
