"""`IRDiffusionPipeline` / `IRDiffusionXLPipeline`: consistent subjects in a multi-subject scene with IR-Diffusion's
isolation and reposition attention (He et al., arXiv 2411.19261), on Stable Diffusion 1.x/2.x or SDXL.

One call renders, from one batch per denoiser step, each subject's reference image (its own prompt, from one shared
noise z_ref) and the scene (the scene prompt, from z_tgt), with the scene's self-attention reading the references
through `diffattn.IRDiffusionConfig`'s processors:

    pipe = IRDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = pipe("a cat and a dog in a park", ["a photo of a ginger cat", "a photo of a corgi dog"], ["cat", "dog"])
    out.images[0], out.reference_images, out.reference_masks, out.target_masks

Subject masks (each subject in its reference and in the scene) are the user's (`reference_masks`,
`target_masks`: [n, H, W] in [0, 1], any size) or, where not given, found on a rehearsal: the same batch rendered
with plain attention, then either `segmenter(image, subject_prompt) -> [H, W]` run on its images (upstream runs
GroundingDINO + SAM there; `diffattn.judge.subject_mask` does it for the shapes model) or, without a segmenter,
where each subject word attends ((SA + ... + SA^4) CA / 4 recorded by `SubjectMaskConfig`, Otsu threshold).
Like upstream, a scene whose found masks miss a subject can be redrawn with new scene noise (`scene_retries`); a
subject still missing gets an empty scene mask (a warning) and is left alone. The references of the final pass are the
rehearsal's (plain attention on their rows, same noise),
so their masks stay valid.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..control import apply
from ..methods.ir_diffusion import IRDiffusionConfig, IRDiffusionMethod
from ..methods.ir_mask_recorder import SubjectMaskConfig, SubjectMaskRecorder
from ..methods.ir_masks import binary_subject_masks
from ..text import concept_words, word_token_positions, words


logger = logging.getLogger(__name__)


@dataclass
class IRDiffusionPipelineOutput(BaseOutput):
    """images: the scene (as the parent pipeline returns images, one); reference_images: one per subject;
    reference_masks, target_masks: [n, h, w] float {0, 1} as used (at the mask level's size when found by attention);
    rehearsal_images: the scene with plain attention (the rehearsal), None when both masks were given."""

    images: Any
    reference_images: Any
    reference_masks: torch.Tensor
    target_masks: torch.Tensor
    rehearsal_images: Any = None
    phase_seconds: dict[str, float] | None = None  # "rehearsal" (all tries), "references and scene"


def default_subject_words(prompt: str, subject_prompts: list[str]) -> list[str]:
    """For each subject prompt, its first concept word (head noun) that the scene prompt also contains."""
    scene = set(words(prompt))
    chosen = []
    for subject in subject_prompts:
        found = [w for w in concept_words(subject) if w in scene]
        if not found:
            raise ValueError(
                f"no noun of subject prompt {subject!r} occurs in prompt={prompt!r}: pass subject_words, the word "
                "naming each subject in both prompts"
            )
        chosen.append(found[0])
    return chosen


class _IRDiffusionCalls:
    """The IR-Diffusion procedure on top of the parent pipeline's own `__call__` (SD or SDXL)."""

    def _rehearse(self, latents, call, subject_prompts, segmenter, reference_tokens, scene_tokens, mask_resolution):
        """The batch with plain attention: (output, soft masks [2n, h, w]: references', then the scene's)."""
        n = len(subject_prompts)
        if segmenter is not None:
            rehearsal = super().__call__(latents=latents.clone(), **{**call, "output_type": "pil"})
            found = [segmenter(image, p) for image, p in zip(rehearsal.images, subject_prompts)]
            found += [segmenter(rehearsal.images[n], p) for p in subject_prompts]
            return rehearsal, torch.stack([torch.as_tensor(np.asarray(m, dtype=np.float32)) for m in found])
        maps = [(i, t) for i, t in enumerate(reference_tokens)] + [(n, t) for t in scene_tokens]
        handle = apply(self, SubjectMaskConfig(maps=tuple(maps), resolution=mask_resolution))
        try:
            rehearsal = super().__call__(latents=latents.clone(), **call)
            return rehearsal, handle.method(SubjectMaskRecorder).soft_masks()
        finally:
            handle.remove()

    def __call__(
        self,
        prompt: str,
        subject_prompts: list[str],
        subject_words: list[str] | None = None,
        *,
        reference_masks: Any = None,
        target_masks: Any = None,
        config: IRDiffusionConfig | None = None,
        segmenter: Callable[[Any, str], Any] | None = None,
        mask_resolution: int | None = None,
        scene_retries: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        negative_prompt: str | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ):
        """Render the references and the scene. `subject_words[i]` names subject i in both its prompt and the scene
        prompt (default: the subject prompt's first noun that the scene contains). `config`: IRDiffusionConfig
        (default: upstream's settings). `segmenter(pil_image, subject_prompt) -> [H, W]` finds the masks the user
        did not give on the rehearsal's images; without it, attention does (`mask_resolution`: its level, default
        the one nearest 32x32). `scene_retries`: when the found scene masks miss a subject, draw new scene noise and
        rehearse again, up to this many times (upstream retries up to 20 seeds). Other keyword arguments go to the
        parent pipeline's call."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be one non-empty string: the scene")
        if isinstance(subject_prompts, str) or not subject_prompts:
            raise ValueError(
                f"subject_prompts={subject_prompts!r} is not allowed: expected a non-empty list of prompts"
            )
        if not all(isinstance(p, str) and p.strip() for p in subject_prompts):
            raise ValueError(f"subject_prompts={subject_prompts!r} is not allowed: every prompt must be non-empty")
        n = len(subject_prompts)
        if subject_words is None:
            subject_words = default_subject_words(prompt, subject_prompts)
        if isinstance(subject_words, str) or len(subject_words) != n:
            raise ValueError(f"subject_words={subject_words!r} is not allowed: expected one word per subject ({n})")
        if isinstance(generator, list):
            raise ValueError(
                "generator must be one torch.Generator: the references share one noise, the scene another"
            )
        config = config or IRDiffusionConfig()
        if not isinstance(scene_retries, int) or isinstance(scene_retries, bool) or scene_retries < 0:
            raise ValueError(f"scene_retries={scene_retries!r} is not allowed: expected an int >= 0")
        reference_tokens = [
            word_token_positions(self.tokenizer, p, [w])[0] for p, w in zip(subject_prompts, subject_words)
        ]
        scene_tokens = word_token_positions(self.tokenizer, prompt, list(subject_words))
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        device, dtype = self._execution_device, self.unet.dtype
        z_ref = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        z_tgt = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = torch.cat([z_ref] * n + [z_tgt])
        call = dict(
            prompt=[*subject_prompts, prompt],
            negative_prompt=None if negative_prompt is None else [negative_prompt] * (n + 1),
            height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            output_type=output_type, **kwargs,
        )  # fmt: skip

        rehearsal_images = None
        phase_seconds: dict[str, float] = {}
        if reference_masks is None or target_masks is None:
            for attempt in range(scene_retries + 1):
                with _phase(self, "rehearsal", phase_seconds):
                    rehearsal, soft = self._rehearse(latents, call, subject_prompts, segmenter, reference_tokens,
                                                     scene_tokens, mask_resolution)  # fmt: skip
                found = binary_subject_masks(soft[n:], exclusive=True)
                missing = [i for i in range(n) if not bool(found[i].any())]
                if not missing or target_masks is not None or attempt == scene_retries:
                    break
                logger.info("scene misses subjects %s: new scene noise (retry %d of %d)", missing, attempt + 1,
                            scene_retries)  # fmt: skip
                latents[n:] = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            rehearsal_images = rehearsal.images[n:]
            if reference_masks is None:
                reference_masks = binary_subject_masks(soft[:n], exclusive=False).float()
            if target_masks is None:
                target_masks = found.float()
        handle = apply(self, config)
        try:
            method = handle.method(IRDiffusionMethod)
            method.set_masks(reference_masks, target_masks)
            if method.num_subjects != n:
                raise ValueError(f"the masks describe {method.num_subjects} subjects; subject_prompts has {n}")
            for i, mask in enumerate(method.target_masks):
                if not bool(mask.any()):
                    logger.warning("subject %d (%r) is not in the scene: no reposition for it", i, subject_prompts[i])
            with _phase(self, "references and scene", phase_seconds):
                output = super().__call__(latents=latents.clone(), **call)
        finally:
            handle.remove()
        images = output.images
        result = IRDiffusionPipelineOutput(
            images=images[n:],
            reference_images=images[:n],
            reference_masks=method.reference_masks,
            target_masks=method.target_masks,
            rehearsal_images=rehearsal_images,
            phase_seconds=phase_seconds,
        )
        return result if return_dict else (result.images, result.reference_images)


@contextlib.contextmanager
def _phase(pipe, name: str, seconds: dict[str, float]):
    """Name the progress bar of one phase (a UI tracking tqdm shows it) and add its time to `seconds[name]`.
    diffusers keeps the bar's settings in the private `_progress_bar_config` and its public setter replaces them
    all, so the others are read from there."""
    settings = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**settings, "desc": name})
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        pipe.set_progress_bar_config(**settings)


class IRDiffusionPipeline(_IRDiffusionCalls, StableDiffusionPipeline):
    """StableDiffusionPipeline (SD 1.x / 2.x) that renders subject references and a scene with IR-Diffusion."""


class IRDiffusionXLPipeline(_IRDiffusionCalls, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline that renders subject references and a scene with IR-Diffusion."""
