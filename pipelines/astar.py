"""`AStarPipeline` / `AStarXLPipeline`: Stable Diffusion (1.x/2.x, SDXL) with A-STAR's test-time attention losses
(and/or Attend-and-Excite's).

For the first `max_iter_to_alter` steps, before the ordinary classifier-free-guidance step, the pipeline runs the
UNet on the conditional branch with gradients, reads the concept tokens' cross-attention maps at one resolution
(only those layers leave SDPA and store maps), computes the loss and moves the latents against its gradient:
z <- z - alpha_t * grad_z L, alpha_t = scale_factor * sqrt(linspace(scale_range)). At the refinement steps
(`thresholds`, Attend-and-Excite's iterative refinement, used with loss="attend_and_excite" or "both") the
update repeats while the attend-and-excite part stays above 1 - threshold, at most `max_refinement_steps` times,
and then the step's ordinary update follows, as in the reference (refinement steps past `max_iter_to_alter`
refine too, without that last update). With loss="attend_and_excite" and DDIM the latents follow diffusers'
`StableDiffusionAttendAndExcitePipeline` (tested). One difference is kept on purpose: the loss pass feeds the UNet
`scheduler.scale_model_input(latents, t)`, as every denoiser call must; the reference feeds raw latents, which is
the same for DDIM and wrong for schedulers that scale their input (Euler, DPM-Solver SDE, ...). Loads with
`from_pretrained` like any pipeline:

    pipe = AStarPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = pipe("a cat and a frog", loss="astar")       # out.images, out.losses (per step, per iteration)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput

from ..control import apply
from ..guidance import GuidanceInterval, as_guidance_interval
from ..methods.astar import (
    attend_and_excite_loss,
    binarize,
    concept_maps,
    retention_loss,
    segregation_loss,
)
from ..methods.attention_maps import AttentionMapConfig, AttentionMapMethod
from ..text import concept_words, word_token_positions


LOSSES = ("astar", "attend_and_excite", "both")


@dataclass
class AStarPipelineOutput(BaseOutput):
    """images: as StableDiffusionPipeline returns them; losses[i]: the loss of each update at step i (empty past
    `max_iter_to_alter`); maps: the conditional cross-attention maps of the ordinary step, [steps, batch, tokens,
    h, w] at the loss resolution."""

    images: Any
    losses: list[list[float]]
    maps: torch.Tensor | None = None


def concept_token_indices(tokenizer, prompt: str) -> list[int]:
    """The last token position of each concept word (head noun) of the prompt, in order."""
    return word_token_positions(tokenizer, prompt, concept_words(prompt))


class _AStarLoop:
    """The A-STAR denoising loop, shared by the SD and SDXL pipelines; they differ only in their conditioning."""

    def _conditioning(self, prompt, negative_prompt, num_images, do_cfg, device, height, width):
        """(cond, uncond, added_cond, added_uncond): text embeddings and, for SDXL, its added conditioning."""
        cond, uncond = self.encode_prompt(prompt, device, num_images, do_cfg, negative_prompt)
        return cond, uncond, None, None

    def _attention_losses(self, latents, t, cond, maps_method, indices, previous_binary, options):
        cond_embeds, added = cond
        latent_in = self.scheduler.scale_model_input(latents, t)
        self.unet(latent_in, t, encoder_hidden_states=cond_embeds, added_cond_kwargs=added)
        maps = concept_maps(maps_method.current(), indices, smooth=options["smooth"], sigma=options["sigma"])
        parts = {"excite": attend_and_excite_loss(maps)}
        if options["loss"] in ("astar", "both"):
            parts["segregation"] = segregation_loss(maps)
            if previous_binary is not None:
                parts["retention"] = retention_loss(maps, previous_binary)
        total = sum(v for k, v in parts.items() if options["loss"] != "astar" or k != "excite")
        return total, parts, maps

    def _update_step(
        self, latents, t, cond, maps_method, indices, previous_binary, options, step_size, target, max_refinement,
        update, record,
    ):  # fmt: skip
        """One step's latent updates, in the order of Attend-and-Excite's reference pipeline: the loss at the step's
        latents; at a refinement step whose excite loss is above 1 - target, updates while it stays there (each
        iteration: loss at the current latents, then an update; at most `max_refinement`), then the loss again;
        then, before `max_iter_to_alter` (`update`), the step's ordinary update with that loss.
        Returns (latents, the last maps); appends every loss computed to `record`."""

        def losses_at(z):
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                total, parts, maps = self._attention_losses(z, t, cond, maps_method, indices, previous_binary, options)
            record.append(float(total.detach()))
            excite = float(parts["excite"].detach()) / maps.shape[0]  # per image
            return z, total, excite, maps

        def moved(z, total):
            if total.requires_grad and float(total.detach()) != 0.0:
                return (z - step_size * torch.autograd.grad(total, z)[0]).detach()
            return z.detach()

        z, total, excite, maps = losses_at(latents)
        if target is not None and excite > 1.0 - target:
            for iteration in range(1, max_refinement + 1):
                if iteration > 1:
                    z, total, excite, maps = losses_at(z)
                z = moved(z, total)
                if excite <= 1.0 - target:
                    break
            z, total, excite, maps = losses_at(z)
        return (moved(z, total) if update else z.detach()), maps.detach()

    def __call__(
        self,
        prompt: str,
        token_indices: list[int] | None = None,
        *,
        loss: str = "astar",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_iter_to_alter: int = 25,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        thresholds: dict[int, float] | None = None,
        max_refinement_steps: int = 20,
        attention_resolution: int | None = None,
        smooth: bool = True,
        sigma: float = 0.5,
        retention_threshold: float = 0.5,
        guidance_interval: GuidanceInterval | tuple[float, float] | None = None,
    ):
        """Generate with attention-loss latent updates. `token_indices`: concept token positions (the start token
        is 0); by default the concept words `diffattn.text.concept_words` finds. `loss`: "astar" (segregation +
        retention), "attend_and_excite", or "both". `guidance_interval`: guide only the steps in it (see
        `diffattn.GuidanceInterval`); None guides every step."""
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not allowed: expected one of {', '.join(LOSSES)}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be one non-empty string (batch with num_images_per_prompt)")
        indices = list(token_indices) if token_indices is not None else concept_token_indices(self.tokenizer, prompt)
        if not indices:
            raise ValueError(f"found no concept tokens in prompt={prompt!r}: pass token_indices")
        thresholds = {0: 0.05, 10: 0.5, 20: 0.8} if thresholds is None else thresholds
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        device = self._execution_device
        self._guidance_scale = guidance_scale
        do_cfg = guidance_scale > 1.0
        interval = as_guidance_interval(guidance_interval)
        with torch.no_grad():  # the text encoders stay out of the loss's graph
            cond, uncond, added_cond, added_uncond = self._conditioning(
                prompt, negative_prompt, num_images_per_prompt, do_cfg, device, height, width
            )
        # Only the layers at the map resolution leave SDPA; they keep their maps in the graph for the losses.
        handle = apply(self, AttentionMapConfig(resolution=attention_resolution, keep_grad=True))
        maps_method = handle.method(AttentionMapMethod)
        losses: list[list[float]] = []
        previous_binary = None
        try:
            self.scheduler.set_timesteps(num_inference_steps, device=device)  # starts the run diffattn tracks
            timesteps = self.scheduler.timesteps
            latents = self.prepare_latents(
                num_images_per_prompt, self.unet.config.in_channels, height, width, cond.dtype, device, generator,
                latents,
            )  # fmt: skip
            extra = self.prepare_extra_step_kwargs(generator, 0.0)
            step_sizes = scale_factor * np.sqrt(np.linspace(scale_range[0], scale_range[1], len(timesteps)))
            options = {"loss": loss, "smooth": smooth, "sigma": sigma}
            for i, t in enumerate(self.progress_bar(timesteps)):
                step_losses: list[float] = []
                target = thresholds.get(i) if loss != "astar" else None  # refinement is Attend-and-Excite's
                if i < max_iter_to_alter or target is not None:
                    latents, maps = self._update_step(
                        latents, t, (cond, added_cond), maps_method, indices, previous_binary, options,
                        step_sizes[i], target, max_refinement_steps, i < max_iter_to_alter, step_losses,
                    )  # fmt: skip
                    previous_binary = binarize(maps, retention_threshold)
                losses.append(step_losses)
                with torch.no_grad():
                    model_in = torch.cat([latents] * 2) if do_cfg else latents
                    model_in = self.scheduler.scale_model_input(model_in, t)
                    embeds = torch.cat([uncond, cond]) if do_cfg else cond
                    added = added_cond
                    if do_cfg and added_cond is not None:
                        added = {k: torch.cat([added_uncond[k], added_cond[k]]) for k in added_cond}
                    noise = self.unet(model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
                    if do_cfg:
                        noise_uncond, noise_text = noise.chunk(2)
                        scale = (
                            guidance_scale if interval is None else interval.scale(i, len(timesteps), guidance_scale)
                        )
                        noise = noise_uncond + scale * (noise_text - noise_uncond)
                    latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
            final_maps = maps_method.maps(conditional_only=do_cfg)
        finally:
            handle.remove()
        with torch.no_grad():
            if output_type == "latent":
                images = latents
            else:
                latents = latents.to(self.vae.dtype)
                image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
                images = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, losses
        return AStarPipelineOutput(images=images, losses=losses, maps=final_maps)


class AStarPipeline(_AStarLoop, StableDiffusionPipeline):
    """StableDiffusionPipeline (SD 1.x / 2.x) whose denoising loop applies A-STAR / Attend-and-Excite updates."""


class AStarXLPipeline(_AStarLoop, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline whose denoising loop applies A-STAR / Attend-and-Excite updates."""

    def _conditioning(self, prompt, negative_prompt, num_images, do_cfg, device, height, width):
        cond, uncond, pooled, pooled_uncond = self.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
        )
        time_ids = self._sdxl_time_ids(height, width, cond.dtype, device).repeat(cond.shape[0], 1)
        added_cond = {"text_embeds": pooled, "time_ids": time_ids}
        added_uncond = {"text_embeds": pooled_uncond, "time_ids": time_ids} if do_cfg else None
        return cond, uncond, added_cond, added_uncond

    def _sdxl_time_ids(self, height: int, width: int, dtype, device) -> torch.Tensor:
        # diffusers' private _get_add_time_ids: SDXL's size and crop conditioning (isolated here).
        projection = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else None
        ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=dtype, text_encoder_projection_dim=projection
        )
        return ids.to(device)
